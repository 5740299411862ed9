"""Ultralytics YOLOv8/YOLO11 detection heads: one output [1, 4 + classes, anchors] of centre
boxes in input pixels and per-class scores, decoded with class-aware NMS in numpy, the way
Ultralytics' own `non_max_suppression` does it (single label per box)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
# Boxes of different classes never overlap once shifted this far apart (Ultralytics' max_wh).
CLASS_OFFSET = 7680.0
MAX_CANDIDATES = 30000


@dataclass(frozen=True)
class Detections:
    boxes: Array  # [k, 4] x0 y0 x1 y1 in input pixels
    scores: Array  # [k]
    classes: Array  # [k] int


def decode(raw: Array, score_threshold: float, iou_threshold: float,
           max_detections: int) -> Detections:
    """`raw` is one image's head output, [4 + classes, anchors], as floats."""
    class_scores = raw[4:]
    classes = class_scores.argmax(axis=0)
    scores = class_scores[classes, np.arange(class_scores.shape[1])]
    keep = np.flatnonzero(scores > score_threshold)
    if keep.size == 0:
        empty = np.zeros((0, 4), np.float32)
        return Detections(empty, np.zeros(0, np.float32), np.zeros(0, np.int64))
    order = keep[np.argsort(-scores[keep], kind="stable")][:MAX_CANDIDATES]
    cx, cy, w, h = raw[0, order], raw[1, order], raw[2, order], raw[3, order]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    shifted = boxes + (classes[order] * CLASS_OFFSET)[:, None]
    chosen = _nms(shifted, iou_threshold, max_detections)
    return Detections(boxes[chosen], scores[order][chosen], classes[order][chosen])


def _nms(boxes: Array, iou_threshold: float, limit: int) -> list[int]:
    """Greedy NMS over boxes sorted by score, best first: indexes kept."""
    x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x1 - x0) * (y1 - y0)
    remaining = np.arange(len(boxes))
    chosen: list[int] = []
    while remaining.size and len(chosen) < limit:
        first, rest = remaining[0], remaining[1:]
        chosen.append(int(first))
        width = np.clip(np.minimum(x1[first], x1[rest]) - np.maximum(x0[first], x0[rest]),
                        0, None)
        height = np.clip(np.minimum(y1[first], y1[rest]) - np.maximum(y0[first], y0[rest]),
                         0, None)
        inter = width * height
        iou = inter / np.maximum(areas[first] + areas[rest] - inter, 1e-9)
        remaining = rest[iou <= iou_threshold]
    return chosen
