"""Toolchains that cannot share the main venv, each in a venv of its own.

litert-torch needs numpy 2 where tflite-runtime 2.14 needs numpy 1, onnx2tf pins
TensorFlow 2.19 exactly, and MLflow (the model registry) brings a web and database stack.
Each toolchain is a venv under the cache, keyed by its pinned requirements, made on first use
(minutes, shown as it goes) and reused after that. The
project's own packages reach a toolchain's processes through their PYTHONPATH, from the
checkout that runs them: an install there would drag the main venv's pins in, and one
toolchain serves every checkout on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import edgebake_runtime

import edgebake_builder

from ..cache import cache_root
from ..errors import BuildError
from .jsonchild import run_json_child

REQUIREMENTS = Path(__file__).resolve().parent / "toolchains"
TOOLCHAINS = ("torch", "onnx2tf", "mlflow")
READY = ".edgebake-ready"


def _key(name: str) -> str:
    text = (REQUIREMENTS / f"{name}.txt").read_bytes()
    return hashlib.sha256(text + sys.version.encode()).hexdigest()[:16]


def venv_dir(name: str) -> Path:
    return cache_root() / "toolchains" / f"{name}-{_key(name)}"


def python_for(name: str, say: Any = print) -> Path:
    """The toolchain's interpreter: $EDGEBAKE_<NAME>_PYTHON, else the cached venv, made now
    if it is not there yet."""
    override = os.environ.get(f"EDGEBAKE_{name.upper()}_PYTHON")
    if override:
        if not Path(override).is_file():
            raise BuildError(f"EDGEBAKE_{name.upper()}_PYTHON: {override} is not a file")
        return Path(override)
    target = venv_dir(name)
    if not (target / READY).is_file():
        _make(name, target, say)
    return target / "bin" / "python"


def _source_roots() -> list[Path]:
    roots = [Path(edgebake_builder.__file__).resolve().parents[1],
             Path(edgebake_runtime.__file__).resolve().parents[1]]
    for root in roots:
        if (root / "numpy").is_dir():
            raise BuildError(f"the {root} site-packages would leak the main venv's numpy into a "
                             "converter toolchain; run convert-model from a source checkout")
    return list(dict.fromkeys(roots))


def _make(name: str, target: Path, say: Any) -> None:
    """Create the venv beside its final place and rename it there: an interrupted install
    leaves no venv that looks ready."""
    target.parent.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    say(f"      installing the {name} toolchain into {target} (once; a few minutes, "
        "1-8 GB)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _run([sys.executable, "-m", "venv", str(tmp)], name)
        py = tmp / "bin" / "python"
        _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "-r", str(REQUIREMENTS / f"{name}.txt")], name)
        (tmp / READY).write_text(json.dumps({"seconds": round(time.monotonic() - began)}))
        shutil.rmtree(target, ignore_errors=True)
        # a venv records its own path in its scripts; python -m works from the renamed one
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"      {name} toolchain ready in {time.monotonic() - began:.0f}s")


def _run(cmd: list[str], name: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise BuildError(f"installing the {name} toolchain failed: {tail[0][:300]}")


def call(name: str, module: str, action: str, payload: dict[str, Any],
         say: Any = print) -> dict[str, Any]:
    """Run `python -m module action payload` in the toolchain; the last JSON line of its
    output is the answer, and an answer with "error" becomes a one-line BuildError."""
    python = python_for(name, say)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(str(root) for root in _source_roots()),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "YOLO_OFFLINE": "1"}
    return run_json_child([str(python), "-m", module, action, json.dumps(payload)], env,
                          f"{action} in the {name} toolchain", 3600)
