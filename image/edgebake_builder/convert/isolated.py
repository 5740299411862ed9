"""Device-runtime work for the converter, run in a child process without TensorFlow.

TensorFlow and tflite-runtime each carry their own TFLite build; loaded into one process, the
older one fails on models it loads fine alone ("vector::reserve"). The unit never has TensorFlow,
so the gate and the card are computed the way the unit would: in a process without it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BuildError
from .jsonchild import run_json_child


def _child(action: str, payload: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return run_json_child([sys.executable, "-m", "edgebake_builder.convert.isolated", action,
                           json.dumps(payload)], env, f"{action} in a child process", 1800)


def predict(model: Path, x: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], str]:
    """Scores of every sample under the first runtime that loads the model, and its name."""
    with tempfile.TemporaryDirectory(prefix="edgebake-gate-") as tmp:
        inputs, outputs = Path(tmp) / "x.npy", Path(tmp) / "scores.npy"
        np.save(inputs, x)
        result = _child("predict", {"model": str(model), "x": str(inputs), "out": str(outputs)})
        return np.load(outputs), str(result["runtime"])


def latency_ms(model: Path, x: np.ndarray[Any, Any]) -> tuple[float, str]:
    """Host latency of one inference under the first runtime that loads the model."""
    with tempfile.TemporaryDirectory(prefix="edgebake-latency-") as tmp:
        inputs = Path(tmp) / "x.npy"
        np.save(inputs, x[:1])
        result = _child("latency", {"model": str(model), "x": str(inputs)})
        return float(result["ms"]), str(result["runtime"])


def write_card(model: Path, card_path: Path, name: str, extra: dict[str, Any]
               ) -> dict[str, Any]:
    """modelcard.write_card, in a child; returns the card it wrote."""
    _child("card", {"model": str(model), "card": str(card_path), "name": name, "extra": extra})
    card: dict[str, Any] = json.loads(card_path.read_text(encoding="utf-8"))
    return card


def _main(action: str, payload: dict[str, Any]) -> dict[str, Any]:
    from edgebake_runtime.interp import ModelError

    from ..modelcard import reference_runtime
    from ..modelcard import write_card as write_card_here
    from .gate import tflite_predict

    model = Path(payload["model"])
    try:
        if action == "latency":
            from .latency import measure_latency_ms

            runtime = reference_runtime(model)
            return {"runtime": runtime,
                    "ms": measure_latency_ms(model, np.load(payload["x"]), runtime)}
        if action == "predict":
            runtime = reference_runtime(model)
            scores = tflite_predict(model, np.load(payload["x"]), runtime)
            np.save(payload["out"], scores)
            return {"runtime": runtime}
        write_card_here(model, Path(payload["card"]), name=payload["name"],
                        extra=payload["extra"])
        return {}
    except (BuildError, ModelError) as exc:
        return {"error": str(exc)}


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1], json.loads(sys.argv[2]))))
