"""Durable file replacement, cut at every step: the target is always the old file or the new
one, never empty or mixed, and the next write after a cut succeeds."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from edgebake_runtime.atomic import write_atomic

# Replaces `target` with the new bytes; with N it kills itself before its N-th system call
# among open/write/fsync/replace/close, and prints how many it made otherwise.
DRIVER = """
import os, signal, sys
from pathlib import Path
from edgebake_runtime import atomic

target, cut_at, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
calls = [0]

def step(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == cut_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped

for name in ("open", "write", "fsync", "replace", "close", "fchmod"):
    setattr(os, name, step(getattr(os, name)))
atomic.write_atomic(target, b"N" * size)
print("calls", calls[0])
"""


def replace(target: Path, cut_at: int, size: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", DRIVER, str(target), str(cut_at), str(size)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_a_cut_at_any_step_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024  # several write() calls' worth on some systems
    target = tmp_path / "state.json"
    target.write_bytes(b"O" * 1000)
    whole = replace(target, 0, size)
    assert whole.returncode == 0, whole.stderr
    calls = int(whole.stdout.split()[-1])
    assert calls >= 5
    for cut_at in range(1, calls + 1):
        target.write_bytes(b"O" * 1000)
        cut = replace(target, cut_at, size)
        assert cut.returncode == -9, (cut_at, cut.stderr)
        assert target.read_bytes() in (b"O" * 1000, b"N" * size), cut_at
        write_atomic(target, b"after the cut")  # a leftover temp file is no obstacle
        assert target.read_bytes() == b"after the cut"


def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "cursor"
    versions = [bytes([65 + i % 26]) * (4096 + 37 * i) for i in range(300)]
    write_atomic(target, versions[0])
    known = set(versions)
    reads, partial = [0], [0]
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            reads[0] += 1
            partial[0] += target.read_bytes() not in known

    reader = threading.Thread(target=read)
    reader.start()
    for version in versions[1:]:
        write_atomic(target, version)
    done.set()
    reader.join()
    assert reads[0] > 0 and partial[0] == 0
    assert not list(tmp_path.glob(".*.tmp"))
