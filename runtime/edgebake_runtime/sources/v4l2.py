"""V4L2 capture (USB cameras, vivid) with mmap streaming, MJPEG or YUYV, in plain Python."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import select
import struct
from typing import Any

import numpy as np

from .base import CorruptFrame, Source, SourceDown
from .replay import decode_image

BUF_TYPE_VIDEO_CAPTURE = 1
MEMORY_MMAP = 1
FIELD_ANY = 0
BUFFER_COUNT = 4
FRAME_TIMEOUT_SEC = 5.0
FORMAT_SIZE, BUFFER_SIZE, REQBUFS_SIZE = 208, 88, 20


def _fourcc(code: str) -> int:
    a, b, c, d = (ord(ch) for ch in code)
    return a | (b << 8) | (c << 16) | (d << 24)


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("V") << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (ord("V") << 8) | nr


VIDIOC_S_FMT = _iowr(5, FORMAT_SIZE)
VIDIOC_REQBUFS = _iowr(8, REQBUFS_SIZE)
VIDIOC_QUERYBUF = _iowr(9, BUFFER_SIZE)
VIDIOC_QBUF = _iowr(15, BUFFER_SIZE)
VIDIOC_DQBUF = _iowr(17, BUFFER_SIZE)
VIDIOC_STREAMON = _iow(18, 4)
VIDIOC_STREAMOFF = _iow(19, 4)
MJPEG, YUYV = _fourcc("MJPG"), _fourcc("YUYV")


def yuyv_to_rgb(data: bytes, width: int, height: int) -> np.ndarray[Any, Any]:
    """BT.601 limited-range YUYV 4:2:2 to RGB uint8; a short buffer is a corrupt frame."""
    expected = width * height * 2
    if len(data) < expected or width % 2:
        raise CorruptFrame(f"short YUYV frame: {len(data)} bytes, expected {expected} for "
                           f"{width}x{height}")
    raw = np.frombuffer(data, dtype=np.uint8, count=width * height * 2).reshape(height, width // 2,
                                                                                 4)
    y = raw[:, :, [0, 2]].reshape(height, width).astype(np.float32) - 16.0
    u = np.repeat(raw[:, :, 1], 2, axis=1).astype(np.float32) - 128.0
    v = np.repeat(raw[:, :, 3], 2, axis=1).astype(np.float32) - 128.0
    y *= 1.164
    rgb = np.stack([y + 1.596 * v, y - 0.392 * u - 0.813 * v, y + 2.017 * u], axis=-1)
    result: np.ndarray[Any, Any] = np.clip(rgb, 0, 255).astype(np.uint8)
    return result


def _buffer(index: int = 0) -> bytearray:
    buf = bytearray(BUFFER_SIZE)
    struct.pack_into("=II", buf, 0, index, BUF_TYPE_VIDEO_CAPTURE)
    struct.pack_into("=I", buf, 60, MEMORY_MMAP)
    return buf


class V4l2Source(Source):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fd = -1
        self._maps: list[mmap.mmap] = []
        self._format = 0
        self._size = (0, 0)

    def _set_format(self, fourcc: int) -> tuple[int, int, int]:
        fmt = bytearray(FORMAT_SIZE)
        struct.pack_into("=I", fmt, 0, BUF_TYPE_VIDEO_CAPTURE)
        struct.pack_into("=IIII", fmt, 8, self.config.width, self.config.height, fourcc, FIELD_ANY)
        fcntl.ioctl(self._fd, VIDIOC_S_FMT, fmt)
        width, height, chosen = struct.unpack_from("=III", fmt, 8)
        return width, height, chosen

    def open(self) -> None:
        try:
            self._fd = os.open(self.config.device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceDown(f"{self.config.device}: {exc.strerror}") from None
        for fourcc in (MJPEG, YUYV):
            width, height, chosen = self._set_format(fourcc)
            if chosen == fourcc:
                self._format, self._size = fourcc, (width, height)
                break
        else:
            raise SourceDown(f"{self.config.device}: supports neither MJPEG nor YUYV")
        req = bytearray(REQBUFS_SIZE)
        struct.pack_into("=III", req, 0, BUFFER_COUNT, BUF_TYPE_VIDEO_CAPTURE, MEMORY_MMAP)
        fcntl.ioctl(self._fd, VIDIOC_REQBUFS, req)
        count = struct.unpack_from("=I", req, 0)[0]
        if count < 2:
            raise SourceDown(f"{self.config.device}: driver gave {count} capture buffers")
        for index in range(count):
            buf = _buffer(index)
            fcntl.ioctl(self._fd, VIDIOC_QUERYBUF, buf)
            offset = struct.unpack_from("=I", buf, 64)[0]
            length = struct.unpack_from("=I", buf, 72)[0]
            self._maps.append(mmap.mmap(self._fd, length, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=offset))
            fcntl.ioctl(self._fd, VIDIOC_QBUF, buf)
        fcntl.ioctl(self._fd, VIDIOC_STREAMON, struct.pack("=I", BUF_TYPE_VIDEO_CAPTURE))

    def read(self) -> np.ndarray[Any, Any]:
        ready, _, _ = select.select([self._fd], [], [], FRAME_TIMEOUT_SEC)
        if not ready:
            raise SourceDown(f"{self.config.device}: no frame for {FRAME_TIMEOUT_SEC:.0f}s")
        buf = _buffer()
        try:
            fcntl.ioctl(self._fd, VIDIOC_DQBUF, buf)
        except BlockingIOError:
            raise CorruptFrame("spurious wake-up") from None
        index = struct.unpack_from("=I", buf, 0)[0]
        used = struct.unpack_from("=I", buf, 8)[0]
        data = bytes(self._maps[index][:used])
        fcntl.ioctl(self._fd, VIDIOC_QBUF, buf)
        width, height = self._size
        if self._format == MJPEG:
            return decode_image(data, self.config.device, self.size_for)
        return yuyv_to_rgb(data, width, height)

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._fd, VIDIOC_STREAMOFF,
                            struct.pack("=I", BUF_TYPE_VIDEO_CAPTURE))
            for m in self._maps:
                m.close()
            self._maps = []
            os.close(self._fd)
            self._fd = -1
