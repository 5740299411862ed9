"""RTSP, HTTP (MJPEG, H.264) and video files, decoded in-process by PyAV (FFmpeg's libraries).

Decoding and scaling run in FFmpeg's native code without the GIL. A live stream is read as
fast as it arrives (a stream read slower than real time only builds latency in the socket),
and only the frames due at the configured fps are converted to RGB. A video file is read at
the configured fps and loops when `loop` is set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..config import SourceConfig
from .base import CorruptFrame, Source, SourceDown, SourceFinished

OPEN_TIMEOUT_SEC = 10.0
READ_TIMEOUT_SEC = 5.0


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise SourceDown("PyAV (av) is not installed: needed for rtsp/http/video sources") \
            from None
    return av


class StreamSource(Source):
    def __init__(self, config: SourceConfig, location: str | None = None,
                 live: bool | None = None) -> None:
        super().__init__(config)
        self.location = location or config.url
        self.live = (config.kind in ("rtsp", "http")) if live is None else live
        self.paced = not self.live  # a live stream paces itself; a file is read at fps
        self._container: Any = None
        self._packets: Iterator[Any] | None = None
        self._pending: list[Any] = []
        self._next_due = 0.0

    def open(self) -> None:
        av = _av()
        options = {"rtsp_transport": "tcp"} if self.location.startswith("rtsp") else {}
        try:
            self._container = av.open(self.location, options=options,
                                      timeout=(OPEN_TIMEOUT_SEC, READ_TIMEOUT_SEC))
        except av.FFmpegError as exc:
            raise SourceDown(f"{self.location}: {exc}") from None
        if not self._container.streams.video:
            raise SourceDown(f"{self.location}: no video stream")
        stream = self._container.streams.video[0]
        stream.thread_type = "AUTO"
        self._packets = self._container.demux(stream)
        self._pending = []
        self._next_due = 0.0

    def _next_frame(self) -> Any:
        av = _av()
        while not self._pending:
            assert self._packets is not None
            try:
                packet = next(self._packets)
            except StopIteration:
                if self.live or not self.config.loop:
                    if self.live:
                        raise SourceDown(f"{self.location}: stream ended") from None
                    raise SourceFinished() from None
                self.close()  # reopening loops any format, seekable or not (raw H.264)
                self.open()
                continue
            if not packet.size:  # the demuxer's flush packet
                continue
            try:
                self._pending.extend(packet.decode())
            except av.InvalidDataError as exc:
                raise CorruptFrame(f"{self.location}: {exc}") from None
        return self._pending.pop(0)

    def read(self) -> np.ndarray[Any, Any]:
        period = 1.0 / self.config.fps
        while True:
            frame = self._next_frame()
            now = time.monotonic()
            if self.live and now < self._next_due:
                continue  # decoded to keep the stream current, not converted
            self._next_due = max(self._next_due + period, now - period) if self.live else 0
            width, height = self.config.width, self.config.height
            if self.size_for is not None:
                width, height = self.size_for(frame.width, frame.height)
            image: np.ndarray[Any, Any] = frame.to_ndarray(width=width, height=height,
                                                           format="rgb24")
            return image

    def close(self) -> None:
        container, self._container = self._container, None
        self._packets = None
        self._pending = []
        if container is not None:
            container.close()
