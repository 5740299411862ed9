"""Frames and the per-source latest-frame-wins queue."""

from __future__ import annotations

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
    placement: Any = None  # set when the source thread already resized the frame
    generation: int = 0  # which model set prepared it (a model switch changes it)


class LatestFrameQueue:
    """A bounded queue where a new frame pushes out the oldest one; drops are counted."""

    def __init__(self, depth: int = 1, refill_at: int | None = None) -> None:
        self.depth = depth
        # A source waiting for room is woken once the queue is down to this many frames: a
        # recording read ahead by a few frames costs one wake-up per few frames, not one per
        # frame (waking a thread on an idle core is what a hand-over costs most).
        self.refill_at = depth - 1 if refill_at is None else min(refill_at, depth - 1)
        self._items: list[Frame] = []
        self._lock = threading.Lock()
        # A plain lock used as a one-shot signal: held while nobody has made room, released
        # by take() when a source waits for room. A Condition would do the same in Python
        # code, at every frame a replay feeds (a tenth of the service's CPU at 1000 fps).
        self._room = threading.Lock()
        self._room.acquire()
        self._waiting = False
        # the same kind of signal the other way: a consumer waiting for a frame (wait_take)
        self._arrived = threading.Lock()
        self._arrived.acquire()
        self._wanted = False
        self.dropped = 0
        self.put_count = 0

    def wait_for_room(self, timeout: float) -> bool:
        """For sources that can wait (replays): block until a put would not drop a frame."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self._items) < self.depth:
                    return True
                self._waiting = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._room.acquire(timeout=remaining)  # a stale release only means one more look

    def _made_room(self) -> None:
        """Under the lock: wake a source waiting for room, if one is and it is time."""
        if self._waiting and len(self._items) <= self.refill_at:
            self._waiting = False
            with contextlib.suppress(RuntimeError):  # already released, not yet taken
                self._room.release()

    def put(self, frame: Frame) -> None:
        with self._lock:
            self.put_count += 1
            if len(self._items) >= self.depth:
                self._items.pop(0)
                self.dropped += 1
            self._items.append(frame)
            if self._wanted:
                self._wanted = False
                with contextlib.suppress(RuntimeError):
                    self._arrived.release()

    def wait_take(self, timeout: float) -> Frame | None:
        """The oldest frame, waiting up to `timeout` seconds for one (one consumer only)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._items:
                    frame = self._items.pop(0)
                    self._made_room()
                    return frame
                self._wanted = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._arrived.acquire(timeout=remaining)

    def take(self) -> Frame | None:
        with self._lock:
            if not self._items:
                return None
            frame = self._items.pop(0)
            self._made_room()
            return frame

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def drain(self) -> list[Frame]:
        with self._lock:
            items, self._items = self._items, []
            self._made_room()
            return items
