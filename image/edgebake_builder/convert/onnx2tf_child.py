"""The onnx2tf toolchain's side of convert-model: .onnx -> float32 NHWC .tflite.

Runs as `python -m` in the onnx2tf venv (TensorFlow 2.19, as onnx2tf pins it) and answers
one JSON line. Two things make its output run on TFLite builtins only, offline:
- `Constant` nodes become initializers first. onnx2tf treats a Constant's value as a
  tensor computed at run time, so a Split whose sizes come from one becomes FlexSplitV,
  which no unit can run (Ultralytics' YOLO exports have 29 of them).
- onnx2tf checks image models against a sample file it would download; the file is written
  into its working folder from deterministic data instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def constants_as_initializers(model: Any) -> int:
    """Move every plain `Constant` node's value into the graph's initializers."""
    import onnx

    kept = []
    moved = 0
    for node in model.graph.node:
        attrs = list(node.attribute)
        if node.op_type == "Constant" and len(attrs) == 1 and attrs[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attrs[0].t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return moved


@contextlib.contextmanager
def _working_folder() -> Any:
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="edgebake-onnx2tf-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(here)


def convert(payload: dict[str, Any]) -> dict[str, Any]:
    import onnx

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import onnx2tf
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    source = Path(payload["model"]).resolve()
    with _working_folder() as work:
        model = onnx.load(str(source))
        moved = constants_as_initializers(model)
        prepared = work / "model.onnx"
        onnx.save(model, str(prepared))
        samples = np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32)
        np.save(work / SAMPLE_FILE, samples)
        options: dict[str, Any] = {}
        if payload.get("input_shape"):
            name = model.graph.input[0].name
            options["overwrite_input_shape"] = [
                f"{name}:{','.join(str(d) for d in payload['input_shape'])}"]
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):
                onnx2tf.convert(input_onnx_file_path=str(prepared),
                                output_folder_path=str(work / "out"), non_verbose=True,
                                output_signaturedefs=True,
                                **options)
        except (Exception, SystemExit) as exc:
            errors = [ANSI.sub("", ln).replace("ERROR:", "").strip()
                      for ln in said.getvalue().splitlines() if "ERROR" in ln]
            text = errors[:2] or str(exc).strip().splitlines() or [type(exc).__name__]
            return {"error": f"{source}: onnx2tf cannot convert it: {' '.join(text)[:300]}"}
        produced = work / "out" / "model_float32.tflite"
        if not produced.is_file():
            return {"error": f"{source}: onnx2tf wrote no float32 model"}
        shutil.copyfile(produced, payload["out"])
    return {"converter": "onnx2tf", "version": str(onnx2tf.__version__),
            "constants_moved": moved}


if __name__ == "__main__":
    action, raw = sys.argv[1], json.loads(sys.argv[2])
    answer = convert(raw) if action == "convert" else {"error": f"unknown action {action}"}
    sys.stdout.flush()
    print(json.dumps(answer))
