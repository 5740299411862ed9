"""A child process that answers in one JSON line: the way every converter step that must not
share this process (TensorFlow beside a device runtime, the toolchains) is run."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from ..errors import BuildError


def run_json_child(cmd: list[str], env: dict[str, str], what: str,
                   timeout: float) -> dict[str, Any]:
    """The last JSON line of the child's output; an answer with "error", or none at all,
    becomes a one-line BuildError naming `what`."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = [ln for ln in proc.stderr.strip().splitlines()
                if ln.strip() and not ln.startswith("INFO:")][-1:]
        raise BuildError(f"{what} failed (exit {proc.returncode}): "
                         + (tail[0][:300] if tail else "no output"))
    answer: dict[str, Any] = json.loads(lines[-1])
    if "error" in answer:
        raise BuildError(str(answer["error"]))
    return answer
