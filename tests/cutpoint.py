"""Runs a piece of code in a child process that SIGKILLs itself before its N-th call of the
named `os`/`subprocess` functions, as a power cut would stop it; N = 0 runs it whole and
reports how many such calls it made."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PRELUDE = """
import os, signal, subprocess, sys
calls = [0]
cut_at = int(sys.argv[1])

def _step(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == cut_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped

for _name in {names!r}:
    _module, _, _attr = _name.rpartition(".")
    _owner = subprocess if _module == "subprocess" else os
    setattr(_owner, _attr, _step(getattr(_owner, _attr)))
"""


def run_cut(body: str, names: list[str], cut_at: int, *args: str | Path
            ) -> subprocess.CompletedProcess[str]:
    """`body` runs after the prelude with sys.argv[2:] = args; it must end by printing
    `calls` and calls[0]. A cut run ends with returncode -9."""
    script = PRELUDE.format(names=names) + body
    return subprocess.run([sys.executable, "-c", script, str(cut_at), *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def call_count(done: subprocess.CompletedProcess[str]) -> int:
    return int(done.stdout.split("calls")[-1])
