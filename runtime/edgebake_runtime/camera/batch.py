"""Journal lines a camera process has decoded and not yet sent to the service."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from . import wire

FLUSH_SEC = 0.01  # lines wait at most this long; at a low frame rate each goes at once
FLUSH_BYTES = 48 * 1024  # a message stays well inside wire.MAX_MESSAGE


class LineBatch:
    """Journal lines waiting to be sent; the decoder thread and the main thread both add."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: list[tuple[float, float, float]] = []
        self._text: list[bytes] = []
        self._size = 0
        self.errors = 0
        self._sent_errors = 0
        self._last_send = 0.0

    def add(self, meta: tuple[float, float, float], line: bytes) -> str:
        """Queue one line; returns why not ("" when queued)."""
        if len(line) + wire.LINE_META.size > FLUSH_BYTES:
            return f"decoded result is {len(line)} bytes, more than {FLUSH_BYTES}"
        with self._lock:
            self._meta.append(meta)
            self._text.append(line)
            self._size += len(line) + wire.LINE_META.size
        return ""

    def count_error(self) -> None:
        with self._lock:
            self.errors += 1

    def wait_sec(self) -> float | None:
        """How long the decoder may wait for work before what waits is due."""
        if not self._text:
            return None if self.errors == self._sent_errors else 0.0
        return max(0.0, self._last_send + FLUSH_SEC - time.monotonic())

    def send_if_due(self, send: Callable[[bytes], None], now: bool = False) -> None:
        """Send what waits when FLUSH_SEC has passed since the last send (at a low frame
        rate: at once), when it is large, or when `now`."""
        with self._lock:
            if not self._text and self.errors == self._sent_errors:
                return
            clock = time.monotonic()
            if not (now or clock - self._last_send >= FLUSH_SEC or self._size >= FLUSH_BYTES):
                return
            send(wire.lines(self._meta, self._text, self.errors))  # in order, under the lock
            self._meta, self._text, self._size = [], [], 0
            self._sent_errors, self._last_send = self.errors, clock
