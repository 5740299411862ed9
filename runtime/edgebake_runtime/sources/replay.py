"""Replays a folder of images (or, through PyAV, a video file) at a set fps, looping.

Images are decoded and scaled to the model's geometry once (PIL's JPEG draft mode and box
reduction, in native code), then served from a small cache, so a replay costs the pipeline
what a camera that delivers the model's size costs it."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..preprocess import REDUCING_GAP
from .base import CorruptFrame, Source, SourceDown, SourceFinished
from .stream import StreamSource

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp"}
DECODED_CACHE_LIMIT = 64
# A frame's header may claim any size; decoding a small file into gigabytes (a decompression
# bomb) would take the unit's memory. 8K is 33 Mpx: anything beyond is refused unread.
MAX_FRAME_PIXELS = 40_000_000


def decode_image(data: bytes, name: str,
                 size_for: Callable[[int, int], tuple[int, int]] | None = None
                 ) -> np.ndarray[Any, Any]:
    """RGB pixels of an image file; with `size_for`, already scaled to the size it gives."""
    try:
        with warnings.catch_warnings():  # our own limit below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as img:
            if img.size[0] * img.size[1] > MAX_FRAME_PIXELS:
                raise CorruptFrame(f"{name}: {img.size[0]}x{img.size[1]} pixels is more than a "
                                   f"camera frame can be ({MAX_FRAME_PIXELS} pixels); refused "
                                   "undecoded")
            if size_for is None:
                return np.asarray(img.convert("RGB"))
            size = size_for(*img.size)
            img.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale when that fits
            rgb = img.convert("RGB")
            if rgb.size != size:
                rgb = rgb.resize(size, Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
            return np.asarray(rgb)
    except UnidentifiedImageError:
        raise CorruptFrame(f"{name}: not a picture ({len(data)} bytes of no known image "
                           "format)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptFrame(f"{name}: {exc}") from None


class ReplaySource(Source):
    can_wait = True
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._video: StreamSource | None = None
        self._files: list[Path] = []
        self._cache: dict[Path, np.ndarray[Any, Any]] = {}
        self._index = 0

    def open(self) -> None:
        path = Path(self.config.path)
        if path.is_file():
            self._video = StreamSource(self.config, location=str(path), live=False)
            self._video.size_for = self.size_for
            self._video.open()
            return
        if not path.is_dir():
            raise SourceDown(f"{path}: no such folder or video file")
        self._files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self._files:
            raise SourceDown(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self._index = 0

    def read(self) -> np.ndarray[Any, Any]:
        if self._video is not None:
            return self._video.read()
        if self._index >= len(self._files):
            if not self.config.loop:
                raise SourceFinished()
            self._index = 0
        path = self._files[self._index]
        self._index += 1
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptFrame(f"{path}: {exc.strerror}") from None
        image = decode_image(data, str(path), self.size_for)
        if len(self._files) <= DECODED_CACHE_LIMIT:
            self._cache[path] = image
        return image

    def close(self) -> None:
        if self._video is not None:
            self._video.close()
            self._video = None
