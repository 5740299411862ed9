"""Frames and a camera's latest-frame-wins queue."""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Frame:
    """One captured image (H x W x 3 uint8 RGB) with where and when it came from."""

    source: str
    seq: int
    captured_at: float  # time.monotonic()
    wall_time: float  # time.time()
    image: np.ndarray[Any, Any]
    placement: Any = None  # set when the source thread already prepared the frame
    generation: int = 0  # which loaded model prepared it (a model switch changes it)
    captured: Any = None  # the image as captured, kept only while samples are on


class LatestFrameQueue:
    """A bounded queue where a new frame pushes out the oldest one; drops are counted.

    One consumer waits for frames. A recording does not drop: its reader sleeps while the
    queue holds `depth` frames and refills it once it is down to `refill_at` (one wake-up of
    the reader per few frames, not one per frame)."""

    def __init__(self, depth: int = 1, refill_at: int | None = None) -> None:
        self.depth = depth
        self.refill_at = depth - 1 if refill_at is None else min(refill_at, depth - 1)
        self._items: collections.deque[Frame] = collections.deque()
        self._lock = threading.Lock()
        # A plain lock used as a one-shot signal, released by put() for a consumer waiting in
        # wait_take(): a Condition would do the same in Python code, at every frame.
        self._arrived = threading.Lock()
        self._arrived.acquire()
        self._wanted = False
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._lock:
            if len(self._items) >= self.depth:
                self._items.popleft()
                self.dropped += 1
            self._items.append(frame)
            if self._wanted:
                self._wanted = False
                with contextlib.suppress(RuntimeError):
                    self._arrived.release()

    def wait_take(self, timeout: float) -> Frame | None:
        """The oldest frame, waiting up to `timeout` seconds for one."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                self._wanted = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._arrived.acquire(timeout=remaining)

    def __len__(self) -> int:
        return len(self._items)
