"""Frame sources: each runs in its own thread, reconnects with backoff and caps its fps."""

from __future__ import annotations

from ..config import SourceConfig
from .base import Source, SourceStats
from .replay import ReplaySource
from .rpicam import RpicamSource
from .stream import StreamSource
from .synthetic import SyntheticSource
from .v4l2 import V4l2Source

__all__ = ["Source", "SourceStats", "StreamSource", "make_source"]


def make_source(config: SourceConfig) -> Source:
    if config.kind == "synthetic":
        return SyntheticSource(config)
    if config.kind == "replay":
        return ReplaySource(config)
    if config.kind in ("rtsp", "http"):
        return StreamSource(config)
    if config.kind == "v4l2":
        return V4l2Source(config)
    if config.kind == "rpicam":
        return RpicamSource(config)
    if config.kind == "v4l2-auto":
        raise ValueError("v4l2-auto is expanded into one v4l2 source per camera found")
    raise ValueError(f"unknown source kind {config.kind!r}")
