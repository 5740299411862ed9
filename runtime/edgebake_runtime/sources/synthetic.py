"""A moving test pattern: a source that needs no hardware, for bring-up and tests."""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import Source


class SyntheticSource(Source):
    def open(self) -> None:
        h, w = self.config.height, self.config.width
        y, x = np.mgrid[0:h, 0:w]
        self._base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                               (x + y) * 255 // max(w + h - 2, 1)], axis=-1).astype(np.uint8)
        self._tick = 0

    def read(self) -> np.ndarray[Any, Any]:
        self._tick += 1
        shift = (self._tick * 8) % self.config.width
        return np.roll(self._base, shift, axis=1)
