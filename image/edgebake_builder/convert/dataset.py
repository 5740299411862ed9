"""Representative and validation data: an image folder (one sub-folder per class) or an .npz."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import BuildError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp"}


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray[Any, Any]  # float32, shaped like the model input (without batch)
    y: np.ndarray[Any, Any] | None  # int labels, or None
    classes: list[str]
    source: Path


def load_dataset(path: Path, input_shape: tuple[int, ...], what: str,
                 source_shape: tuple[int, ...] | None = None) -> Dataset:
    """Load `path` shaped for a model whose input is `input_shape` (NHWC, batch dim included).
    Samples in the source model's own layout (`source_shape`, NCHW for most PyTorch and
    ONNX models) are transposed to NHWC."""
    if path.is_dir():
        data = _from_folder(path, input_shape, what)
    elif path.suffix == ".npz" and path.is_file():
        data = _from_npz(path, what)
    else:
        raise BuildError(f"{path}: {what} data must be an image folder or an .npz file")
    if len(data.x) == 0:
        raise BuildError(f"{path}: {what} data is empty")
    expected = tuple(int(d) for d in input_shape[1:])
    found = tuple(data.x.shape[1:])
    if source_shape is not None and found != expected and len(found) == 3 and \
            found == tuple(int(d) for d in source_shape[1:]):
        x = np.ascontiguousarray(data.x.transpose(0, 2, 3, 1))
        return Dataset(x=x, y=data.y, classes=data.classes, source=data.source)
    if found != expected:
        also = ""
        if source_shape is not None and tuple(source_shape[1:]) != expected:
            also = f" (NHWC) or {list(source_shape[1:])} (the source model's layout)"
        raise BuildError(f"{path}: {what} data has samples of shape {list(found)}, "
                         f"the model input needs {list(expected)}{also}")
    return data


def _from_npz(path: Path, what: str) -> Dataset:
    try:
        with np.load(path) as npz:
            if "x" not in npz:
                raise BuildError(f"{path}: {what} .npz needs an array named x (and optionally y)")
            x = np.asarray(npz["x"], dtype=np.float32)
            y = np.asarray(npz["y"]).astype(np.int64).reshape(-1) if "y" in npz else None
    except (OSError, ValueError) as exc:
        raise BuildError(f"{path}: not a readable .npz: {exc}") from None
    if y is not None and len(y) != len(x):
        raise BuildError(f"{path}: x has {len(x)} samples but y has {len(y)} labels")
    classes = [str(i) for i in range(int(y.max()) + 1)] if y is not None and len(y) else []
    return Dataset(x=x, y=y, classes=classes, source=path)


def _from_folder(path: Path, input_shape: tuple[int, ...], what: str) -> Dataset:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise BuildError(f"{path}: {what} folder has no class sub-folders (expected "
                         f"{path}/<class>/<image>)")
    if len(input_shape) != 4:
        raise BuildError(f"{path}: image folders need a model with an [N, H, W, C] input")
    height, width, channels = (int(d) for d in input_shape[1:])
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise BuildError(f"{path}: cannot make {channels}-channel images from a folder")
    xs: list[np.ndarray[Any, Any]] = []
    ys: list[int] = []
    for index, name in enumerate(classes):
        for file in sorted((path / name).iterdir()):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as img:
                    arr = np.asarray(img.convert(mode).resize((width, height)), np.float32)
            except (UnidentifiedImageError, OSError) as exc:
                raise BuildError(f"{file}: not a readable image: {exc}") from None
            xs.append(arr.reshape(height, width, channels) / 255.0)
            ys.append(index)
    x = np.stack(xs) if xs else np.zeros((0, height, width, channels), np.float32)
    return Dataset(x=x, y=np.asarray(ys, np.int64), classes=classes, source=path)
