"""When a camera process's main thread is inside `invoke()`, so that its helpers work then.

Why: the main thread's time is the camera's throughput. `invoke()` releases the GIL, and the
helper threads (preparing the next frames, decoding the last ones) run beside it. Two things
still cost the main thread, measured in a 2-vCPU VM at 1000 fps: waking a helper that sleeps
on a lock (the waker pays for the cross-core wake-up, 40 us a time, and pays again when it
drops the GIL to a helper now waiting for it), and a helper that still holds the GIL when an
invoke ends. So helpers are never woken by the main thread while frames flow: they sleep on
timers, and they start a piece of work only when the running invoke has time left for it.
"""

from __future__ import annotations

import time

# A new estimate moves an average this far towards it: a few dozen frames settle it.
SMOOTHING = 0.05
# After an invoke ends the main thread needs this long (besides what it was measured to
# need) before the next one begins; a helper that sleeps into the next invoke aims past it.
ENTRY_MARGIN_SEC = 30e-6
# No helper sleeps longer than this to find an invoke window: at a slow pace (a camera at
# 30 fps) the main thread is mostly idle, and a helper that finds it idle goes ahead.
MAX_WAIT_SEC = 0.005


class InvokeClock:
    """The main thread marks each invoke; helpers ask for a window of a given length."""

    def __init__(self, typical_sec: float = 0.001) -> None:
        self.began = 0.0  # time.monotonic() at the start of the running invoke, 0 outside one
        self.typical = typical_sec  # how long an invoke takes, smoothed
        self.between = 0.0  # how long the main thread takes from one invoke to the next
        self._ended = 0.0

    # --- the main thread ----------------------------------------------------------------
    def enter(self, now: float) -> None:
        if self._ended:
            gap = now - self._ended
            if gap < self.typical:  # a busy pipeline's gap, not an idle wait for a frame
                self.between += (gap - self.between) * SMOOTHING
        self.began = now

    def leave(self, now: float) -> None:
        if self.began:
            self.typical += (now - self.began - self.typical) * SMOOTHING
        self.began = 0.0
        self._ended = now

    # --- the helpers --------------------------------------------------------------------
    @property
    def period(self) -> float:
        """How long one frame takes the main thread while frames flow: invoke and gap."""
        return self.typical + self.between

    def busy(self) -> bool:
        """Whether frames are flowing: in an invoke now, or one ended moments ago."""
        return bool(self.began) or time.monotonic() - self._ended < 2 * self.typical

    def time_left(self, now: float) -> float | None:
        """Seconds the running invoke probably has left (may be negative), or None when the
        main thread is not in one: with the GIL held here, it then waits for a frame."""
        began = self.began
        if not began:
            return None
        return began + self.typical - now

    def await_window(self, cost: float) -> None:
        """Return when `cost` seconds of work will end before the running invoke does, or
        when the main thread is idle; sleeps (never blocks on the main thread) until then."""
        deadline = time.monotonic() + MAX_WAIT_SEC
        while True:
            now = time.monotonic()
            left = self.time_left(now)
            if left is None or left >= cost or now >= deadline:
                return
            time.sleep(min(max(left, 0.0) + self.between + ENTRY_MARGIN_SEC, deadline - now))
