"""Work that comes back: a loop or a process that fails is restarted after a backoff.

A unit runs for months; a thread or a camera process that dies on an unexpected error must
neither vanish silently nor spin. Each restart is counted and its error kept for /health.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger("edgebake.supervise")

# A process whose essential thread died ends with this code, so that its parent replaces it.
EXIT_THREAD_DIED = 70


class Backoff:
    """Waits between restarts: doubling after each failure up to `maximum`, and from
    `first` again once the work had run well for twice the maximum."""

    def __init__(self, first: float = 1.0, maximum: float = 30.0) -> None:
        self.first = first
        self.maximum = maximum
        self.delay = first

    def reset(self) -> None:
        """The work ran well: the next failure is retried soon."""
        self.delay = self.first

    def pause(self, stop: threading.Event, ran_for: float = 0.0) -> bool:
        """Wait before the next attempt; True when `stop` was set meanwhile."""
        if ran_for > 2 * self.maximum:
            self.reset()
        stopped = stop.wait(self.delay)
        self.delay = min(self.delay * 2, self.maximum)
        return stopped


class Supervised:
    """Runs `body` in a daemon thread until `stop` is set, restarting it when it raises."""

    def __init__(self, name: str, body: Callable[[], None], stop: threading.Event,
                 first_backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self.name = name
        self.body = body
        self.stop = stop
        self.backoff = Backoff(first_backoff, max_backoff)
        self.restarts = 0
        self.last_error = ""
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _loop(self) -> None:
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.body()
                self.backoff.reset()
            except Exception as exc:  # the point of supervision: log, count, come back
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s failed (restart %d in %.0fs)", self.name, self.restarts,
                              self.backoff.delay)
                self.backoff.pause(self.stop, time.monotonic() - began)


def essential(body: Callable[[], None]) -> Callable[[], None]:
    """A thread body whose end by an error ends the whole process (EXIT_THREAD_DIED): a
    process missing one of its threads must not look alive to its parent."""
    def run() -> None:
        try:
            body()
        except BaseException:
            traceback.print_exc()
            os._exit(EXIT_THREAD_DIED)
    return run
