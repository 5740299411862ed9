"""Turns output tensors into results: top-k classes, SSD or BlazeFace detections, or summaries."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .card import Card, TensorSpec
from .placement import Placement

Result = dict[str, Any]
Array = np.ndarray[Any, Any]


def dequantize(values: Array, spec: TensorSpec) -> Array:
    if values.dtype.kind in "iu" and spec.scale > 0:
        return (values.astype(np.float32) - spec.zero_point) * spec.scale
    return values.astype(np.float32, copy=False)


def classification(card: Card, outputs: list[Array], placement: Placement,
                   threshold: float | None, top_k: int) -> Result:
    scores = dequantize(outputs[0], card.outputs[0]).reshape(-1)
    if card.postprocessing.get("classification", {}).get("softmax"):  # the card says: logits
        exp = np.exp(scores - scores.max())
        scores = exp / exp.sum()
    k = min(top_k, scores.size)
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.argsort(-scores[best])]
    labels = card.labels
    top = [{"index": int(i), "label": labels[i] if i < len(labels) else str(int(i)),
            "score": round(float(scores[i]), 5)} for i in best
           if threshold is None or scores[i] >= threshold]
    return {"task": "classification", "top": top}


def _box_to_frame(box: tuple[float, float, float, float], placement: Placement) -> list[float]:
    x0, y0 = placement.to_frame(box[0], box[1])
    x1, y1 = placement.to_frame(box[2], box[3])
    return [round(min(max(v, 0.0), 1.0), 5) for v in (x0, y0, x1, y1)]


def ssd(card: Card, outputs: list[Array], placement: Placement, threshold: float | None,
        top_k: int) -> Result:
    """TFLite_Detection_PostProcess: boxes [1,N,4] (ymin,xmin,ymax,xmax), classes, scores, count."""
    boxes = next(o for o in outputs if o.ndim == 3 and o.shape[-1] == 4)[0]
    flat = [o.reshape(-1) for o in outputs if o.ndim != 3]
    count_arr = next((o for o in flat if o.size == 1), None)
    classes, scores = [o for o in flat if o.size != 1][:2]
    count = int(count_arr[0]) if count_arr is not None else scores.size
    limit = threshold if threshold is not None else float(
        card.postprocessing.get("ssd", {}).get("score_threshold", 0.5))
    labels = card.labels
    detections = []
    for i in range(min(count, scores.size)):
        if scores[i] < limit:
            continue
        ymin, xmin, ymax, xmax = (float(v) for v in boxes[i])
        cls = int(classes[i])
        detections.append({"label": labels[cls] if cls < len(labels) else str(cls),
                           "score": round(float(scores[i]), 5),
                           "box": _box_to_frame((xmin, ymin, xmax, ymax), placement)})
    return {"task": "ssd", "detections": detections}


@lru_cache(maxsize=8)
def blazeface_anchors(input_size: int, strides: tuple[int, ...], offset: float,
                      interpolated: float) -> Array:
    """SSD anchor centres for BlazeFace (fixed anchor size), merged across equal strides."""
    centres: list[tuple[float, float]] = []
    i = 0
    while i < len(strides):
        stride = strides[i]
        per_cell = 0
        while i < len(strides) and strides[i] == stride:
            per_cell += 1 + (1 if interpolated > 0 else 0)
            i += 1
        size = int(np.ceil(input_size / stride))
        for y in range(size):
            for x in range(size):
                centres.extend([((x + offset) / size, (y + offset) / size)] * per_cell)
    return np.asarray(centres, dtype=np.float32)


def _iou(box: Array, others: Array) -> Array:
    lo = np.maximum(box[:2], others[:, :2])
    hi = np.minimum(box[2:], others[:, 2:])
    wh = np.clip(hi - lo, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    ratio: Array = inter / np.maximum(union, 1e-9)
    return ratio


def _logit(probability: float) -> float:
    if probability <= 0.0:
        return -np.inf
    if probability >= 1.0:
        return np.inf
    return float(np.log(probability / (1.0 - probability)))


def blazeface(card: Card, outputs: list[Array], placement: Placement, threshold: float | None,
              top_k: int) -> Result:
    prepared = _blazeface_setup(card)
    regs_out, scores_out = outputs[prepared.regs_index], outputs[1 - prepared.regs_index]
    raw_scores = (dequantize(scores_out, prepared.scores_spec) if prepared.scores_quantised
                  else scores_out).reshape(-1)
    if raw_scores.size != prepared.anchors.shape[0]:
        raise ValueError(f"card anchors ({prepared.anchors.shape[0]}) do not match the "
                         f"model's {raw_scores.size} outputs")
    limit = prepared.logit_limit if threshold is None else _logit(threshold)
    # The sigmoid is monotonic: compare the logits with the threshold's logit and take the
    # sigmoid of the few anchors kept, not of all of them. Most frames keep none.
    keep = np.flatnonzero(raw_scores >= limit)
    if keep.size == 0:
        return {"task": "blazeface", "detections": []}
    regs = regs_out[0, keep]
    if prepared.regs_quantised:
        regs = dequantize(regs, prepared.regs_spec)
    if keep.size <= FEW_ANCHORS:
        return {"task": "blazeface",
                "detections": _blazeface_few(prepared, keep, regs, raw_scores[keep],
                                             placement, top_k)}
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores[keep].astype(np.float64), -100.0, 100.0)))
    order = np.argsort(-scores)
    scores, keep, regs = scores[order], keep[order], regs[order]
    size, n_kp = prepared.input_size, prepared.keypoints
    # every value as (x, y) pairs in input units: centre offset, size, then the keypoints
    points = regs[:, :2 * (2 + n_kp)].astype(np.float64).reshape(len(keep), 2 + n_kp, 2) / size
    anchors = prepared.anchors[keep]
    centre = points[:, 0] + anchors
    half = points[:, 1] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    kps = points[:, 2:] + anchors[:, None, :]
    scale = np.array([placement.scale_x, placement.scale_y])
    offset = np.array([placement.offset_x, placement.offset_y])
    detections: list[dict[str, Any]] = []
    remaining = np.arange(len(scores))
    while remaining.size and len(detections) < max(top_k, 1) * 10:
        first = remaining[0]
        if remaining.size == 1:
            group = remaining
            overlap = np.ones(1, dtype=bool)
            box, kp = boxes[first], kps[first]
        else:
            overlap = _iou(boxes[first], boxes[remaining]) > prepared.iou_limit
            overlap[0] = True  # a box is in its own group, even one of zero area
            group = remaining[overlap]
            weights = scores[group]
            total = weights.sum()
            box = weights @ boxes[group] / total
            kp = (weights @ kps[group].reshape(len(group), -1) / total).reshape(-1, 2)
        corners = np.clip((box.reshape(2, 2) - offset) / scale, 0.0, 1.0).reshape(-1).tolist()
        detections.append({
            "label": "face", "score": round(float(scores[first]), 5),
            "box": [round(v, 5) for v in corners],
            "keypoints": [[round(x, 4), round(y, 4)]
                          for x, y in ((kp - offset) / scale).tolist()]})
        remaining = remaining[~overlap]
    return {"task": "blazeface", "detections": detections}


# Up to this many anchors above the threshold (a frame with a few faces), plain Python floats
# decode faster than numpy: its per-call cost is paid for every small array, and right after
# an invoke its code is out of the CPU's caches. Beyond it (crowds, a low threshold) numpy.
FEW_ANCHORS = 48


def _blazeface_few(prepared: _BlazeFaceSetup, keep: Array, regs: Array, logits: Array,
                   placement: Placement, top_k: int) -> list[dict[str, Any]]:
    """The same decoding and weighted grouping as the array code, in float64 Python."""
    size, width = prepared.input_size, 4 + 2 * prepared.keypoints
    anchors = prepared.anchor_pairs
    candidates: list[tuple[float, list[float]]] = []
    for index, row, logit in zip(keep.tolist(), regs.tolist(), logits.tolist(), strict=True):
        ax, ay = anchors[index]
        cx, cy = row[0] / size + ax, row[1] / size + ay
        hw, hh = row[2] / size / 2, row[3] / size / 2
        values = [cx - hw, cy - hh, cx + hw, cy + hh]
        for k in range(4, width, 2):
            values.append(row[k] / size + ax)
            values.append(row[k + 1] / size + ay)
        score = 1.0 / (1.0 + math.exp(-min(max(logit, -100.0), 100.0)))
        candidates.append((score, values))
    candidates.sort(key=lambda c: -c[0])  # stable: equal scores keep anchor order
    sx, sy, ox, oy = placement.scale_x, placement.scale_y, placement.offset_x, placement.offset_y
    detections: list[dict[str, Any]] = []
    while candidates and len(detections) < max(top_k, 1) * 10:
        score, first = candidates[0]
        group: list[tuple[float, list[float]]] = [candidates[0]]
        rest: list[tuple[float, list[float]]] = []
        for candidate in candidates[1:]:
            overlaps = _iou_pair(first, candidate[1]) > prepared.iou_limit
            (group if overlaps else rest).append(candidate)
        mean = first
        if len(group) > 1:  # the group's score-weighted mean
            total = 0.0
            for weight, _ in group:
                total += weight
            mean = [0.0] * width
            for weight, values in group:
                for j in range(width):
                    mean[j] += weight * values[j]
            mean = [v / total for v in mean]
        detections.append({
            "label": "face", "score": round(score, 5),
            "box": [round(min(max((mean[0] - ox) / sx, 0.0), 1.0), 5),
                    round(min(max((mean[1] - oy) / sy, 0.0), 1.0), 5),
                    round(min(max((mean[2] - ox) / sx, 0.0), 1.0), 5),
                    round(min(max((mean[3] - oy) / sy, 0.0), 1.0), 5)],
            "keypoints": [[round((mean[k] - ox) / sx, 4), round((mean[k + 1] - oy) / sy, 4)]
                          for k in range(4, width, 2)]})
        candidates = rest
    return detections


def _iou_pair(a: list[float], b: list[float]) -> float:
    """Intersection over union of two boxes given as their first four values x0 y0 x1 y1."""
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * \
        max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, 1e-9)


@dataclass(frozen=True)
class _BlazeFaceSetup:
    """What a card's BlazeFace options give, worked out once per card, not per frame."""

    anchors: Array
    anchor_pairs: list[list[float]]  # the same centres as Python floats
    input_size: float
    keypoints: int
    iou_limit: float
    logit_limit: float
    regs_index: int
    regs_spec: TensorSpec
    scores_spec: TensorSpec
    regs_quantised: bool
    scores_quantised: bool


_SETUPS: dict[int, tuple[Card, _BlazeFaceSetup]] = {}


def _blazeface_setup(card: Card) -> _BlazeFaceSetup:
    cached = _SETUPS.get(id(card))
    if cached is not None and cached[0] is card:
        return cached[1]
    opts = card.postprocessing["blazeface"]
    specs = card.outputs
    regs_index = 0 if int(specs[0].shape[-1]) == 16 else 1
    regs_spec, scores_spec = specs[regs_index], specs[1 - regs_index]
    anchors = blazeface_anchors(int(opts["input_size"]), tuple(opts["strides"]),
                                float(opts["anchor_offset"]),
                                float(opts["interpolated_scale_aspect_ratio"])
                                ).astype(np.float64)
    setup = _BlazeFaceSetup(
        anchors=anchors, anchor_pairs=anchors.tolist(),
        input_size=float(opts["input_size"]), keypoints=int(opts.get("num_keypoints", 6)),
        iou_limit=float(opts.get("iou_threshold", 0.3)),
        logit_limit=_logit(float(opts["score_threshold"])), regs_index=regs_index,
        regs_spec=regs_spec, scores_spec=scores_spec,
        regs_quantised=np.dtype(regs_spec.dtype).kind in "iu" and regs_spec.scale > 0,
        scores_quantised=np.dtype(scores_spec.dtype).kind in "iu" and scores_spec.scale > 0)
    if len(_SETUPS) > 16:
        _SETUPS.clear()
    _SETUPS[id(card)] = (card, setup)
    return setup


def yolo(card: Card, outputs: list[Array], placement: Placement, threshold: float | None,
         top_k: int) -> Result:
    """Ultralytics detection head [1, 4 + classes, anchors]; boxes in input pixels."""
    from .yolo import decode

    opts = card.postprocessing.get("yolo", {})
    head = dequantize(outputs[0], card.outputs[0])[0]
    found = decode(head, threshold if threshold is not None
                   else float(opts.get("score_threshold", 0.25)),
                   float(opts.get("iou_threshold", 0.7)), int(opts.get("max_detections", 300)))
    height, width = (int(d) for d in card.inputs[0].shape[1:3])
    labels = card.labels
    detections = []
    for box, score, cls in zip(found.boxes.tolist(), found.scores.tolist(),
                               found.classes.tolist(), strict=True):
        corners = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        detections.append({"label": labels[cls] if cls < len(labels) else str(cls),
                           "score": round(float(score), 5),
                           "box": _box_to_frame(corners, placement)})
    return {"task": "yolo", "detections": detections}


def raw(card: Card, outputs: list[Array], placement: Placement, threshold: float | None,
        top_k: int) -> Result:
    summary = []
    for spec, out in zip(card.outputs, outputs, strict=True):
        values = dequantize(out, spec)
        summary.append({"name": spec.name, "shape": list(out.shape),
                        "min": round(float(values.min()), 5) if values.size else None,
                        "max": round(float(values.max()), 5) if values.size else None,
                        "mean": round(float(values.mean()), 5) if values.size else None,
                        "argmax": int(values.argmax()) if values.size else None})
    return {"task": "raw", "outputs": summary}


DECODERS: dict[str, Callable[[Card, list[Array], Placement, float | None, int], Result]] = {
    "classification": classification, "ssd": ssd, "blazeface": blazeface, "yolo": yolo,
    "raw": raw,
}


def decoder_for(card: Card) -> Callable[[Card, list[Array], Placement, float | None, int], Result]:
    return DECODERS[card.task]
