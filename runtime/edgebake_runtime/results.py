"""Where results go: the journal on /data, one write per batch a camera process sends.

A journal that cannot write does not stop inference: the journal counts what it could not
write, and /health shows it (the verdict calls it stuck, so a restart gets a chance).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import JournalSettings
from .journal import Journal

log = logging.getLogger("edgebake.results")


class ResultSink:
    def __init__(self, settings: JournalSettings) -> None:
        self.journal = Journal(Path(settings.dir), settings.fsync_interval_sec,
                               settings.rotate_bytes, settings.min_free_percent)

    def open(self) -> None:
        try:
            self.journal.open()
        except OSError as exc:
            self.journal.failed = f"{exc.strerror or exc} ({self.journal.folder})"
            log.error("journal unavailable: %s; inference and health keep running",
                      self.journal.failed)

    def write_lines(self, block: bytes, count: int, stamp: float) -> None:
        """`count` finished journal lines in one block (called by camera reader threads)."""
        self.journal.append_lines(block, count, stamp)
