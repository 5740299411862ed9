"""Durable file replacement: temp file, fsync, rename, fsync of the folder.

A unit loses power without warning; a file written this way is either the old one or the new
one afterwards, never a mix or an empty file.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_file(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Write `data` durably beside `path` under a temp name; rename it with `commit`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
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
