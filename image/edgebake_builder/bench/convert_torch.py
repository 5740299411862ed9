"""`invoke bench-convert`'s PyTorch and ONNX rows: ResNet18 through litert-torch (.pt2) and
through onnx2tf (.onnx), and YOLO11n through onnx2tf, in each quantisation: size against
float32, accuracy or agreement against the source framework, host latency, conversion time."""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..progress import Progress

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CASES = (("resnet18.pt2", "litert-torch", ("none", "float16", "dynamic", "int8")),
         ("resnet18.onnx", "onnx2tf", ("none", "float16", "dynamic", "int8")),
         ("yolo11n.onnx", "onnx2tf", ("none", "float16", "int8")))


def _yolo_frames(path: Path, size: int) -> Path:
    """Representative frames for YOLO11n: scikit-image's photographs, letterboxed on grey."""
    import skimage.data
    from PIL import Image

    frames = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        image.thumbnail((size, size))
        canvas = Image.new("RGB", (size, size), (114, 114, 114))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        frames.append(np.asarray(canvas, np.float32) / 255.0)
    np.savez(path, x=np.stack(frames).transpose(0, 3, 1, 2))
    return path


def bench_foreign(progress: Progress) -> list[dict[str, Any]]:
    from ..convert import isolated
    from ..convert.converter import ConvertOptions, convert_model
    from ..examples.models import make_examples

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgebake-bench-torch-") as tmp:
        work = Path(tmp)
        progress.say("example models: ResNet18 fine-tuned on digits, YOLO11n untrained")
        make_examples(work, say=progress.say)
        yolo_rep = _yolo_frames(work / "yolo_rep.npz", 320)
        x_val = np.load(work / "val.npz")["x"].transpose(0, 2, 3, 1)
        for model, converter, modes in CASES:
            is_yolo = model.startswith("yolo")
            for mode in modes:
                out = work / f"{Path(model).stem}_{converter}_{mode}.tflite"
                began = time.monotonic()
                result = convert_model(ConvertOptions(
                    model=work / model, output=out, quantize=mode, converter=converter,
                    representative_data=yolo_rep if is_yolo else work / "rep.npz",
                    validation_data=None if is_yolo else work / "val.npz",
                    labels=work / "coco.txt" if is_yolo else None,
                    mean=None if is_yolo else MEAN, std=None if is_yolo else STD,
                    max_accuracy_loss=1.0), Progress(4, stream=io.StringIO()))
                seconds = time.monotonic() - began
                sample = np.load(yolo_rep)["x"].transpose(0, 2, 3, 1) if is_yolo else x_val
                ms, runtime = isolated.latency_ms(out, sample)
                card = json.loads(result.card_path.read_text())
                row = {"model": model, "converter": converter, "mode": mode,
                       "bytes": result.size_bytes, "seconds": round(seconds, 1),
                       "latency_ms": round(ms, 3), "runtime": runtime,
                       "accuracy": card["accuracy"]}
                rows.append(row)
                progress.say(_line(row, rows))
    return rows


def _line(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    base = next(r for r in rows if r["model"] == row["model"] and
                r["converter"] == row["converter"] and r["mode"] == "none")
    acc = row["accuracy"] or {}
    if acc.get("data") == "validation":
        quality = (f"accuracy {acc['converted']:.4f} (delta {acc['delta']:+.4f}, "
                   f"agreement {acc['top1_agreement']:.3f})")
    else:
        quality = (f"agreement {acc.get('top1_agreement', 0):.3f} on synthetic frames, "
                   f"max |dev| {acc.get('max_abs_deviation', 0):.3g}")
    return (f"{row['model']:14} {row['converter']:12} {row['mode']:8} {row['bytes']:9d} B  "
            f"x{row['bytes'] / base['bytes']:.2f}  {quality}  host "
            f"{row['latency_ms']:.2f} ms ({row['runtime']})  converted in {row['seconds']:.0f}s "
            f"(latency x{row['latency_ms'] / base['latency_ms']:.2f})")
