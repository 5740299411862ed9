"""The results journal: append-only JSON lines on /data that survive kill -9 and power cuts.

Every line goes out in one write() on an O_APPEND descriptor, and fsync runs in batches. A
power cut can still leave a partial last line on disk, so opening a journal first cuts the
file back to its last complete line. Readers therefore never see a torn line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("edgebake.journal")

PREFIX = "results-"
SUFFIX = ".jsonl"


def journal_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{PREFIX}*{SUFFIX}"))


def repair_tail(path: Path) -> int:
    """Truncate anything after the last newline; return the bytes removed."""
    with path.open("rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        position = size
        chunk = 4096
        while position > 0:
            start = max(0, position - chunk)
            handle.seek(start)
            block = handle.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        else:
            keep = 0
        if keep < size:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
        return size - keep


def read_lines(folder: Path) -> Iterator[dict[str, Any]]:
    """Every complete record, oldest first."""
    for path in journal_files(folder):
        with path.open("rb") as handle:
            for raw in handle:
                if raw.endswith(b"\n"):
                    yield json.loads(raw)


class Journal:
    def __init__(self, folder: Path, fsync_interval_sec: float = 1.0,
                 rotate_bytes: int = 16 * 1024 * 1024, keep_files: int = 64) -> None:
        self.folder = folder
        self.fsync_interval = fsync_interval_sec
        self.rotate_bytes = rotate_bytes
        self.keep_files = keep_files
        self._lock = threading.Lock()
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self.failed = ""  # set when the journal stopped (disk full, I/O error)
        self.written = 0
        self.bytes_written = 0
        self.repaired_bytes = 0

    @property
    def current(self) -> Path | None:
        return self._path

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        files = journal_files(self.folder)
        if files:
            self.repaired_bytes = repair_tail(files[-1])
            if self.repaired_bytes:
                log.warning("journal %s: cut %d bytes of a torn last line", files[-1],
                            self.repaired_bytes)
            self._open_file(files[-1])
        else:
            self._open_file(self._new_name())

    def _new_name(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        existing = {p.name for p in journal_files(self.folder)}
        for n in range(1000):
            name = f"{PREFIX}{stamp}-{n:03d}{SUFFIX}"
            if name not in existing:
                return self.folder / name
        raise OSError(errno.EEXIST, "no free journal file name")

    def _open_file(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._path = path
        self._size = os.fstat(self._fd).st_size
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, record: dict[str, Any]) -> bool:
        """Write one record; False once the journal has stopped (inference carries on)."""
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        with self._lock:
            if self.failed or self._fd < 0:
                return False
            try:
                if self._size + len(line) > self.rotate_bytes and self._size > 0:
                    self._rotate()
                written = os.write(self._fd, line)
                if written != len(line):  # a short write means the disk filled up mid-line
                    os.ftruncate(self._fd, self._size)
                    raise OSError(errno.ENOSPC, "short write")
                self._size += written
                self.written += 1
                self.bytes_written += written
                self._dirty = True
                if time.monotonic() - self._last_sync >= self.fsync_interval:
                    self._sync()
            except OSError as exc:
                self.failed = f"{exc.strerror or exc} ({self._path})"
                log.error("journal stopped: %s; inference and health keep running", self.failed)
                return False
        return True

    def _sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = time.monotonic()

    def sync_if_due(self) -> None:
        with self._lock:
            if self._fd >= 0 and not self.failed and \
                    time.monotonic() - self._last_sync >= self.fsync_interval:
                try:
                    self._sync()
                except OSError as exc:
                    self.failed = f"{exc.strerror or exc} ({self._path})"

    def _rotate(self) -> None:
        self._sync()
        os.close(self._fd)
        self._open_file(self._new_name())
        files = journal_files(self.folder)
        for old in files[:-self.keep_files]:
            old.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    self._sync()
                except OSError as exc:
                    log.error("journal final fsync failed: %s", exc)
                os.close(self._fd)
                self._fd = -1
