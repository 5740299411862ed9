"""The build cache under ~/.cache/edgebake, with writes that land whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgebake_runtime.digest import sha256_file

__all__ = ["atomic_path", "cache_root", "entry_lock", "sha256_file"]


def cache_root() -> Path:
    """$EDGEBAKE_CACHE, else $XDG_CACHE_HOME/edgebake, else ~/.cache/edgebake."""
    explicit = os.environ.get("EDGEBAKE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgebake"


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def entry_lock(final: Path, on_wait: Callable[[float], None] | None = None,
               every_sec: float = 30.0) -> Iterator[float]:
    """Hold an exclusive lock for building the cache entry `final`; yields seconds waited.

    Why: two builds of the same entry at once (a test and the background warm-up of
    `invoke test`, or two users' builds) each take minutes of emulated work for one result.
    The second waits, saying so every `every_sec`, then finds the entry made. The lock goes
    with the process, so one that is killed never leaves it held."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "a+b") as handle:
        began = time.monotonic()
        told = -every_sec
        waited = 0.0
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - began or 1e-9  # a wait, however short
                if on_wait is not None and waited - told >= every_sec:
                    on_wait(waited)
                    told = waited
                time.sleep(0.5)
        try:
            yield waited and time.monotonic() - began
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
