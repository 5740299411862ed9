"""`invoke convert-model`: a Keras, SavedModel, PyTorch (.pt2) or ONNX model -> TFLite (none,
dynamic, float16, int8), a model card, and an accuracy gate against the source framework."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from edgebake_runtime.card import card_path_for

from ..errors import BuildError
from ..progress import Progress
from . import isolated
from .dataset import Dataset, load_dataset
from .gate import Accuracy, measure

QUANTIZE_MODES = ("none", "dynamic", "float16", "int8")
CONVERTER_NAMES = ("tensorflow", "litert-torch", "onnx2tf")


@dataclass(frozen=True)
class ConvertOptions:
    model: Path
    output: Path
    quantize: str = "none"
    representative_data: Path | None = None
    validation_data: Path | None = None
    labels: Path | None = None
    max_accuracy_loss: float = 0.01
    converter: str | None = None
    # torchvision's convention: per-channel values for inputs already scaled to [0, 1]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ConvertResult:
    output: Path
    card_path: Path
    size_bytes: int
    accuracy: Accuracy
    card: dict[str, Any]


class Source(Protocol):
    """What convert-model needs of a model, whatever framework it comes from."""

    path: Path
    input_shape: tuple[int, ...]  # NHWC, batch 1: what the converted model takes
    source_shape: tuple[int, ...]  # what the source framework takes
    layout: str

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]: ...
    def convert(self, quantize: str, representative: Dataset | None, work: Path) -> bytes: ...
    def task(self, labels: list[str]) -> tuple[str, dict[str, Any]]: ...
    def card_fields(self) -> dict[str, Any]: ...


def check_options(options: ConvertOptions) -> None:
    """Everything that can be refused before any model is read."""
    if options.quantize not in QUANTIZE_MODES:
        raise BuildError(f"--quantize: expected one of {', '.join(QUANTIZE_MODES)}, "
                         f"found {options.quantize!r}")
    if options.quantize == "int8" and options.representative_data is None:
        raise BuildError("--quantize int8 needs --representative-data (an image folder or an "
                         ".npz with x) to calibrate the int8 ranges")
    if options.max_accuracy_loss < 0:
        raise BuildError("--max-accuracy-loss: expected a fraction >= 0, like 0.01")
    if options.converter is not None and options.converter not in CONVERTER_NAMES:
        raise BuildError(f"--converter: expected one of {', '.join(CONVERTER_NAMES)}, "
                         f"found {options.converter!r}")
    if (options.mean is None) != (options.std is None):
        raise BuildError("--mean and --std go together: give both or neither")
    for name, values in (("--mean", options.mean), ("--std", options.std)):
        if values is not None and len(values) not in (1, 3):
            raise BuildError(f"{name}: expected 1 or 3 values (one per channel), found "
                             f"{len(values)}: {list(values)}")
    if options.std is not None and any(v <= 0 for v in options.std):
        raise BuildError(f"--std: expected values > 0, found {list(options.std)}")


def open_source(options: ConvertOptions, say: Any = print) -> Source:
    from .foreign import ForeignSource, is_foreign

    if is_foreign(options.model):
        return ForeignSource(options.model, options.converter, options.input_shape, say)
    if options.converter not in (None, "tensorflow"):
        raise BuildError(f"--converter {options.converter}: takes .pt2 or .onnx models; "
                         f"{options.model} is converted by tensorflow")
    from .keras_source import KerasSource

    return KerasSource(options.model)


def convert_model(options: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    check_options(options)
    steps = progress or Progress(4)
    say = steps.say
    with steps.step(f"reading {options.model.name} and its data"):
        source = open_source(options, say)
        options = _with_normalization(options, source)
        channels = source.input_shape[-1]
        if options.mean is not None and len(options.mean) not in (1, channels):
            raise BuildError(f"--mean: {len(options.mean)} values for a {channels}-channel "
                             "input")
        representative = _data(options.representative_data, source, "representative")
        validation = _data(options.validation_data, source, "validation")
        _refuse_unknown_normalization(options, representative or validation)
        labels = _labels(options, validation, source)
    out_dir = options.output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".convert-", dir=out_dir) as tmp_name:
        work = Path(tmp_name)
        with steps.step(f"converting ({options.quantize}) with "
                        f"{getattr(source, 'converter', 'tensorflow')}"):
            blob = source.convert(options.quantize, representative, work)
        tmp_model = work / options.output.name
        tmp_model.write_bytes(blob)
        with steps.step("the gate: the converted model against the source framework"):
            accuracy, reference = _gate(options, source, tmp_model, validation)
        task, post = source.task(labels)
        if task == "classification" and not _probabilities(reference):
            post["classification"]["softmax"] = True  # logits: the unit shows probabilities
        extra: dict[str, Any] = {
            "task": task,
            "labels": labels,
            "preprocessing": _preprocessing(source.input_shape, options, task,
                                            representative or validation),
            "postprocessing": post,
            "quantization": options.quantize,
            "source_model": options.model.name,
            "accuracy": accuracy.to_json(),
            **source.card_fields(),
        }
        with steps.step("the card: device runtimes and golden outputs"):
            tmp_card = card_path_for(tmp_model)
            card = isolated.write_card(tmp_model, tmp_card, options.output.stem, extra)
        final_card = card_path_for(options.output)
        golden = work / card["golden"]["file"]
        tmp_card.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        os.replace(golden, options.output.with_name(golden.name))
        os.replace(tmp_card, final_card)
        os.replace(tmp_model, options.output)
    return ConvertResult(options.output, final_card, len(blob), accuracy, card)


def _with_normalization(options: ConvertOptions, source: Source) -> ConvertOptions:
    """--mean/--std, else what the model file carries; a PyTorch or ONNX model with neither,
    whose data is clearly normalised, is refused: the unit would feed it raw pixels."""
    if options.mean is not None:
        return options
    carried = getattr(source, "normalization", lambda: None)()
    if carried is not None:
        mean, std = carried
        check_options(dataclasses.replace(options, mean=mean, std=std))
        return dataclasses.replace(options, mean=mean, std=std)
    return options


def _refuse_unknown_normalization(options: ConvertOptions, data: Dataset | None) -> None:
    """Samples below 0 were normalised: without the mean and std the unit cannot make such
    inputs from a frame's pixels, and would feed the model something else than it learnt."""
    if options.mean is not None or data is None:
        return
    lowest = float(data.x.min())
    if lowest < -1e-3:
        raise BuildError(f"{data.source}: samples go down to {lowest:.3g}, so they were "
                         "normalised; pass --mean and --std (as the model was trained, e.g. "
                         "0.485,0.456,0.406 and 0.229,0.224,0.225), or carry them in the model")


def _data(path: Path | None, source: Source, what: str) -> Dataset | None:
    if path is None:
        return None
    return load_dataset(path, source.input_shape, what, source_shape=source.source_shape)


def _probabilities(scores: np.ndarray[Any, Any]) -> bool:
    """Whether a classifier's outputs are already probabilities (each row sums to one)."""
    rows = scores.reshape(len(scores), -1)
    return bool(np.all(rows >= -1e-6) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))


def _gate(options: ConvertOptions, source: Source, model: Path,
          validation: Dataset | None) -> tuple[Accuracy, np.ndarray[Any, Any]]:
    """The converted model against the source framework's own outputs, on the same data.
    Without validation data, synthetic frames still give agreement and deviation figures,
    shown and recorded but not enforced."""
    x = validation.x if validation is not None else _synthetic(source.input_shape, options)
    reference = source.predict(x)
    try:
        converted, _ = isolated.predict(model, x)
    except BuildError as exc:
        raise BuildError(f"the converted model runs on no device runtime: {exc}") from None
    accuracy = measure(reference, converted, validation.y if validation else None)
    if validation is None:
        return dataclasses.replace(accuracy, data="synthetic"), reference
    if accuracy.delta > options.max_accuracy_loss:
        raise BuildError(
            f"accuracy gate failed: {accuracy.metric} {accuracy.reference:.4f} "
            f"(original) -> {accuracy.converted:.4f} ({options.quantize}), a loss of "
            f"{accuracy.delta:.4f} > --max-accuracy-loss {options.max_accuracy_loss}; "
            "nothing was written")
    return accuracy, reference


def _synthetic(shape: tuple[int, ...], options: ConvertOptions) -> np.ndarray[Any, Any]:
    """Eight deterministic noise frames, as the card's preprocessing would feed them."""
    pixels = np.random.default_rng(0).random((8, *shape[1:]), dtype=np.float32)
    if options.mean is not None and options.std is not None:
        channels = shape[-1]
        mean = np.asarray(_per_channel(options.mean, channels), np.float32)
        std = np.asarray(_per_channel(options.std, channels), np.float32)
        return (pixels - mean) / std
    return pixels


def _labels(options: ConvertOptions, validation: Dataset | None, source: Source) -> list[str]:
    if options.labels is not None:
        try:
            return [ln.strip() for ln in options.labels.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            raise BuildError(f"{options.labels}: cannot read labels: {exc.strerror}") from None
    from_model: list[str] = getattr(source, "metadata_labels", lambda: [])()
    if from_model:
        return from_model
    return list(validation.classes) if validation is not None else []


def _preprocessing(shape: tuple[int, ...], options: ConvertOptions, task: str,
                   data: Dataset | None) -> dict[str, Any]:
    """What the unit does to a frame: the card's mean/std are in pixel units (0-255)."""
    size = [shape[1], shape[2]] if len(shape) == 4 else []
    pre: dict[str, Any] = {"size": size, "layout": "NHWC"}
    if task == "yolo":  # as Ultralytics trains and predicts: letterboxed on grey 114
        pre.update(fit="letterbox", pad=114)
    if options.mean is not None and options.std is not None:
        channels = shape[-1]
        pre["mean"] = [round(v * 255.0, 6) for v in _per_channel(options.mean, channels)]
        pre["std"] = [round(v * 255.0, 6) for v in _per_channel(options.std, channels)]
        return pre
    top = 255.0 if data is not None and float(data.x.max()) > 1.5 else 1.0
    return {**pre, "range": [0.0, top]}


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)
