"""`invoke bench-convert`: size, accuracy and host latency of none/dynamic/float16/int8."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress


def _latency_ms(model: Path, x: np.ndarray[Any, Any], repeats: int = 300) -> float:
    from edgebake_runtime.interp import load_interpreter

    interpreter = load_interpreter(model, num_threads=1)
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


def bench_convert(progress: Progress) -> dict[str, Any]:
    from ..convert.converter import ConvertOptions, convert_model
    from ..convert.digits import train_digits_cnn

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgebake-bench-convert-") as tmp:
        paths = train_digits_cnn(Path(tmp) / "digits")
        x_val = np.load(paths["validation"])["x"]
        for mode in ("none", "dynamic", "float16", "int8"):
            out = Path(tmp) / f"digits_{mode}.tflite"
            result = convert_model(ConvertOptions(
                model=paths["model"], output=out, quantize=mode,
                representative_data=paths["representative"],
                validation_data=paths["validation"], max_accuracy_loss=1.0))
            figures[mode] = {"bytes": result.size_bytes, "accuracy": result.accuracy,
                             "latency_ms": _latency_ms(out, x_val)}
    base = figures["none"]
    for mode, f in figures.items():
        acc = f["accuracy"]
        progress.say(f"{mode:8} {f['bytes']:8d} bytes  size x{f['bytes'] / base['bytes']:.2f}  "
                     f"accuracy {acc.converted:.4f} (delta {acc.delta:+.4f})  "
                     f"host latency {f['latency_ms']:.3f} ms")
    progress.say(f"latency ratio int8/float32: "
                 f"{figures['int8']['latency_ms'] / base['latency_ms']:.2f}")
    return figures
