"""Counters and a latency reservoir shared by workers, sinks, /health and /metrics."""

from __future__ import annotations

import threading
import time
from collections import deque


class LatencyWindow:
    """The last N latencies in seconds; percentiles on demand (cheap: N is small)."""

    def __init__(self, size: int = 1024) -> None:
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0
        self.total = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)
            self.count += 1
            self.total += seconds

    def percentile(self, q: float) -> float | None:
        with self._lock:
            values = sorted(self._values)
        if not values:
            return None
        index = min(len(values) - 1, max(0, round(q / 100.0 * (len(values) - 1))))
        return values[index]


class Metrics:
    def __init__(self) -> None:
        self.inference = LatencyWindow()  # invoke() only
        self.end_to_end = LatencyWindow()  # capture -> result written
        self.results = 0
        self.inference_errors = 0
        self.switch_drops = 0  # frames prepared for a model that was switched away
        self.last_result_at = time.monotonic()  # start counts: stalls are judged from it
        self._lock = threading.Lock()

    def count_results(self, count: int) -> None:
        with self._lock:
            self.results += count
            self.last_result_at = time.monotonic()
