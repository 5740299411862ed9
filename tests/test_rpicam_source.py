"""`rpicam` sources: CSI camera modules through rpicam-vid's YUV420 pipe. The tool here is
the look-alike that `make-raspios-lookalike` puts in its image (same options, same format)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from edgebake_builder.validate.lookalike import RPICAM_VID
from edgebake_runtime.service import Service
from edgebake_runtime.sources.rpicam import yuv420_to_rgb
from runtime_helpers import RunningApp, make_config, wait_for


@pytest.fixture
def tool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def install(folder: Path, text: str) -> None:
    tool = folder / "rpicam-vid"
    tool.write_text(text)
    tool.chmod(0o755)


def rpicam_app(tmp_path: Path, model: Path) -> Service:
    return Service(make_config(tmp_path, model, [{"name": "csi", "kind": "rpicam", "fps": 20,
                                              "width": 640, "height": 480,
                                              "max_age_sec": 3.0}]))


def test_yuv420_grey_and_colour() -> None:
    width, height = 4, 2
    grey = bytes([100] * 8) + bytes([128] * 4)
    assert np.all(yuv420_to_rgb(grey, width, height) == 100)
    red = bytes([76] * 8) + bytes([85] * 2) + bytes([255] * 2)  # Y, Cb, Cr of pure red
    rgb = yuv420_to_rgb(red, width, height)
    assert rgb.shape == (2, 4, 3) and rgb[0, 0, 0] > 240 and rgb[0, 0, 1] < 15


def test_rpicam_frames_arrive_at_the_model_size_and_give_results(
        tmp_path: Path, default_model: Path, tool_dir: Path) -> None:
    install(tool_dir, RPICAM_VID)
    with RunningApp(rpicam_app(tmp_path, default_model)) as running:
        wait_for(lambda: running.app.metrics.results >= 10, 60, "10 results from rpicam-vid")
        # the letterboxed BlazeFace input is 128x128: the camera delivers 128x96, no resize
        csi = wait_for(lambda: (c := running.health()["sources"]["csi"])["frames"] >= 10
                       and c, 5, "the camera's state from its process")
        assert csi["state"] == "up" and csi["frame_size"] == [128, 96], csi


def test_missing_tool_is_a_plain_degraded_source(tmp_path: Path, default_model: Path,
                                                  tool_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tool_dir))  # nothing installed there
    with RunningApp(rpicam_app(tmp_path, default_model)) as running:
        wait_for(lambda: running.health()["sources"]["csi"]["state"] == "down", 20,
                 "the source to report the missing tool")
        health = running.health()
        assert "rpicam-vid not found" in health["sources"]["csi"]["last_error"]
        assert running.app.workers[0].alive()


def test_a_failing_camera_names_its_error_and_is_retried(tmp_path: Path, default_model: Path,
                                                         tool_dir: Path) -> None:
    install(tool_dir, "#!/bin/sh\necho 'ERROR: *** no cameras available ***' >&2\nexit 3\n")
    with RunningApp(rpicam_app(tmp_path, default_model)) as running:
        wait_for(lambda: running.app.cameras.by_name["csi"].stats.reconnects >= 1, 30,
                 "a retry after the tool exits")
        error = running.health()["sources"]["csi"]["last_error"]
        assert "code 3" in error and "no cameras available" in error, error
