"""Preview pictures for the unit's page, made in the camera process only while someone looks.

The service asks (`wire.WANT_PREVIEW`, repeated while a viewer is on the page); the asking
lapses after `wire.PREVIEW_HOLD_SEC`, so a closed page costs nothing but one comparison per
frame. While asked, the decoder offers at most `fps` frames a second (a reference, never a
wait); a thread of its own scales the frame down, draws what the model found on it and
sends the JPEG. A frame offered while that thread is still busy is skipped.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any

from . import wire

# Longest side of a preview: enough to aim a camera on a phone, small enough for one message.
MAX_SIDE = 640
MAX_FPS = 5.0
QUALITIES = (75, 50, 30)  # tried in turn until the JPEG fits one message
BOX = (255, 48, 48)
TEXT_BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)


def annotated_jpeg(image: Any, result: dict[str, Any], limit: int) -> bytes:
    """The frame, scaled to at most MAX_SIDE, with boxes and labels (detectors) or the top
    classes (classifiers) drawn on it, as a JPEG of at most `limit` bytes ("" if none fits)."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image).convert("RGB")
    picture.thumbnail((MAX_SIDE, MAX_SIDE))
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    line = max(2, round(max(width, height) / 200))
    for found in result.get("detections", []):
        x0, y0, x1, y1 = (float(v) for v in found["box"][:4])
        box = (x0 * width, y0 * height, x1 * width, y1 * height)
        draw.rectangle(box, outline=BOX, width=line)
        _label(draw, (box[0], max(0.0, box[1] - 12)), f"{found['label']} {found['score']:.2f}")
    for row, top in enumerate(result.get("top", [])):
        _label(draw, (4, 4 + row * 14), f"{top['label']} {top['score']:.2f}")
    for quality in QUALITIES:
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=quality)
        if out.tell() <= limit:
            return out.getvalue()
    return b""


def _label(draw: Any, where: tuple[float, float], text: str) -> None:
    left, top, right, bottom = draw.textbbox(where, text)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=TEXT_BACKGROUND)
    draw.text(where, text, fill=TEXT)


class PreviewMaker:
    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send
        self.until = 0.0  # previews are wanted until then (time.monotonic())
        self.interval = 1.0
        self.last_offer = 0.0
        self.made = 0
        self.skipped = 0  # offered while the previous one was still being made
        self.last_error = ""
        self._slot: tuple[Any, dict[str, Any]] | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()

    def want(self, fps: float) -> None:
        """From the control thread: previews at `fps` for the next PREVIEW_HOLD_SEC."""
        self.interval = 1.0 / min(max(fps, 0.1), MAX_FPS)
        self.until = time.monotonic() + wire.PREVIEW_HOLD_SEC

    def active(self) -> bool:
        """Worth keeping the captured image of a frame for (someone looks)."""
        return self.until > 0.0 and time.monotonic() < self.until

    def offer(self, image: Any, result: dict[str, Any]) -> None:
        """From the decoder: this frame and its result, if a preview is due."""
        now = time.monotonic()
        if image is None or now >= self.until or now - self.last_offer < self.interval:
            return
        self.last_offer = now
        with self._lock:
            if self._slot is not None:
                self.skipped += 1
            self._slot = (image, result)
        self._wake.set()

    def loop(self) -> None:
        """The preview thread: one picture at a time, as frames are offered."""
        while True:
            self._wake.wait()
            with self._lock:
                item, self._slot = self._slot, None
                self._wake.clear()
            if item is None:
                continue
            try:
                jpeg = annotated_jpeg(item[0], item[1], wire.MAX_MESSAGE - len(wire.PREVIEW))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                continue
            if jpeg:
                self.send(wire.PREVIEW + jpeg)
                self.made += 1
