"""Loads a TFLite interpreter from tflite-runtime, or ai-edge-litert where only that is present."""

from __future__ import annotations

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
