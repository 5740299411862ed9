"""Field samples, in a camera process: the frames worth a person's look for retraining.

Kept when on (`samples.enabled`; images may be private): a frame whose best score falls in
the uncertain band (at most one per `min_gap_sec`), one frame every `every_sec`, and frames
asked for by an order. Each is a JPEG and a JSON sidecar (result, model version, source,
time, unit) named by time, so names sort oldest first. The decoder thread only offers a
frame (a reference, never a wait); a writer thread of its own encodes and writes it, so a
slow or full disk never holds up inference. A frame offered while the writer is busy is
counted and dropped; a write that fails is counted and not retried. The service keeps the
folder within its bounds (`samplestore`).
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .config import SampleSettings
from .frames import Frame

JPEG_QUALITY = 90
# A sample's name: capture time (seconds_milliseconds), camera, frame number; names sort
# oldest first, and collectors take nothing else from a unit.
NAME = re.compile(r"[0-9]{10,11}_[0-9]{3}-[A-Za-z0-9._-]{1,64}-[0-9]{1,12}")
# Free space below this share of the filesystem: no sample is written (the journal's
# results come first); the service's pruning makes room again.
MIN_FREE_FRACTION = 0.10


def best_score(result: dict[str, Any]) -> float | None:
    """The model's top score for a frame: the first class, or the strongest detection (0
    when nothing was detected); None for raw outputs."""
    if "top" in result:
        top = result["top"]
        return float(top[0]["score"]) if top else 0.0
    if "detections" in result:
        return max((float(d["score"]) for d in result["detections"]), default=0.0)
    return None


class SampleKeeper:
    def __init__(self, settings: SampleSettings, camera: str, device: str) -> None:
        self.settings = settings
        self.folder = Path(settings.dir)
        self.camera = camera
        self.device = device
        self.requested = 0  # frames asked for by an order, taken from the next ones
        self.last_periodic = time.monotonic()
        self.last_uncertain = -settings.min_gap_sec
        self._slot: tuple[Frame, dict[str, Any], str, str] | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.kept = 0
        self.busy_drops = 0  # chosen while the writer was still busy with another
        self.write_errors = 0
        self.low_space = 0  # not written: the filesystem was nearly full
        self.last_error = ""

    def offer(self, frame: Frame, result: dict[str, Any], version: str) -> None:
        """From the decoder thread: keep the frame if it is one of the wanted kinds."""
        if frame.captured is None:
            return
        with self._lock:
            reason = self._reason(best_score(result), time.monotonic())
            if not reason:
                return
            if self._slot is not None:
                self.busy_drops += 1
                return
            self._slot = (frame, result, version, reason)
        self._wake.set()

    def request(self, count: int) -> None:
        """From the control thread: keep the next `count` frames whatever their score."""
        with self._lock:
            self.requested = max(0, min(count, 100))

    def _reason(self, score: float | None, now: float) -> str:
        if self.requested > 0:
            self.requested -= 1
            return "requested"
        low, high = self.settings.low_confidence
        if score is not None and low <= score <= high and \
                now - self.last_uncertain >= self.settings.min_gap_sec:
            self.last_uncertain = now
            return "uncertain"
        every = self.settings.every_sec
        if every > 0 and now - self.last_periodic >= every:
            self.last_periodic = now
            return "periodic"
        return ""

    def writer_loop(self) -> None:
        """The writer thread: one sample at a time, as it is offered."""
        while True:
            self._wake.wait()
            with self._lock:
                item, self._slot = self._slot, None
                self._wake.clear()
            if item is not None:
                self._write(*item)

    def _write(self, frame: Frame, result: dict[str, Any], version: str, reason: str) -> None:
        name = f"{frame.wall_time:.3f}-{self.camera}-{frame.seq}".replace(".", "_", 1)
        try:
            stats = os.statvfs(self.folder)
            if stats.f_bavail < stats.f_blocks * MIN_FREE_FRACTION:
                self.low_space += 1
                return
            from PIL import Image

            image = self.folder / f"{name}.jpg"
            jpeg = io.BytesIO()
            Image.fromarray(frame.captured).save(jpeg, "JPEG", quality=JPEG_QUALITY)
            write_atomic(image, jpeg.getvalue(), 0o640)
            sidecar = {"reason": reason, "result": result, "model": version,
                       "source": frame.source, "ts": round(frame.wall_time, 3),
                       "unit": self.device, "seq": frame.seq, "image": image.name}
            write_atomic(self.folder / f"{name}.json",
                         json.dumps(sidecar, sort_keys=True).encode(), 0o640)
            self.kept += 1
        except (OSError, ValueError) as exc:
            self.write_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]

    def stats(self) -> dict[str, Any]:
        return {"kept": self.kept, "busy_drops": self.busy_drops,
                "write_errors": self.write_errors, "low_space": self.low_space,
                "last_error": self.last_error}

