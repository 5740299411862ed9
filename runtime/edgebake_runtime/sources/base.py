"""The source thread: open, read frames at a capped rate, and reconnect with backoff."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import SourceConfig
from ..frames import Frame
from ..redact import redact_text
from ..supervise import Backoff

log = logging.getLogger("edgebake.source")

BACKOFF_START_SEC = 1.0
BACKOFF_MAX_SEC = 30.0


class CorruptFrame(Exception):
    """One frame could not be decoded; the source stays up and the frame is counted."""


class SourceDown(Exception):
    """The device or stream is gone; the source reconnects after a backoff."""


class SourceFinished(Exception):
    """A non-looping replay reached its end."""


@dataclass
class SourceStats:
    state: str = "starting"  # starting, up, down, finished, stopped
    frames: int = 0
    corrupt_frames: int = 0
    reconnects: int = 0
    last_error: str = ""
    last_frame_monotonic: float = 0.0
    fps: float = 0.0
    frame_size: tuple[int, int] | None = None  # width, height of the frames delivered
    _window: deque[float] = field(default_factory=deque)  # the last 5 s of frame times

    def frame_age(self, now: float) -> float | None:
        return now - self.last_frame_monotonic if self.last_frame_monotonic else None


class Source:
    """Subclasses implement open(), read() -> RGB uint8 HxWx3, and close()."""

    # A live camera never waits: the newest frame replaces an unprocessed one. A recording
    # can wait for the workers instead of reading frames only to drop them.
    can_wait = False
    # The source thread caps reads at the configured fps; a live stream sets this False and
    # skips frames itself, since it must be read as fast as it arrives.
    paced = True

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.stats = SourceStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self.on_frame: Callable[[Frame], None] = lambda frame: None
        # Set by the service: the size a WxH frame should have for the model. A source that
        # can scale in native code (FFmpeg, PIL at decode) delivers frames at that size.
        self.size_for: Callable[[int, int], tuple[int, int]] | None = None

    # --- to implement -------------------------------------------------------------------
    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray[Any, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    # --- thread -------------------------------------------------------------------------
    def start(self, on_frame: Callable[[Frame], None]) -> None:
        self.on_frame = on_frame
        self._thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.stats.state = "stopped"

    def _run(self) -> None:
        backoff = Backoff(BACKOFF_START_SEC, BACKOFF_MAX_SEC)
        while not self._stop.is_set():
            frames_before = self.stats.frames
            try:
                self.open()
                self.stats.state = "up"
                # last_error stays until a frame arrives: a camera that opens and then fails
                # at once keeps showing why in /health
                self._pump()
            except SourceFinished:
                self.stats.state = "finished"
                self._safe_close()
                return
            except Exception as exc:  # any failure of a device or stream means "down"
                if self.stats.frames > frames_before:
                    backoff.reset()  # it worked for a while: retry soon
                self.stats.state = "down"
                self.stats.last_error = redact_text(f"{type(exc).__name__}: {exc}")[:300]
                log.warning("source %s down: %s; retrying in %.0fs", self.name,
                            self.stats.last_error, backoff.delay)
            self._safe_close()
            if backoff.pause(self._stop):
                break
            self.stats.reconnects += 1

    def _safe_close(self) -> None:
        try:
            self.close()
        except Exception as exc:
            log.debug("source %s close failed: %s", self.name, exc)

    def _pump(self) -> None:
        period = 1.0 / self.config.fps
        next_due = time.monotonic()
        while not self._stop.is_set():
            try:
                image = self.read()
            except CorruptFrame as exc:
                self.stats.corrupt_frames += 1
                log.debug("source %s: corrupt frame skipped: %s", self.name, exc)
                continue
            now = time.monotonic()
            if self.stats.last_error:
                self.stats.last_error = ""
            self._seq += 1
            self._record(now)
            self.stats.frame_size = (image.shape[1], image.shape[0])
            self.on_frame(Frame(source=self.name, seq=self._seq, captured_at=now,
                                wall_time=time.time(), image=image))
            if not self.paced:
                continue
            next_due = max(next_due + period, now - period)
            delay = next_due - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return

    def _record(self, now: float) -> None:
        stats = self.stats
        stats.frames += 1
        stats.last_frame_monotonic = now
        stats._window.append(now)
        cutoff = now - 5.0
        while stats._window and stats._window[0] < cutoff:
            stats._window.popleft()
        span = now - stats._window[0] if len(stats._window) > 1 else 0.0
        stats.fps = (len(stats._window) - 1) / span if span > 0 else 0.0
