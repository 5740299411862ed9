"""`invoke samples-to-dataset`: collected field samples as the .npz that convert-model takes
for its representative and validation data (x: N x H x W x 3 float32 in [0, 1], as an image
folder gives it; y: class indices when a labels CSV names them)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgebake_runtime.atomic import write_atomic
from PIL import Image, UnidentifiedImageError

from ..errors import BuildError


@dataclass(frozen=True)
class SampleDataset:
    samples: int
    labelled: int
    classes: list[str]
    size: tuple[int, int]


def size_from(text: str, card: str) -> tuple[int, int] | None:
    """(width, height) from `--size W,H`, else from a model card's input; None: neither
    was given (the first sample's own size is used)."""
    if text:
        parts = text.split(",")
        if len(parts) != 2 or not all(p.strip().isdigit() and 0 < int(p) <= 4096
                                      for p in parts):
            raise BuildError(f"--size {text!r}: expected width,height like 224,224")
        return int(parts[0]), int(parts[1])
    if not card:
        return None
    try:
        data = json.loads(Path(card).read_text())
        shape = data["inputs"][0]["shape"]
        layout = (data.get("preprocessing") or {}).get("layout", "NHWC")
        height, width = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
        return int(width), int(height)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise BuildError(f"--card {card}: cannot read the model's input size: {exc}") from None


def read_labels(path: Path) -> dict[str, str]:
    """name -> label from a CSV of `name,label` rows (a header row `name,label` is skipped);
    a name may be given with or without .jpg."""
    try:
        rows = list(csv.reader(io.StringIO(path.read_text())))
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"--labels {path}: cannot read it: {exc}") from None
    labels = {}
    for number, row in enumerate(rows, 1):
        if not row or (number == 1 and [c.strip() for c in row] == ["name", "label"]):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise BuildError(f"--labels {path}:{number}: expected name,label")
        labels[row[0].strip().removesuffix(".jpg")] = row[1].strip()
    return labels


def samples_to_dataset(folder: Path, out: Path, size: tuple[int, int] | None,
                       labels_csv: Path | None = None) -> SampleDataset:
    images = sorted(folder.glob("*.jpg"))
    if not images:
        raise BuildError(f"--samples {folder}: no samples (*.jpg with their .json) in it")
    labels = read_labels(labels_csv) if labels_csv else {}
    if labels:
        images = [p for p in images if p.stem in labels]
        if not images:
            raise BuildError(f"--labels {labels_csv}: names none of the samples in {folder}")
    classes = sorted(set(labels[p.stem] for p in images)) if labels else []
    if size is None:
        try:
            with Image.open(images[0]) as first:
                size = first.size
        except (UnidentifiedImageError, OSError) as exc:
            raise BuildError(f"{images[0]}: not a readable image: {exc}") from None
    xs: list[np.ndarray[Any, Any]] = []
    for path in images:
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB").resize(size), np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise BuildError(f"{path}: not a readable image: {exc}") from None
        xs.append(pixels)
    arrays: dict[str, Any] = {"x": np.stack(xs),
                              "names": np.asarray([p.stem for p in images])}
    if labels:
        index = {name: i for i, name in enumerate(classes)}
        arrays["y"] = np.asarray([index[labels[p.stem]] for p in images], np.int64)
        arrays["classes"] = np.asarray(classes)
    packed = io.BytesIO()
    np.savez(packed, **arrays)
    write_atomic(out, packed.getvalue())
    return SampleDataset(len(images), len(images) if labels else 0, classes, size)
