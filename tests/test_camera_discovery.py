"""Cameras found by themselves: stable names from /dev/v4l links, and a unit without one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from edgebake_runtime.service import Service
from edgebake_runtime.sources.discover import can_capture, find_cameras
from runtime_helpers import RunningApp, make_config, wait_for


def fake_dev(tmp_path: Path) -> tuple[Path, Path]:
    """A /dev with three video nodes and udev's links to them (the nodes are plain files,
    so only the naming is exercised here; QEMU's boot test finds a real vivid camera)."""
    dev, v4l = tmp_path / "dev", tmp_path / "dev" / "v4l"
    (v4l / "by-id").mkdir(parents=True)
    (v4l / "by-path").mkdir()
    for n in range(3):
        (dev / f"video{n}").write_text("")
    (v4l / "by-id" / "usb-Acme_Cam_1234-video-index0").symlink_to(dev / "video0")
    (v4l / "by-id" / "usb-Acme_Cam_1234-video-index1").symlink_to(dev / "video1")
    (v4l / "by-path" / "platform-fe980000.usb-usb-0:1:1.0-video-index0").symlink_to(
        dev / "video0")
    (v4l / "by-path" / "platform-vivid.0-video-index0").symlink_to(dev / "video2")
    return dev, v4l


def test_names_come_from_by_id_then_by_path(tmp_path: Path) -> None:
    dev, v4l = fake_dev(tmp_path)
    capture = {str(dev / "video0"), str(dev / "video2")}  # video1: a metadata node
    cameras = find_cameras(v4l, dev, check=lambda node: node in capture)
    assert [(c.name, Path(c.device).name) for c in cameras] == [
        ("usb-Acme_Cam_1234", "usb-Acme_Cam_1234-video-index0"),
        ("platform-vivid.0", "platform-vivid.0-video-index0")]


def test_without_udev_links_the_nodes_are_used(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "video4").write_text("")
    cameras = find_cameras(tmp_path / "no-v4l", dev, check=lambda node: True)
    assert [(c.name, c.device) for c in cameras] == [("video4", str(dev / "video4"))]


def test_a_node_that_is_not_a_v4l2_device_is_left_out(tmp_path: Path) -> None:
    node = tmp_path / "video0"
    node.write_text("")
    assert not can_capture(str(node))  # the ioctl fails on a regular file
    assert not can_capture(str(tmp_path / "missing"))


def test_no_camera_is_reported_and_waited_for(tmp_path: Path, default_model: Path) -> None:
    if any(Path("/dev").glob("video*")):
        pytest.skip("this host has video devices")
    config = make_config(tmp_path, default_model, [{"name": "cameras", "kind": "v4l2-auto"}])
    with RunningApp(Service(config)) as running:
        health = wait_for(lambda: (h := running.health()) and "no camera" in h["status"] and h,
                          10, "the status to say there is no camera")
        assert not health["healthy"] and health["sources"] == {}
        _, restart_helps, _ = running.app.evaluate(time.monotonic())
        assert not restart_helps, "waiting for a camera is not a reason to restart"
        assert running.app.cameras.scanner is not None and running.app.cameras.scanner.alive()
