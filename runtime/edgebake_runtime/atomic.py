"""Durable file replacement: temp file, fsync, rename, fsync of the folder.

A unit loses power without warning; a file written this way is either the old one or the new
one afterwards, never a mix or an empty file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_file(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` durably beside `path` under a new temp name; rename it with `commit`.

    The temp file is created, never opened: a link planted under its name (by a process
    that may write the folder) cannot send the write elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return tmp


def commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename every staged temp file over its target, then make the renames durable."""
    for tmp, final in staged:
        os.replace(tmp, final)
    for folder in {final.parent for _, final in staged}:
        fsync_dir(folder)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    commit([(stage_file(path, data, mode), path)])
