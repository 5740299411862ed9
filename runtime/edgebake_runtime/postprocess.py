"""Turns output tensors into results: top-k classes, SSD or BlazeFace detections, or summaries."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from .card import Card, TensorSpec
from .preprocess import Placement

Result = dict[str, Any]
Array = np.ndarray[Any, Any]


def dequantize(values: Array, spec: TensorSpec) -> Array:
    if values.dtype.kind in "iu" and spec.scale > 0:
        return (values.astype(np.float32) - spec.zero_point) * spec.scale
    return values.astype(np.float32, copy=False)


def classification(card: Card, outputs: list[Array], placement: Placement,
                   threshold: float | None, top_k: int) -> Result:
    scores = dequantize(outputs[0], card.outputs[0]).reshape(-1)
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
    opts = card.postprocessing["blazeface"]
    specs = card.outputs
    regs_i = 0 if outputs[0].shape[-1] == 16 else 1
    regs = dequantize(outputs[regs_i], specs[regs_i])[0]
    raw_scores = dequantize(outputs[1 - regs_i], specs[1 - regs_i]).reshape(-1)
    size = float(opts["input_size"])
    anchors = blazeface_anchors(int(opts["input_size"]), tuple(opts["strides"]),
                                float(opts["anchor_offset"]),
                                float(opts["interpolated_scale_aspect_ratio"]))
    if anchors.shape[0] != raw_scores.size:
        raise ValueError(f"card anchors ({anchors.shape[0]}) do not match the model's "
                         f"{raw_scores.size} outputs")
    limit = threshold if threshold is not None else float(opts["score_threshold"])
    # The sigmoid is monotonic: compare the logits with the threshold's logit and take the
    # sigmoid of the few anchors kept, not of all of them.
    keep = np.nonzero(raw_scores >= _logit(limit))[0]
    if keep.size == 0:
        return {"task": "blazeface", "detections": []}
    kept_scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores[keep].astype(np.float64),
                                                -100.0, 100.0)))
    r = regs[keep]
    a = anchors[keep]
    centre = r[:, :2] / size + a
    half = r[:, 2:4] / (2 * size)
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    n_kp = int(opts.get("num_keypoints", 6))
    kps = r[:, 4:4 + 2 * n_kp].reshape(-1, n_kp, 2) / size + a[:, None, :]
    order = np.argsort(-kept_scores)
    boxes, kps, s = boxes[order], kps[order], kept_scores[order]
    detections: list[dict[str, Any]] = []
    iou_limit = float(opts.get("iou_threshold", 0.3))
    remaining = np.arange(len(s))
    while remaining.size and len(detections) < max(top_k, 1) * 10:
        first = remaining[0]
        overlap = _iou(boxes[first], boxes[remaining]) > iou_limit
        group = remaining[overlap]
        weights = s[group]
        total = float(weights.sum())
        box = (weights @ boxes[group]) / total
        kp = np.tensordot(weights, kps[group], axes=1) / total
        detections.append({
            "label": "face", "score": round(float(s[first]), 5),
            "box": _box_to_frame((float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                                 placement),
            "keypoints": [[round(c, 4) for c in placement.to_frame(float(x), float(y))]
                          for x, y in kp.tolist()]})
        remaining = remaining[~overlap]
    return {"task": "blazeface", "detections": detections}


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
    "classification": classification, "ssd": ssd, "blazeface": blazeface, "raw": raw,
}


def decoder_for(card: Card) -> Callable[[Card, list[Array], Placement, float | None, int], Result]:
    return DECODERS[card.task]
