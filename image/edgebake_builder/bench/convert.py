"""`invoke bench-convert`: size, accuracy and host latency of none/dynamic/float16/int8."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress


def bench_convert(progress: Progress) -> dict[str, Any]:
    """A Keras 3 model trained in the run by the current TensorFlow, converted four ways."""
    import json

    from ..convert import isolated
    from ..convert.converter import ConvertOptions, convert_model
    from ..convert.keras_source import import_tensorflow
    from ..steps.model import RUNTIME_PREFERENCE, choose_runtime
    from .digits import train_digits_cnn

    tf = import_tensorflow()
    keras = getattr(tf.keras, "__version__", "?")
    progress.say(f"TensorFlow {tf.__version__}, Keras {keras}: digits CNN trained in this run")

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
            card = json.loads(result.card_path.read_text())
            ms, measured_with = isolated.latency_ms(out, x_val)
            auto = choose_runtime("auto", card, list(RUNTIME_PREFERENCE), "3.11")
            figures[mode] = {"bytes": result.size_bytes, "accuracy": result.accuracy,
                             "latency_ms": ms, "latency_runtime": measured_with,
                             "auto": auto.name}
    base = figures["none"]
    for mode, f in figures.items():
        acc = f["accuracy"]
        progress.say(f"{mode:8} {f['bytes']:8d} bytes  size x{f['bytes'] / base['bytes']:.2f}  "
                     f"accuracy {acc.converted:.4f} (delta {acc.delta:+.4f})  "
                     f"host latency {f['latency_ms']:.3f} ms ({f['latency_runtime']})  "
                     f"auto picks {f['auto']}")
    progress.say(f"latency ratio int8/float32: "
                 f"{figures['int8']['latency_ms'] / base['latency_ms']:.2f}")
    return figures
