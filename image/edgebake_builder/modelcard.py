"""Writes a model card for any .tflite by inspecting it with the interpreter, plus golden I/O."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from edgebake_runtime.card import CARD_FORMAT
from edgebake_runtime.interp import (
    ModelError,
    installed_runtimes,
    load_interpreter,
    op_names,
    probe_model,
    runtime_name_and_version,
)

from . import __version__
from .errors import BuildError

# Ops that tflite-runtime cannot run: a model using them fails on the device, so fail the build.
UNSUPPORTED_OP_PREFIXES = ("Flex", "FlexDelegate")
GOLDEN_COUNT = 3
INTEGER_STEPS = 4.0  # golden tolerance of integer outputs, in quantisation steps

# BlazeFace variants, told apart by their anchor count (MediaPipe's published anchor options).
BLAZEFACE_VARIANTS: dict[int, dict[str, Any]] = {
    896: {"variant": "short_range", "input_size": 128, "strides": [8, 16, 16, 16],
          "interpolated_scale_aspect_ratio": 1.0, "anchor_offset": 0.5,
          "score_threshold": 0.5, "iou_threshold": 0.3, "num_keypoints": 6},
    2304: {"variant": "full_range", "input_size": 192, "strides": [4],
           "interpolated_scale_aspect_ratio": 0.0, "anchor_offset": 0.5,
           "score_threshold": 0.6, "iou_threshold": 0.3, "num_keypoints": 6},
}


def _tensor_json(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return {"name": str(detail["name"]), "shape": [int(x) for x in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name,
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)}}


def guess_task(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
               ops: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Task, preprocessing and postprocessing from the tensor layout (a card can override)."""
    shape = inputs[0]["shape"]
    size = [shape[1], shape[2]] if len(shape) == 4 else []
    pre: dict[str, Any] = {"size": size, "layout": "NHWC", "range": [0.0, 1.0]}
    if inputs[0]["dtype"] in ("uint8", "int8"):
        pre = {"size": size, "layout": "NHWC", "range": [0.0, 255.0]}
    if "TFLite_Detection_PostProcess" in ops and len(outputs) == 4:
        return "ssd", pre, {"ssd": {"score_threshold": 0.5}}
    if len(outputs) == 2:
        a, b = outputs[0]["shape"], outputs[1]["shape"]
        if len(a) == 3 and len(b) == 3 and a[1] == b[1] and a[1] in BLAZEFACE_VARIANTS:
            opts = dict(BLAZEFACE_VARIANTS[a[1]])
            if a[2] == 16 and b[2] == 1 and size == [opts["input_size"]] * 2:
                return "blazeface", {**pre, "range": [-1.0, 1.0]}, {"blazeface": opts}
    if len(outputs) == 1 and len(outputs[0]["shape"]) == 2:
        return "classification", pre, {"classification": {"top_k": 3}}
    return "raw", pre, {}


def golden_inputs(spec: dict[str, Any], count: int) -> list[np.ndarray[Any, Any]]:
    """Deterministic, image-like inputs spanning the input's range (no RNG version drift)."""
    shape = tuple(spec["shape"])
    n = int(np.prod(shape))
    arrays = []
    for k in range(count):
        ramp = (np.arange(n, dtype=np.uint64) * np.uint64(2 * k + 7919)) % np.uint64(1009)
        unit = ramp.astype(np.float64) / 1008.0
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            arr = (unit * 2.0 - 1.0).astype(dtype)
        else:
            info = np.iinfo(dtype)
            arr = (info.min + unit * (int(info.max) - int(info.min))).round().astype(dtype)
        arrays.append(arr.reshape(shape))
    return arrays


def run_golden(model: Path, runtime: str, count: int = GOLDEN_COUNT
               ) -> tuple[bytes, dict[str, Any]]:
    """Run golden inputs on the host; return an .npz blob and the tolerance it must be met to."""
    interpreter = load_interpreter(model, num_threads=1, runtime=runtime)
    in_detail = interpreter.get_input_details()[0]
    out_details = interpreter.get_output_details()
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for k, x in enumerate(golden_inputs(_tensor_json(in_detail), count)):
        interpreter.set_tensor(in_detail["index"], x)
        interpreter.invoke()
        arrays[f"input_{k}"] = x
        for j, out in enumerate(out_details):
            arrays[f"output_{k}_{j}"] = np.array(interpreter.get_tensor(out["index"]))
    integer_out = all(np.dtype(o["dtype"]).kind in "iu" for o in out_details)
    # Integer outputs: a few steps of rounding apart between XNNPACK's x86 and Arm kernels
    # on a deep network (ResNet18 int8: 2 on the unit's runtime under qemu-user); a wrong
    # runtime or a damaged model is off by far more.
    tolerance = {"atol": INTEGER_STEPS if integer_out else 1e-3,
                 "rtol": 0.0 if integer_out else 1e-3,
                 "exact": False}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), tolerance


def reference_runtime(model: Path) -> str:
    """The installed runtime that the gate, the golden outputs and so every other runtime's
    check are measured with: ai-edge-litert first, the maintained one. tflite-runtime 2.14
    loads some newer models and silently computes them wrong (ai-edge-quantizer's dynamic
    range models give a tenth of their accuracy): its golden outputs cannot be the
    reference. Probed in a child: a bad file can crash it."""
    errors = []
    runtimes = sorted(installed_runtimes(), key=lambda name: name != "ai-edge-litert")
    if not runtimes:
        raise BuildError("no TFLite runtime on this host: pip install tflite-runtime or "
                         "ai-edge-litert")
    for runtime in runtimes:
        try:
            probe_model(model, runtime=runtime)
            return runtime
        except ModelError as exc:
            errors.append(str(exc))
    raise BuildError(errors[0] if len(set(errors)) == 1 or "crashed" in errors[0]
                     else "; ".join(errors))


def check_runtimes(model: Path, card_path: Path) -> dict[str, dict[str, Any]]:
    """Which device runtimes load the model and reproduce its golden outputs, each in a child."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    results = {}
    for runtime in installed_runtimes():
        proc = subprocess.run([sys.executable, "-m", "edgebake_runtime.selfcheck", "--model",
                               str(model), "--card", str(card_path), "--runtime", runtime],
                              capture_output=True, text=True, env=env, timeout=300, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if lines:
            report = json.loads(lines[-1])
        else:
            report = {"ok": False, "error": f"self-check exited {proc.returncode}"}
        results[runtime] = {"version": report.get("runtime_version"), "ok": bool(report["ok"]),
                            "error": report.get("error"),
                            "max_deviation": (report.get("max_deviation") or {}).get("abs")}
    return results


def inspect_model(model: Path, name: str | None = None,
                  extra: dict[str, Any] | None = None, reference: str | None = None
                  ) -> dict[str, Any]:
    """Build the card fields that come from the file itself."""
    reference = reference or reference_runtime(model)
    try:
        plain = load_interpreter(model, plain_ops=True, runtime=reference)
    except ModelError as exc:
        raise BuildError(str(exc)) from None
    ops = op_names(plain)
    flex = [op for op in ops if op.startswith(UNSUPPORTED_OP_PREFIXES)]
    if flex:
        raise BuildError(f"{model}: uses ops no TFLite runtime on a unit can run (they need "
                         f"TensorFlow): {', '.join(flex)}; "
                         "convert without SELECT_TF_OPS (builtin ops only)")
    inputs = [_tensor_json(d) for d in plain.get_input_details()]
    outputs = [_tensor_json(d) for d in plain.get_output_details()]
    if len(inputs) != 1:
        raise BuildError(f"{model}: has {len(inputs)} inputs; edgebake runs single-input models")
    task, pre, post = guess_task(inputs, outputs, ops)
    data = model.read_bytes()
    runtime_version = runtime_name_and_version(reference)[1]
    card: dict[str, Any] = {
        "format": CARD_FORMAT,
        "name": name or model.stem,
        "file": model.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "task": task,
        "inputs": inputs,
        "outputs": outputs,
        "ops": ops,
        "labels": [],
        "preprocessing": pre,
        "postprocessing": post,
        "tools": {"edgebake": __version__, reference: runtime_version},
        "accuracy": None,
    }
    card["version"] = f"{card['name']}@{card['sha256'][:12]}"
    if extra:
        tools = {**extra.get("tools", {}), **card["tools"]}
        card.update(extra)
        card["tools"] = tools
    return card


def write_card(model: Path, card_path: Path, name: str | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Inspect `model`, compute golden outputs, and write card + golden file next to each other."""
    from .cache import atomic_path

    reference = reference_runtime(model)
    card = inspect_model(model, name=name, extra=extra, reference=reference)
    blob, tolerance = run_golden(model, reference)
    golden_path = card_path.with_name(card_path.name.replace(".card.json", "") + ".golden.npz")
    with atomic_path(golden_path) as tmp:
        tmp.write_bytes(blob)
    card["golden"] = {"file": golden_path.name, "count": GOLDEN_COUNT, **tolerance,
                      "sha256": hashlib.sha256(blob).hexdigest(), "runtime": reference}
    for with_runtimes in (False, True):
        if with_runtimes:
            card["runtimes"] = check_runtimes(model, card_path)
        with atomic_path(card_path) as tmp:
            tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return card
