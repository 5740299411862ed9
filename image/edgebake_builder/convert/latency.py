"""Host latency of a converted model under a device runtime (run in a child without
TensorFlow, by `isolated.latency_ms`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


def measure_latency_ms(model: Path, x: np.ndarray[Any, Any], runtime: str,
                       repeats: int = 300) -> float:
    """Milliseconds per invoke of one sample, one thread, after a warm-up."""
    from edgebake_runtime.interp import load_interpreter

    interpreter = load_interpreter(model, num_threads=1, runtime=runtime)
    inp = interpreter.get_input_details()[0]
    scale, zero = inp["quantization"]
    sample = x[:1]
    if np.dtype(inp["dtype"]).kind in "iu" and scale:
        sample = np.clip(np.round(sample / scale + zero), -128, 127)
    sample = sample.astype(inp["dtype"])
    for _ in range(30):
        interpreter.set_tensor(inp["index"], sample)
        interpreter.invoke()
    started = time.perf_counter()
    for _ in range(repeats):
        interpreter.set_tensor(inp["index"], sample)
        interpreter.invoke()
    return (time.perf_counter() - started) / repeats * 1000
