"""PyTorch (.pt2) and ONNX sources for convert-model, converted in their own toolchains.

A `.pt2` (torch.export) goes through litert-torch, an `.onnx` through onnx2tf; either gives a
float32 .tflite with an NHWC input, which ai-edge-quantizer turns into float16, dynamic or
full int8. The gate's reference is the source framework itself: torch for a .pt2,
onnxruntime for an .onnx. This process only moves files and numbers between them.
"""

from __future__ import annotations

import ast
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError
from . import toolchain
from .dataset import Dataset

TORCH_CHILD = "edgebake_builder.convert.torch_child"
ONNX2TF_CHILD = "edgebake_builder.convert.onnx2tf_child"
CONVERTERS = {".pt2": ("litert-torch", "onnx2tf"), ".onnx": ("onnx2tf",)}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ptl")


def is_foreign(path: Path) -> bool:
    return path.suffix in CONVERTERS or path.suffix in TORCHSCRIPT_SUFFIXES


def _layout(path: Path, shape: tuple[int, ...]) -> str:
    if len(shape) == 4 and shape[1] in (1, 3) and min(shape[2], shape[3]) > 4:
        return "NCHW"
    if len(shape) == 4 and shape[3] in (1, 3) and min(shape[1], shape[2]) > 4:
        return "NHWC"
    raise BuildError(f"{path}: cannot tell the layout of input {list(shape)}: expected an "
                     "image input [1, C, H, W] (NCHW) or [1, H, W, C] (NHWC) with C 1 or 3")


class ForeignSource:
    """A .pt2 or .onnx model, read once in the torch toolchain."""

    def __init__(self, path: Path, converter: str | None,
                 input_shape: tuple[int, ...] | None, say: Any = print) -> None:
        if path.suffix in TORCHSCRIPT_SUFFIXES:
            raise BuildError(f"{path}: a TorchScript or pickled PyTorch model; edgebake takes "
                             "torch.export programs: torch.export.save(torch.export.export("
                             "model, (example,)), 'model.pt2')")
        if not path.is_file():
            raise BuildError(f"{path}: model not found")
        if path.stat().st_size == 0:
            raise BuildError(f"{path}: empty file")
        allowed = CONVERTERS[path.suffix]
        self.converter = converter or allowed[0]
        if self.converter not in allowed:
            raise BuildError(f"--converter: a {path.suffix} model converts with "
                             f"{' or '.join(allowed)}, not {self.converter}")
        self.path = path
        self.say = say
        info = toolchain.call("torch", TORCH_CHILD, "inspect", {"model": str(path)}, say)
        self.info = info
        if len(info["inputs"]) != 1:
            raise BuildError(f"{path}: has {len(info['inputs'])} inputs; edgebake runs "
                             "single-image-input models")
        dims = info["inputs"][0]
        if input_shape is not None:
            if len(input_shape) != len(dims):
                raise BuildError(f"--input-shape: {list(input_shape)} has {len(input_shape)} "
                                 f"dimensions, the model's input has {len(dims)}: {dims}")
            dims = list(input_shape)
        if any(not isinstance(d, int) or d <= 0 for d in dims):
            raise BuildError(f"{path}: input has dynamic dimensions {dims}; export it with a "
                             "fixed size, or pass --input-shape 1,3,H,W")
        self.source_shape = tuple(int(d) for d in dims)
        self.fixed_shape = input_shape is not None
        self.layout = _layout(path, self.source_shape)
        if path.suffix == ".onnx" and self.layout != "NCHW":
            raise BuildError(f"{path}: onnx2tf takes NCHW image inputs; this one is "
                             f"{list(self.source_shape)} (NHWC)")
        n, a, b, c = self.source_shape
        self.input_shape = (n, b, c, a) if self.layout == "NCHW" else self.source_shape
        self.tools: dict[str, str] = {info["framework"]: info["version"]}

    def to_source_layout(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return x.transpose(0, 3, 1, 2) if self.layout == "NCHW" else x

    def predict(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The source framework's scores for NHWC samples."""
        with tempfile.TemporaryDirectory(prefix="edgebake-reference-") as tmp:
            inputs, outputs = Path(tmp) / "x.npy", Path(tmp) / "out.npy"
            np.save(inputs, np.ascontiguousarray(self.to_source_layout(x), np.float32))
            toolchain.call("torch", TORCH_CHILD, "reference",
                           {"model": str(self.path), "x": str(inputs), "out": str(outputs)},
                           self.say)
            scores: np.ndarray[Any, Any] = np.load(outputs)
            return scores

    def convert(self, quantize: str, representative: Dataset | None, work: Path) -> bytes:
        float_model = work / "float32.tflite"
        shape = list(self.source_shape)
        if self.converter == "litert-torch":
            answer = toolchain.call("torch", TORCH_CHILD, "litert",
                                    {"model": str(self.path), "out": str(float_model),
                                     "input_shape": shape, "layout": self.layout}, self.say)
        else:
            onnx_model = self.path
            if self.path.suffix == ".pt2":
                onnx_model = work / "exported.onnx"
                toolchain.call("torch", TORCH_CHILD, "export_onnx",
                               {"model": str(self.path), "out": str(onnx_model),
                                "input_shape": shape}, self.say)
            answer = toolchain.call("onnx2tf", ONNX2TF_CHILD, "convert",
                                    {"model": str(onnx_model), "out": str(float_model),
                                     "input_shape": shape if self.fixed_shape else None},
                                    self.say)
        self.tools[answer["converter"]] = answer["version"]
        if quantize == "none":
            return float_model.read_bytes()
        payload: dict[str, Any] = {"model": str(float_model), "mode": quantize,
                                   "out": str(work / f"{quantize}.tflite")}
        if representative is not None:
            samples = work / "representative.npy"
            np.save(samples, np.ascontiguousarray(representative.x, np.float32))
            payload["representative"] = str(samples)
        answer = toolchain.call("torch", TORCH_CHILD, "quantize", payload, self.say)
        self.tools[answer["quantizer"]] = answer["version"]
        return Path(payload["out"]).read_bytes()

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """Mean and std the model file carries ({"mean": [...], "std": [...]} as a .pt2's
        extra file or an ONNX metadata entry named normalization.json), if any."""
        text = self.info.get("metadata", {}).get("normalization.json")
        if not text:
            return None
        try:
            data = json.loads(text)
            mean = tuple(float(v) for v in data["mean"])
            std = tuple(float(v) for v in data["std"])
        except (ValueError, KeyError, TypeError):
            raise BuildError(f"{self.path}: normalization.json: expected {{\"mean\": [..], "
                             f"\"std\": [..]}}, found {text[:80]!r}") from None
        return mean, std

    def metadata_labels(self) -> list[str]:
        """Class names an Ultralytics export keeps in its ONNX metadata ("{0: 'person', ...}")."""
        text = self.info.get("metadata", {}).get("names")
        if not text:
            return []
        try:
            names = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return []
        if not isinstance(names, dict):
            return []
        return [str(names[k]) for k in sorted(names)]

    def task(self, labels: list[str]) -> tuple[str, dict[str, Any]]:
        outputs = self.info["outputs"]
        first = outputs[0] if outputs else []
        if len(first) == 2:
            return "classification", {"classification": {"top_k": min(3, max(1, len(labels)))}}
        if len(outputs) == 1 and len(first) == 3 and isinstance(first[1], int) and \
                isinstance(first[2], int) and 4 < first[1] < first[2]:
            classes = first[1] - 4
            if self.info.get("metadata", {}).get("task") == "detect" or len(labels) == classes:
                return "yolo", {"yolo": {"score_threshold": 0.25, "iou_threshold": 0.7,
                                         "max_detections": 300}}
        return "raw", {}

    def card_fields(self) -> dict[str, Any]:
        return {"source": {"format": self.path.suffix.lstrip("."),
                           "framework": self.info["framework"], "converter": self.converter,
                           "layout": self.layout, "shape": list(self.source_shape),
                           "size_bytes": self.path.stat().st_size},
                "tools": dict(self.tools)}
