"""Step-by-step progress on the terminal and a full log file, so long builds are never silent."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO


class Progress:
    """Prints `[n/total] step` lines with elapsed times and mirrors everything into a log."""

    def __init__(self, total_steps: int, log_path: Path | None = None,
                 stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.step_index = 0
        self.started = time.monotonic()
        self.stream = stream or sys.stdout
        self.log_path = log_path
        self._log: TextIO | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = log_path.open("w", encoding="utf-8")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, line: str) -> None:
        """Write a line to the log file only (command output and details)."""
        if self._log is not None:
            self._log.write(line.rstrip("\n") + "\n")
            self._log.flush()

    def say(self, line: str) -> None:
        """Write a line to the terminal and to the log."""
        print(line, file=self.stream, flush=True)
        self.log(line)

    def heartbeat(self, detail: str, since: float) -> None:
        """Show that a long command is still moving, with what it is doing now."""
        self.say(f"      … {time.monotonic() - since:6.0f}s  {detail[:110]}")

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.step_index += 1
        began = time.monotonic()
        self.say(f"[{self.step_index}/{self.total_steps}] {name}")
        try:
            yield
        except BaseException:
            self.say(f"      failed after {time.monotonic() - began:.1f}s")
            raise
        self.say(f"      done in {time.monotonic() - began:.1f}s (total {self.elapsed():.1f}s)")

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
