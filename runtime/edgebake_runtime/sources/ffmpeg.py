"""RTSP/HTTP streams and video files through an ffmpeg subprocess that emits raw RGB frames."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import numpy as np

from ..config import SourceConfig
from .base import Source, SourceDown


class FfmpegSource(Source):
    def __init__(self, config: SourceConfig, input_args: list[str] | None = None) -> None:
        super().__init__(config)
        self._input_args = input_args
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cfg = self.config
        if self._input_args is not None:
            inputs = self._input_args
        elif cfg.kind == "rtsp":
            inputs = ["-rtsp_transport", "tcp", "-timeout", "5000000", "-i", cfg.url]
        else:
            inputs = ["-rw_timeout", "5000000", "-i", cfg.url]
        return ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", *inputs,
                "-an", "-vf", f"fps={cfg.fps},scale={cfg.width}:{cfg.height}",
                "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]

    def open(self) -> None:
        if shutil.which("ffmpeg") is None:
            raise SourceDown("ffmpeg is not installed (needed for rtsp/http/video sources)")
        self._proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def read(self) -> np.ndarray[Any, Any]:
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise SourceDown("stream not open")
        size = self.config.width * self.config.height * 3
        data = proc.stdout.read(size)
        if len(data) < size:
            code = proc.poll()
            raise SourceDown(f"stream ended (ffmpeg exit {code})")
        return np.frombuffer(data, dtype=np.uint8).reshape(self.config.height,
                                                           self.config.width, 3)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None
