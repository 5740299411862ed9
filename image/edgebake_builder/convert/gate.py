"""The accuracy gate: the converted model against the original, on the same validation data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgebake_runtime.interp import load_interpreter

from ..errors import BuildError


@dataclass(frozen=True)
class Accuracy:
    metric: str  # "accuracy" with labels, else "top1_agreement"
    reference: float
    converted: float
    samples: int
    top1_agreement: float = 1.0  # the converted model's top-1 equal to the source's
    max_abs_deviation: float = 0.0  # largest |converted - source| over every output value
    data: str = "validation"  # or "synthetic": no data given, figures shown, not enforced

    @property
    def delta(self) -> float:
        return round(self.reference - self.converted, 6)

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "reference": round(self.reference, 6),
                "converted": round(self.converted, 6), "delta": self.delta,
                "samples": self.samples, "top1_agreement": round(self.top1_agreement, 6),
                "max_abs_deviation": round(self.max_abs_deviation, 6), "data": self.data}


def tflite_predict(model: Path, x: np.ndarray[Any, Any], runtime: str | None = None
                   ) -> np.ndarray[Any, Any]:
    """Run every sample through the TFLite model (quantising int8 inputs); return scores."""
    interpreter = load_interpreter(model, num_threads=2, runtime=runtime)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    in_dtype = np.dtype(inp["dtype"])
    rows = []
    for sample in x:
        batch = sample[None, ...]
        if in_dtype.kind in "iu" and in_scale:
            info = np.iinfo(in_dtype)
            batch = np.clip(np.round(batch / in_scale + in_zero), info.min, info.max)
        interpreter.set_tensor(inp["index"], batch.astype(in_dtype))
        interpreter.invoke()
        scores = interpreter.get_tensor(out["index"])[0].astype(np.float32)
        if np.dtype(out["dtype"]).kind in "iu" and out_scale:
            scores = (scores - out_zero) * out_scale
        rows.append(scores.reshape(-1))
    return np.stack(rows)


def measure(reference_scores: np.ndarray[Any, Any], converted_scores: np.ndarray[Any, Any],
            labels: np.ndarray[Any, Any] | None) -> Accuracy:
    ref = reference_scores.reshape(len(reference_scores), -1)
    new = converted_scores.reshape(len(converted_scores), -1)
    if ref.shape != new.shape:
        raise BuildError(f"the converted model gives {new.shape[1]} values per sample, the "
                         f"source model {ref.shape[1]}")
    ref_top, new_top = ref.argmax(axis=1), new.argmax(axis=1)
    agreement = float((ref_top == new_top).mean())
    deviation = float(np.abs(ref - new).max())
    if labels is not None:
        return Accuracy("accuracy", float((ref_top == labels).mean()),
                        float((new_top == labels).mean()), len(labels), agreement, deviation)
    return Accuracy("top1_agreement", 1.0, agreement, len(ref_top), agreement, deviation)
