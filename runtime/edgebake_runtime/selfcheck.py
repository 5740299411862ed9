"""Runs a model's golden inputs with this machine's TFLite runtime and compares the outputs.

The builder runs it inside the target rootfs before assembling the image; a unit can run it
again before it swaps in a new model. Prints one JSON line; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .card import CardError, load_card
from .interp import ModelError, load_interpreter, op_names, runtime_name_and_version


def check_model(model: Path, card_path: Path, runtime: str | None = None) -> dict[str, Any]:
    """Return a result dict with `ok`, the runtime, and the largest deviation seen."""
    try:
        name, version = runtime_name_and_version(runtime)
    except ModelError as exc:
        return {"ok": False, "runtime": runtime, "model": str(model), "error": str(exc)}
    result: dict[str, Any] = {"ok": False, "runtime": name, "runtime_version": version,
                              "model": str(model)}
    try:
        card = load_card(card_path)
        result["ops"] = op_names(load_interpreter(model, plain_ops=True, runtime=name))
        # golden outputs come from the interpreter the service uses (default delegates)
        interpreter = load_interpreter(model, num_threads=1, runtime=name)
    except (CardError, ModelError) as exc:
        result["error"] = str(exc)
        return result
    golden = card.data.get("golden")
    if not golden:
        result["error"] = f"{card_path}: golden: missing, nothing to compare"
        return result
    arrays = np.load(card_path.parent / golden["file"])
    in_index = interpreter.get_input_details()[0]["index"]
    outputs = interpreter.get_output_details()
    atol, rtol = float(golden["atol"]), float(golden["rtol"])
    worst: dict[str, Any] = {"abs": 0.0, "output": "", "case": -1}
    for k in range(int(golden["count"])):
        interpreter.set_tensor(in_index, arrays[f"input_{k}"])
        interpreter.invoke()
        for j, out in enumerate(outputs):
            got = interpreter.get_tensor(out["index"]).astype(np.float64)
            want = arrays[f"output_{k}_{j}"].astype(np.float64)
            if got.shape != want.shape:
                result["error"] = (f"output {out['name']}: shape {list(got.shape)} differs from "
                                   f"the host's {list(want.shape)}")
                return result
            excess = np.abs(got - want) - (atol + rtol * np.abs(want))
            deviation = float(np.max(np.abs(got - want))) if got.size else 0.0
            if deviation > float(worst["abs"]):
                worst = {"abs": deviation, "output": str(out["name"]), "case": k}
            if got.size and float(np.max(excess)) > 0:
                result["error"] = (f"golden case {k}, output {out['name']}: largest deviation "
                                   f"{deviation:.6g} exceeds atol {atol:g} + rtol {rtol:g}")
                result["max_deviation"] = worst
                return result
    result.update(ok=True, max_deviation=worst, cases=int(golden["count"]))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--card", type=Path, required=True)
    parser.add_argument("--runtime", default=None,
                        help="tflite-runtime or ai-edge-litert (default: the one installed)")
    args = parser.parse_args(argv)
    result = check_model(args.model, args.card, args.runtime)
    print(json.dumps(result, sort_keys=True))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
