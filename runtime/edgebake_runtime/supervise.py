"""Background threads that come back: an exception restarts the loop after a backoff.

A unit runs for months; a thread that dies on an unexpected error must neither vanish
silently nor spin. Each restart is counted and its error kept for /health.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("edgebake.supervise")


class Supervised:
    """Runs `body` in a daemon thread until `stop` is set, restarting it when it raises."""

    def __init__(self, name: str, body: Callable[[], None], stop: threading.Event,
                 first_backoff: float = 1.0, max_backoff: float = 30.0) -> None:
        self.name = name
        self.body = body
        self.stop = stop
        self.first_backoff = first_backoff
        self.max_backoff = max_backoff
        self.restarts = 0
        self.last_error = ""
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def _loop(self) -> None:
        backoff = self.first_backoff
        while not self.stop.is_set():
            began = time.monotonic()
            try:
                self.body()
                backoff = self.first_backoff
            except Exception as exc:  # the point of supervision: log, count, come back
                if time.monotonic() - began > 2 * self.max_backoff:
                    backoff = self.first_backoff  # it ran well for a while: start over
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("%s failed (restart %d in %.0fs)", self.name, self.restarts,
                              backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
