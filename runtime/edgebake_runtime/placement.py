"""Where a frame sits inside the model input: the one thing decoding needs of preprocessing.

Kept apart from `preprocess` so that worker processes, which only decode, never load PIL.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where the frame landed inside the model input (for mapping boxes back)."""

    scale_x: float = 1.0  # fraction of the input width the frame covers
    scale_y: float = 1.0
    offset_x: float = 0.0  # normalised padding on the left/top
    offset_y: float = 0.0

    def to_frame(self, x: float, y: float) -> tuple[float, float]:
        return (x - self.offset_x) / self.scale_x, (y - self.offset_y) / self.scale_y
