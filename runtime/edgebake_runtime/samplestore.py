"""The samples folder, from the service: kept within its bounds, listed for collectors.

The camera processes write samples (`samples`); this side removes the oldest while there
are more than `max_files`, more than `max_mb`, or less free space than the journal keeps
(`journal.min_free_percent`: results matter more than samples), and counts those that no
collector had fetched yet. A collector says how far it got by writing the newest name it
fetched to `.collected` (over SSH) or by fetching through the unit's HTTP server.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .config import SampleSettings

log = logging.getLogger("edgebake.samples")
COLLECTED = ".collected"  # the newest sample name a collector has fetched
PRUNE_SEC = 30.0


class SampleStore:
    def __init__(self, settings: SampleSettings, min_free_percent: float) -> None:
        self.settings = settings
        self.folder = Path(settings.dir)
        self.min_free_percent = min_free_percent
        self.samples = 0
        self.bytes = 0
        self.removed = 0
        self.removed_unseen = 0
        self.last_error = ""
        self.pruned_at = 0.0

    def run(self, stop: Any) -> None:
        """The supervised thread: make the folder, then keep it within bounds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            self.prune()
            if stop.wait(PRUNE_SEC):
                return

    def listing(self) -> list[tuple[str, list[Path]]]:
        """(name, its files) oldest first; a name is a sample's JPEG and its sidecar."""
        groups: dict[str, list[Path]] = {}
        for path in self.folder.iterdir():
            if path.name.startswith("."):
                if path.name.endswith(".tmp") and time.time() - _mtime(path) > 600:
                    path.unlink(missing_ok=True)  # left by a power cut mid-write
                continue
            if path.suffix in (".jpg", ".json"):
                groups.setdefault(path.stem, []).append(path)
        return sorted(groups.items())

    def collected(self) -> str:
        try:
            return (self.folder / COLLECTED).read_text().strip()[:200]
        except OSError:
            return ""

    def mark_collected(self, name: str) -> None:
        if name > self.collected():
            write_atomic(self.folder / COLLECTED, (name + "\n").encode())

    def prune(self) -> None:
        try:
            found = self.listing()
            sizes = [sum(_size(p) for p in files) for _, files in found]
            total = sum(sizes)
            seen = self.collected()
            limit = self.settings.max_mb * 2**20
            index = 0
            while index < len(found) and (len(found) - index > self.settings.max_files
                                          or total > limit or self._short_of_space()):
                name, files = found[index]
                for path in files:
                    path.unlink(missing_ok=True)
                total -= sizes[index]
                self.removed += 1
                self.removed_unseen += name > seen
                index += 1
            self.samples, self.bytes = len(found) - index, total
            self.last_error = ""
        except OSError as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            log.warning("samples: %s", self.last_error)
        self.pruned_at = time.time()

    def _short_of_space(self) -> bool:
        stats = os.statvfs(self.folder)
        return stats.f_bavail * 100 < stats.f_blocks * self.min_free_percent

    def stats(self) -> dict[str, Any]:
        return {"dir": str(self.folder), "samples": self.samples, "bytes": self.bytes,
                "removed": self.removed, "removed_unseen": self.removed_unseen,
                "collected_up_to": self.collected(), "error": self.last_error}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()
