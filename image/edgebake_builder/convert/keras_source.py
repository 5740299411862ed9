"""The TensorFlow side of convert-model: Keras (.keras, .h5) and SavedModel sources, converted
by TensorFlow's own TFLiteConverter in this process. TensorFlow is the optional `convert`
extra; nothing here reaches a unit."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError
from .dataset import Dataset

REPRESENTATIVE_SAMPLES = 200


def import_tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise BuildError("convert-model needs TensorFlow, which is an optional extra: "
                         "pip install '.[convert]' (or: pip install 'tensorflow-cpu==2.21.0')"
                         ) from None
    return tf


@contextlib.contextmanager
def _quiet_tf() -> Iterator[None]:
    """TensorFlow's converter prints to fds 1 and 2 from C++ and Python (Keras 3's export
    lists its captures); keep that out of the user's terminal."""
    import sys

    sys.stdout.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


class SourceModel:
    """The model to convert: a Keras file or a SavedModel directory."""

    def __init__(self, tf: Any, path: Path) -> None:
        self.tf = tf
        self.path = path
        self.keras: Any = None
        self.signature: Any = None
        if path.is_dir():
            self._load_saved_model()
        elif path.suffix in (".keras", ".h5") and path.is_file():
            try:
                with _quiet_tf():
                    self.keras = tf.keras.models.load_model(str(path), compile=False)
            except Exception as exc:
                raise BuildError(f"{path}: not a loadable Keras model: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        elif not path.exists():
            raise BuildError(f"{path}: model not found")
        else:
            raise BuildError(f"{path}: expected a .keras or .h5 file or a SavedModel directory")

    def _load_saved_model(self) -> None:
        if not (self.path / "saved_model.pb").is_file():
            raise BuildError(f"{self.path}: not a SavedModel directory (no saved_model.pb)")
        try:
            with _quiet_tf():
                loaded = self.tf.saved_model.load(str(self.path))
        except Exception as exc:
            raise BuildError(f"{self.path}: cannot load SavedModel: "
                             f"{str(exc).splitlines()[0][:200]}") from None
        signature = loaded.signatures.get("serving_default")
        if signature is None:
            raise BuildError(f"{self.path}: SavedModel has no serving_default signature; "
                             "export it with tf.saved_model.save(model, path, signatures=...)")
        self._loaded = loaded
        self.signature = signature

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self.keras is not None:
            shape = self.keras.inputs[0].shape
        else:
            spec = next(iter(self.signature.structured_input_signature[1].values()))
            shape = spec.shape
        return tuple(1 if d is None else int(d) for d in shape)

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        if self.keras is not None:
            return np.asarray(self.keras.predict(x, verbose=0, batch_size=64))
        name = next(iter(self.signature.structured_input_signature[1]))
        outputs = [self.signature(**{name: self.tf.constant(x[i:i + 64])})
                   for i in range(0, len(x), 64)]
        key = sorted(outputs[0])[0]
        return np.concatenate([np.asarray(o[key]) for o in outputs])

    def converter(self) -> Any:
        lite = self.tf.lite.TFLiteConverter
        if self.keras is not None:
            return lite.from_keras_model(self.keras)
        return lite.from_saved_model(str(self.path), signature_keys=["serving_default"])


def convert_bytes(tf: Any, source: SourceModel, quantize: str,
                  representative: Dataset | None) -> bytes:
    converter = source.converter()
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize in ("dynamic", "float16", "int8"):
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        assert representative is not None
        samples = representative.x[:REPRESENTATIVE_SAMPLES]

        def gen() -> Iterator[list[np.ndarray[Any, Any]]]:
            for sample in samples:
                yield [sample[None, ...].astype(np.float32)]

        converter.representative_dataset = gen
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        with _quiet_tf():
            return bytes(converter.convert())
    except Exception as exc:
        text = str(exc)
        hint = ""
        if "Select TF" in text or "Flex" in text or "not supported" in text:
            hint = " (the model uses TensorFlow ops that TFLite builtins cannot run)"
        first = next((ln for ln in text.splitlines() if "error" in ln.lower()),
                     text.splitlines()[0] if text else type(exc).__name__)
        raise BuildError(f"{source.path}: conversion failed{hint}: {first.strip()[:300]}") from None


class KerasSource:
    """A Keras or SavedModel source, as convert-model's steps see any source."""

    def __init__(self, path: Path) -> None:
        self.tf = import_tensorflow()
        self.model = SourceModel(self.tf, path)
        self.path = path
        self.input_shape = self.model.input_shape
        self.source_shape = self.input_shape
        self.layout = "NHWC"

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return self.model.predict(x)

    def convert(self, quantize: str, representative: Dataset | None, work: Path) -> bytes:
        return convert_bytes(self.tf, self.model, quantize, representative)

    def task(self, labels: list[str]) -> tuple[str, dict[str, Any]]:
        if self.model.keras is None or len(self.model.keras.outputs[0].shape) == 2:
            return "classification", {"classification": {"top_k": min(3, max(1, len(labels)))}}
        return "raw", {}

    def card_fields(self) -> dict[str, Any]:
        kind = "savedmodel" if self.path.is_dir() else self.path.suffix.lstrip(".")
        return {"source": {"format": kind, "framework": "tensorflow", "converter": "tensorflow",
                           "layout": "NHWC"},
                "tools": {"tensorflow": str(self.tf.__version__)}}
