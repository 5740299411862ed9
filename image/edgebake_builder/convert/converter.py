"""`invoke convert-model`: Keras/SavedModel -> TFLite (none, dynamic, float16, int8), a model
card, and an accuracy gate. TensorFlow is needed here only, as the optional `convert` extra."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgebake_runtime.card import card_path_for

from ..errors import BuildError
from . import isolated
from .dataset import Dataset, load_dataset
from .gate import Accuracy, measure

QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
REPRESENTATIVE_SAMPLES = 200


@dataclass(frozen=True)
class ConvertOptions:
    model: Path
    output: Path
    quantize: str = "none"
    representative_data: Path | None = None
    validation_data: Path | None = None
    labels: Path | None = None
    max_accuracy_loss: float = 0.01


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    card_path: Path
    size_bytes: int
    accuracy: Accuracy | None


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


def convert_model(options: ConvertOptions) -> ConvertResult:
    if options.quantize not in QUANTIZE_MODES:
        raise BuildError(f"--quantize: expected one of {', '.join(QUANTIZE_MODES)}, "
                         f"found {options.quantize!r}")
    if options.quantize == "int8" and options.representative_data is None:
        raise BuildError("--quantize int8 needs --representative-data (an image folder or an "
                         ".npz with x) to calibrate the int8 ranges")
    if options.max_accuracy_loss < 0:
        raise BuildError("--max-accuracy-loss: expected a fraction >= 0, like 0.01")
    tf = import_tensorflow()
    source = SourceModel(tf, options.model)
    shape = source.input_shape
    representative = (load_dataset(options.representative_data, shape, "representative")
                      if options.representative_data else None)
    validation = (load_dataset(options.validation_data, shape, "validation")
                  if options.validation_data else None)
    labels = _labels(options, validation)
    blob = convert_bytes(tf, source, options.quantize, representative)
    out_dir = options.output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=out_dir) as tmp_name:
        tmp_model = Path(tmp_name) / options.output.name
        tmp_model.write_bytes(blob)
        accuracy = None
        if validation is not None:
            reference = source.predict(validation.x)
            try:
                converted, _ = isolated.predict(tmp_model, validation.x)
            except BuildError as exc:
                raise BuildError(f"the converted model runs on no device runtime: {exc}"
                                 ) from None
            accuracy = measure(reference, converted, validation.y)
            if accuracy.delta > options.max_accuracy_loss:
                raise BuildError(
                    f"accuracy gate failed: {accuracy.metric} {accuracy.reference:.4f} "
                    f"(original) -> {accuracy.converted:.4f} ({options.quantize}), a loss of "
                    f"{accuracy.delta:.4f} > --max-accuracy-loss {options.max_accuracy_loss}; "
                    "nothing was written")
        extra: dict[str, Any] = {
            "task": "classification" if _is_classifier(source) else "raw",
            "labels": labels,
            "preprocessing": _preprocessing(shape, representative or validation),
            "postprocessing": {"classification": {"top_k": min(3, max(1, len(labels)))}},
            "quantization": options.quantize,
            "source_model": options.model.name,
            "accuracy": accuracy.to_json() if accuracy else None,
        }
        tmp_card = card_path_for(tmp_model)
        card = isolated.write_card(tmp_model, tmp_card, options.output.stem, extra)
        card["tools"]["tensorflow"] = str(tf.__version__)
        final_card = card_path_for(options.output)
        golden = Path(tmp_name) / card["golden"]["file"]
        import json

        tmp_card.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        os.replace(golden, options.output.with_name(golden.name))
        os.replace(tmp_card, final_card)
        os.replace(tmp_model, options.output)
    return ConvertResult(options.output, final_card, len(blob), accuracy)


def _is_classifier(source: SourceModel) -> bool:
    if source.keras is None:
        return True
    shape = source.keras.outputs[0].shape
    return len(shape) == 2


def _labels(options: ConvertOptions, validation: Dataset | None) -> list[str]:
    if options.labels is not None:
        try:
            return [ln.strip() for ln in options.labels.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise BuildError(f"{options.labels}: cannot read labels: {exc.strerror}") from None
    return list(validation.classes) if validation is not None else []


def _preprocessing(shape: tuple[int, ...], data: Dataset | None) -> dict[str, Any]:
    size = [shape[1], shape[2]] if len(shape) == 4 else []
    top = 255.0 if data is not None and float(data.x.max()) > 1.5 else 1.0
    return {"size": size, "layout": "NHWC", "range": [0.0, top]}
