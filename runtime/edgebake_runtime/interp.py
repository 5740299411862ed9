"""Loads a TFLite interpreter from tflite-runtime, or ai-edge-litert where only that is present."""

from __future__ import annotations

import importlib
import importlib.util
import mmap
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .flatbuf import truncation

TFLITE_MAGIC = b"TFL3"


class ModelError(Exception):
    """The model file cannot be used; the message says why in one line."""


# Distribution name -> import name, in the order a unit prefers them.
RUNTIMES: dict[str, str] = {"tflite-runtime": "tflite_runtime", "ai-edge-litert": "ai_edge_litert"}
# Forces one runtime where both are installed (the builder's host checks); a unit has only one.
RUNTIME_ENV = "EDGEBAKE_TFLITE_RUNTIME"


def _runtime_package(runtime: str | None = None) -> tuple[str, Any]:
    """The runtime to use: the one asked for (argument or environment), else the first present."""
    wanted = runtime or os.environ.get(RUNTIME_ENV) or None
    names = [wanted] if wanted else list(RUNTIMES)
    for name in names:
        if name not in RUNTIMES:
            raise ModelError(f"unknown TFLite runtime {name!r}: expected one of "
                             f"{', '.join(RUNTIMES)}")
        try:
            return name, importlib.import_module(RUNTIMES[name])
        except ImportError:
            continue
    raise ModelError(f"no TFLite runtime installed: need {' or '.join(names)}")


def installed_runtimes() -> list[str]:
    """The runtimes importable here, without importing them."""
    return [name for name, module in RUNTIMES.items() if importlib.util.find_spec(module)]


def runtime_name_and_version(runtime: str | None = None) -> tuple[str, str]:
    name, package = _runtime_package(runtime)
    return name, str(getattr(package, "__version__", "unknown"))


def _interpreter_module(runtime: str | None = None) -> Any:
    name, _ = _runtime_package(runtime)
    return importlib.import_module(RUNTIMES[name] + ".interpreter")


def check_tflite_file(path: Path) -> None:
    """Cheap checks before the interpreter sees the file: exists, readable, TFLite magic, and
    every top-level part within the file."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model: {exc.strerror}") from None
    if len(head) < 8 or head[4:8] != TFLITE_MAGIC:
        raise ModelError(f"{path}: not a TFLite model (no TFL3 flatbuffer identifier)")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cut = truncation(data)
    if cut is not None:
        raise ModelError(f"{path}: the file is truncated or corrupt: {cut} lies past its end "
                         f"({path.stat().st_size} bytes)")


def load_interpreter(path: Path, num_threads: int = 1, plain_ops: bool = False,
                     runtime: str | None = None) -> Any:
    """Create and allocate an interpreter; unresolved or corrupt models become ModelError.

    `plain_ops` disables the default XNNPACK delegate so the op list shows the model's own ops.
    """
    check_tflite_file(path)
    module = _interpreter_module(runtime)
    kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": num_threads}
    if plain_ops:
        kwargs["experimental_op_resolver_type"] = \
            module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interpreter = module.Interpreter(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()
        name, version = runtime_name_and_version(runtime)
        raise ModelError(f"{path}: {name} {version} cannot load this model: "
                         f"{first[0] if first else type(exc).__name__}") from None
    return interpreter


def op_names(interpreter: Any) -> list[str]:
    """Sorted distinct op names (needs an interpreter made with plain_ops=True)."""
    return sorted({str(op["op_name"]) for op in interpreter._get_ops_details()})


PROBE_SOURCE = """
import sys
from pathlib import Path
sys.path[:0] = {paths!r}
from edgebake_runtime.interp import ModelError, load_interpreter
try:
    for plain in (True, False):  # the op list, then the way the service runs it (XNNPACK)
        load_interpreter(Path(sys.argv[1]), plain_ops=plain, runtime=sys.argv[2] or None)
except ModelError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def probe_model(path: Path, timeout: float = 120.0, runtime: str | None = None) -> None:
    """Load the model once in a child process: a malformed flatbuffer can crash the TFLite
    runtime outright, and that must become an error message, not a dead service."""
    check_tflite_file(path)
    package_root = str(Path(__file__).resolve().parents[1])
    code = PROBE_SOURCE.format(paths=[package_root])
    try:
        result = subprocess.run([sys.executable, "-c", code, str(path), runtime or ""],
                                capture_output=True,
                                text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ModelError(f"{path}: loading the model took over {timeout:.0f}s") from None
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        raise ModelError(f"{path}: the TFLite runtime crashed ({name}) loading this model; "
                         "the file is corrupt or not a valid TFLite flatbuffer")
    if result.returncode != 0:
        lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith("INFO:")]
        raise ModelError(lines[-1] if lines else f"{path}: model probe failed "
                         f"(exit {result.returncode})")
