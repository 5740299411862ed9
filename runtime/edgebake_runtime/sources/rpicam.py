"""Raspberry Pi camera modules (CSI) through the base's `rpicam-vid`, on Raspberry Pi OS bases.

libcamera drives CSI cameras; the generic kernel cannot. rpicam-vid writes raw YUV420 frames
to a pipe at the size and rate asked for, so the camera's ISP does the scaling to the model's
geometry in hardware and this process only converts a small frame to RGB. The source reads
one frame's bytes at a time; a tool that exits or stalls makes the source go down and come
back with the usual backoff. Without rpicam-vid (our Debian base) the source stays down with
a message saying what it needs.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
from typing import Any

import numpy as np
from PIL import Image

from .base import Source, SourceDown

TOOLS = ("rpicam-vid", "libcamera-vid")  # the tool's name before Raspberry Pi OS bookworm
FRAME_TIMEOUT_SEC = 5.0


def yuv420_to_rgb(data: bytes | bytearray | memoryview, width: int, height: int
                  ) -> np.ndarray[Any, Any]:
    """Planar I420 (Y, then U and V at half size) to RGB uint8, converted by PIL."""
    plane = width * height
    y = np.frombuffer(data, np.uint8, plane).reshape(height, width)
    chroma = np.frombuffer(data, np.uint8, plane // 2, plane).reshape(2, height // 2, width // 2)
    ycc = np.empty((height, width, 3), np.uint8)
    ycc[:, :, 0] = y
    ycc[:, :, 1:] = chroma.transpose(1, 2, 0).repeat(2, axis=0).repeat(2, axis=1)
    return np.asarray(Image.fromarray(ycc, "YCbCr").convert("RGB"))


class RpicamSource(Source):
    paced = False  # rpicam-vid delivers at --framerate

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._proc: subprocess.Popen[bytes] | None = None
        self._size = (0, 0)
        self._buffer = bytearray()

    def command(self, tool: str) -> list[str]:
        width, height = self.config.width, self.config.height
        if self.size_for is not None:
            width, height = self.size_for(width, height)
        width, height = width + width % 2, height + height % 2  # I420 needs even sizes
        self._size = (width, height)
        argv = [tool, "--nopreview", "-t", "0", "--codec", "yuv420", "--width", str(width),
                "--height", str(height), "--framerate", f"{self.config.fps:g}", "--flush",
                "--verbose", "0", "-o", "-"]  # quiet: per-frame lines would fill stderr
        if self.config.device:
            argv += ["--camera", self.config.device]
        return argv

    def open(self) -> None:
        tool = next((found for t in TOOLS if (found := shutil.which(t))), None)
        if tool is None:
            raise SourceDown("rpicam-vid not found: CSI camera modules need a Raspberry Pi OS "
                             "base (build-image --base)")
        self._proc = subprocess.Popen(self.command(tool), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        width, height = self._size
        self._buffer = bytearray(width * height * 3 // 2)

    def read(self) -> np.ndarray[Any, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        view = memoryview(self._buffer)
        got = 0
        fd = proc.stdout.fileno()
        while got < len(view):
            ready, _, _ = select.select([fd], [], [], FRAME_TIMEOUT_SEC)
            if not ready:
                raise SourceDown(f"rpicam-vid gave no frame for {FRAME_TIMEOUT_SEC:.0f}s")
            count = os.readv(fd, [view[got:]])
            if count == 0:
                raise SourceDown(f"rpicam-vid exited ({self._exit_reason()})")
            got += count
        return yuv420_to_rgb(self._buffer, *self._size)

    def _exit_reason(self) -> str:
        proc = self._proc
        if proc is None:
            return "not started"
        try:
            code = proc.wait(2)
        except subprocess.TimeoutExpired:
            return "closed its output"
        err = proc.stderr.read()[-300:].decode(errors="replace").strip() if proc.stderr else ""
        return f"code {code}" + (f": {err.splitlines()[-1]}" if err else "")

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
