"""Turns an RGB frame into the model's input tensor, as the model card says."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .card import Card
from .placement import Placement

__all__ = ["REDUCING_GAP", "Placement", "Preprocessor"]

# Shrink by the largest whole factor first (a box filter in native code), then resample what
# is left bilinearly: three times faster than a bilinear resize of the whole frame and still
# anti-aliased (`bench-runtime` depends on it: preprocessing runs in the service process).
REDUCING_GAP = 1.0


def _as_image(frame: np.ndarray[Any, Any]) -> Image.Image:
    """A PIL image over the frame's own memory when it is contiguous RGB (no copy)."""
    if frame.ndim == 3 and frame.shape[2] == 3 and frame.dtype == np.uint8 and \
            frame.flags.c_contiguous:
        h, w = frame.shape[:2]
        return Image.frombuffer("RGB", (w, h), frame, "raw", "RGB", 0, 1)
    return Image.fromarray(frame)


class Preprocessor:
    """Resize (stretch or letterbox), then map uint8 pixels to input values.

    Float inputs are an affine map per channel. Quantised inputs use a lookup table: a
    per-pixel map of uint8 values has only 256 results per channel, so rounding and clipping
    are computed once, not per frame.
    """

    def __init__(self, card: Card) -> None:
        spec = card.inputs[0]
        pre = card.preprocessing
        if len(spec.shape) != 4 or spec.shape[3] not in (1, 3):
            raise ValueError(f"input {spec.name}: expected shape [1, H, W, 3] or [1, H, W, 1], "
                             f"found {list(spec.shape)}")
        self.height, self.width = int(spec.shape[1]), int(spec.shape[2])
        self.channels = int(spec.shape[3])
        self.dtype = np.dtype(spec.dtype)
        self.fit = str(pre.get("fit", "letterbox" if card.task == "blazeface" else "stretch"))
        self.pad = min(max(int(pre.get("pad", 0)), 0), 255)  # the letterbox border's grey
        values = np.arange(256, dtype=np.float64)
        if "mean" in pre and "std" in pre:
            mean = np.asarray(pre["mean"], dtype=np.float64).reshape(-1, 1)
            std = np.asarray(pre["std"], dtype=np.float64).reshape(-1, 1)
            real = (values[None, :] - mean) / std
        else:
            lo, hi = (float(v) for v in pre.get("range", [0.0, 1.0]))
            real = values[None, :] / 255.0 * (hi - lo) + lo
        real = np.broadcast_to(real, (3, 256))[: self.channels]
        # Float inputs with the same map for every channel (the usual range or mean/std):
        # value * scale + offset in two native passes, ten times faster than a table lookup
        # per channel on a strided output. Anything else uses the tables.
        self.affine: tuple[Any, Any] | None = None
        if self.dtype.kind == "f" and np.all(real == real[0]):
            self.affine = (self.dtype.type(real[0, 1] - real[0, 0]), self.dtype.type(real[0, 0]))
        if self.dtype.kind in "iu":
            if spec.scale > 0:
                real = np.round(real / spec.scale + spec.zero_point)
            info = np.iinfo(self.dtype)
            real = np.clip(real, info.min, info.max)
        self.lut = np.ascontiguousarray(real.astype(self.dtype))  # shape (3, 256)

    def native_size(self, width: int, height: int) -> tuple[int, int]:
        """The size a frame of this size is scaled to before padding: a source that scales
        natively (FFmpeg) delivers this size and the resize here is skipped."""
        if self.fit != "letterbox":
            return self.width, self.height
        ratio = min(self.width / width, self.height / height)
        return max(1, round(width * ratio)), max(1, round(height * ratio))

    def resize(self, frame: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], Placement]:
        h, w = frame.shape[:2]
        if (h, w) == (self.height, self.width):
            return frame, Placement()
        if self.fit == "letterbox":
            new_w, new_h = self.native_size(w, h)
            canvas = np.full((self.height, self.width, 3), self.pad, dtype=np.uint8)
            left, top = (self.width - new_w) // 2, (self.height - new_h) // 2
            canvas[top:top + new_h, left:left + new_w] = frame if (w, h) == (new_w, new_h) \
                else np.asarray(_as_image(frame).resize((new_w, new_h),
                                                        Image.Resampling.BILINEAR,
                                                        reducing_gap=REDUCING_GAP))
            return canvas, Placement(new_w / self.width, new_h / self.height,
                                     left / self.width, top / self.height)
        image = _as_image(frame)
        resized = image.resize((self.width, self.height), Image.Resampling.BILINEAR,
                               reducing_gap=REDUCING_GAP)
        return np.asarray(resized), Placement()

    def __call__(self, frame: np.ndarray[Any, Any],
                 out: np.ndarray[Any, Any] | None = None) -> tuple[np.ndarray[Any, Any], Placement]:
        """Return the input tensor [1,H,W,3]; with `out`, write into that buffer instead."""
        resized, placement = self.resize(frame)
        if self.channels == 1:  # grayscale models: ITU-R 601 luma
            resized = np.asarray(Image.fromarray(resized).convert("L"))[:, :, None]
        shape = (1, self.height, self.width, self.channels)
        target = out if out is not None else np.empty(shape, self.dtype)
        if self.affine is not None:
            scale, offset = self.affine
            np.multiply(resized, scale, out=target[0], casting="unsafe")
            target[0] += offset
            return target, placement
        for channel in range(self.channels):
            np.take(self.lut[channel], resized[:, :, channel], out=target[0, :, :, channel])
        return target, placement
