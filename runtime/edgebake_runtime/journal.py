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
import stat
import threading
import time
from collections.abc import Callable, Iterator
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


def count_lines(path: Path, offset: int = 0) -> int:
    """Complete lines in `path` after byte `offset` (0 if the file is gone)."""
    count = 0
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                return 0  # not a journal we wrote (a device, a pipe): nothing to count
            handle.seek(offset)
            left = max(0, info.st_size - offset)
            while left and (block := handle.read(min(left, 1 << 20))):
                left -= len(block)
                count += block.count(b"\n")
    except FileNotFoundError:
        return 0
    return count


def free_percent(folder: Path) -> float:
    stats = os.statvfs(folder)
    return 100.0 * stats.f_bavail / stats.f_blocks if stats.f_blocks else 0.0


# Where a consumer (MQTT) has got to: (file name, byte offset), or None before it starts.
Delivered = Callable[[], "tuple[str, int] | None"]


class Journal:
    """Append-only results with retention by free space and recovery from write errors.

    Policy when space runs out: delete the oldest files first (they are the most likely to be
    delivered already) until `min_free_percent` of the filesystem is free again; records that
    go before a consumer delivered them are counted in `dropped_undelivered`. A write that
    fails is retried after making room; if it still fails the journal reports `failed` (the
    unit turns unhealthy, so the watchdog decides) and retries once a second until it works.
    """

    RETRY_SEC = 1.0
    CHECK_SPACE_SEC = 10.0

    def __init__(self, folder: Path, fsync_interval_sec: float = 1.0,
                 rotate_bytes: int = 16 * 1024 * 1024, min_free_percent: float = 10.0) -> None:
        self.folder = folder
        self.fsync_interval = fsync_interval_sec
        self.rotate_bytes = rotate_bytes
        self.min_free_percent = min_free_percent
        self.delivered: Delivered | None = None
        self._lock = threading.Lock()
        self._fd = -1
        self._path: Path | None = None
        self._size = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._retry_at = 0.0
        self._space_checked = 0.0
        self.failed = ""  # why the last write failed; empty while writes succeed
        self.written = 0
        self.bytes_written = 0
        self.repaired_bytes = 0
        self.deleted_files = 0
        self.deleted_records = 0
        self.dropped_undelivered = 0
        self.dropped_unwritten = 0
        # wall-clock "ts" of the newest record written, and of the newest one fsynced: what a
        # power cut may lose lies between them
        self.last_written_ts: float | None = None
        self.last_synced_ts: float | None = None
        # the slowest fsync so far: a record waits up to the interval plus this to be safe
        self.slowest_fsync_sec = 0.0

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
        """`results-<sequence>-<UTC time>.jsonl`: names sort in creation order even when the
        clock jumps back (a Pi has no RTC until NTP answers), so oldest-first holds."""
        files = journal_files(self.folder)
        last = files[-1].name[len(PREFIX):].split("-", 1)[0] if files else "0"
        sequence = int(last) + 1 if last.isdigit() else len(files) + 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return self.folder / f"{PREFIX}{sequence:09d}-{stamp}{SUFFIX}"

    def _open_file(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        self._path = path
        self._size = os.fstat(self._fd).st_size
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def append(self, record: dict[str, Any]) -> bool:
        """Write one record; False (and counted) when it could not be written."""
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        stamp = record.get("ts")
        return self.append_line(line, float(stamp) if isinstance(stamp, (int, float)) else None)

    def append_line(self, line: bytes, stamp: float | None) -> bool:
        """Write one record already encoded as a JSON line (`stamp`: its "ts")."""
        return self.append_lines(line, 1, stamp)

    def append_lines(self, block: bytes, count: int, stamp: float | None) -> bool:
        """Write `count` whole JSON lines in one write (`stamp`: the last one's "ts"); a
        block goes into one file, or, when it does not fit, nowhere (counted)."""
        with self._lock:
            if self.failed and time.monotonic() < self._retry_at:
                self.dropped_unwritten += count
                return False
            try:
                try:
                    self._write(block, count)
                except OSError:
                    self._make_room(force=True)
                    self._write(block, count)
                if stamp is not None:
                    self.last_written_ts = stamp
            except OSError as exc:
                self._failed(exc)
                self.dropped_unwritten += count
                return False
            if self.failed:
                log.warning("journal recovered: writing to %s again", self._path)
                self.failed = ""
        return True

    def _write(self, line: bytes, count: int = 1) -> None:
        if self._fd < 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._open_file(self._new_name())
        if self._size + len(line) > self.rotate_bytes and self._size > 0:
            self._rotate()
        written = os.write(self._fd, line)
        if written != len(line):  # a short write means the disk filled up mid-line
            os.ftruncate(self._fd, self._size)
            raise OSError(errno.ENOSPC, "No space left on device (short write)")
        self._size += written
        self.written += count
        self.bytes_written += written
        self._dirty = True
        if time.monotonic() - self._last_sync >= self.fsync_interval:
            self._sync()

    def _failed(self, exc: OSError) -> None:
        message = f"{exc.strerror or exc} ({self._path or self.folder})"
        if message != self.failed:
            log.error("journal cannot write: %s; retrying every %.0fs", message,
                      self.RETRY_SEC)
        self.failed = message
        self._retry_at = time.monotonic() + self.RETRY_SEC

    def _sync(self) -> None:
        if self._dirty:
            began = time.monotonic()
            os.fsync(self._fd)
            self.slowest_fsync_sec = max(self.slowest_fsync_sec, time.monotonic() - began)
            self._dirty = False
        self.last_synced_ts = self.last_written_ts
        self._last_sync = time.monotonic()

    def sync_if_due(self) -> None:
        """Called about once a second: batched fsync, and the free-space check."""
        with self._lock:
            now = time.monotonic()
            try:
                if self._fd >= 0 and now - self._last_sync >= self.fsync_interval:
                    self._sync()
                if now - self._space_checked >= self.CHECK_SPACE_SEC:
                    self._make_room()
            except OSError as exc:
                self._failed(exc)

    def _rotate(self) -> None:
        self._sync()
        self._open_file(self._new_name())
        self._make_room()

    def _make_room(self, force: bool = False) -> None:
        """Delete the oldest files while less than `min_free_percent` is free; with `force`
        (a write just failed) delete at least one, starting a new file if only one is left."""
        self._space_checked = time.monotonic()
        if not self.folder.is_dir():
            return
        deleted = 0
        while (force and deleted == 0) or free_percent(self.folder) < self.min_free_percent:
            files = journal_files(self.folder)
            if len(files) <= 1:
                if not files or not force or deleted:
                    return
                self._sync()
                self._open_file(self._new_name())
                files = journal_files(self.folder)
            self._delete(files[0])
            deleted += 1

    def _delete(self, path: Path) -> None:
        records = count_lines(path)
        undelivered = records
        mark = self.delivered() if self.delivered is not None else None
        if self.delivered is None:
            undelivered = 0
        elif mark is not None:
            name, offset = mark
            if path.name < name:
                undelivered = 0
            elif path.name == name:
                undelivered = count_lines(path, offset)
        path.unlink(missing_ok=True)
        self.deleted_files += 1
        self.deleted_records += records
        self.dropped_undelivered += undelivered
        log.warning("journal retention: deleted %s (%d records, %d not yet delivered) to keep "
                    "%.0f%% of %s free", path.name, records, undelivered,
                    self.min_free_percent, self.folder)

    def stats(self) -> dict[str, Any]:
        try:
            free = round(free_percent(self.folder), 1)
        except OSError:
            free = None
        return {"dir": str(self.folder), "file": str(self._path or ""),
                "written": self.written, "error": self.failed, "free_percent": free,
                "min_free_percent": self.min_free_percent,
                "deleted_files": self.deleted_files, "deleted_records": self.deleted_records,
                "dropped_undelivered": self.dropped_undelivered,
                "dropped_unwritten": self.dropped_unwritten,
                "repaired_bytes": self.repaired_bytes,
                "fsync_interval_sec": self.fsync_interval,
                "slowest_fsync_sec": round(self.slowest_fsync_sec, 3),
                "last_written_ts": self.last_written_ts, "last_synced_ts": self.last_synced_ts}

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    self._sync()
                except OSError as exc:
                    log.error("journal final fsync failed: %s", exc)
                os.close(self._fd)
                self._fd = -1
