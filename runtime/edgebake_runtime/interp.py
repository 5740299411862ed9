"""Loads a TFLite interpreter from tflite-runtime, or ai-edge-litert where only that is present."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

TFLITE_MAGIC = b"TFL3"


class ModelError(Exception):
    """The model file cannot be used; the message says why in one line."""


def runtime_name_and_version() -> tuple[str, str]:
    try:
        import tflite_runtime

        return "tflite-runtime", str(tflite_runtime.__version__)
    except ImportError:
        import ai_edge_litert

        return "ai-edge-litert", str(getattr(ai_edge_litert, "__version__", "unknown"))


def _interpreter_class() -> Any:
    try:
        from tflite_runtime.interpreter import Interpreter
    except ImportError:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ModelError("no TFLite runtime installed: need tflite-runtime or "
                             "ai-edge-litert") from None
    return Interpreter


def _op_resolver_without_delegates() -> Any:
    try:
        from tflite_runtime.interpreter import OpResolverType
    except ImportError:
        from ai_edge_litert.interpreter import OpResolverType
    return OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def check_tflite_file(path: Path) -> None:
    """Cheap checks before the interpreter sees the file: exists, readable, TFLite magic."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read model: {exc.strerror}") from None
    if len(head) < 8 or head[4:8] != TFLITE_MAGIC:
        raise ModelError(f"{path}: not a TFLite model (no TFL3 flatbuffer identifier)")


def load_interpreter(path: Path, num_threads: int = 1, plain_ops: bool = False) -> Any:
    """Create and allocate an interpreter; unresolved or corrupt models become ModelError.

    `plain_ops` disables the default XNNPACK delegate so the op list shows the model's own ops.
    """
    check_tflite_file(path)
    interpreter_class = _interpreter_class()
    kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": num_threads}
    if plain_ops:
        kwargs["experimental_op_resolver_type"] = _op_resolver_without_delegates()
    try:
        interpreter = interpreter_class(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()
        raise ModelError(f"{path}: the TFLite runtime cannot load this model: "
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
    load_interpreter(Path(sys.argv[1]), plain_ops=True)
except ModelError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
"""


def probe_model(path: Path, timeout: float = 120.0) -> None:
    """Load the model once in a child process: a malformed flatbuffer can crash the TFLite
    runtime outright, and that must become an error message, not a dead service."""
    check_tflite_file(path)
    package_root = str(Path(__file__).resolve().parents[1])
    code = PROBE_SOURCE.format(paths=[package_root])
    try:
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
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
