"""Durable file replacement, cut at every step: the target is always the old file or the new
one, never empty or mixed, and the next write after a cut succeeds."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from cutpoint import call_count, run_cut
from edgebake_runtime.atomic import write_atomic

# Replaces `target` (argv[2]) with `size` (argv[3]) bytes.
BODY = """
from pathlib import Path
from edgebake_runtime import atomic
atomic.write_atomic(Path(sys.argv[2]), b"N" * int(sys.argv[3]))
print("calls", calls[0])
"""
STEPS = ["os.open", "os.write", "os.fsync", "os.replace", "os.close", "os.fchmod"]


def replace(target: Path, cut_at: int, size: int) -> subprocess.CompletedProcess[str]:
    return run_cut(BODY, STEPS, cut_at, target, size)


def test_a_cut_at_any_step_leaves_the_old_file_or_the_new_one(tmp_path: Path) -> None:
    size = 3 * 1024 * 1024  # several write() calls' worth on some systems
    target = tmp_path / "state.json"
    target.write_bytes(b"O" * 1000)
    whole = replace(target, 0, size)
    assert whole.returncode == 0, whole.stderr
    calls = call_count(whole)
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
