"""RTSP and video sources through PyAV, against a real RTSP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import io
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_builder.validate.qemu import free_port
from edgebake_builder.validate.rtsp import RtspServer, make_h264
from edgebake_runtime.journal import read_lines
from edgebake_runtime.service import Service
from PIL import Image
from runtime_helpers import RunningApp, astronaut_path, make_config, wait_for


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    picture = np.asarray(Image.open(astronaut_path()).convert("RGB"))
    return make_h264(tmp_path_factory.mktemp("h264") / "astronaut.h264", seconds=3, fps=15,
                     picture=picture)


def rtsp_app(tmp_path: Path, model: Path, url: str, **source: Any) -> Service:
    return Service(make_config(tmp_path, model, [{"name": "cam", "kind": "rtsp", "url": url,
                                              "fps": 10, "max_age_sec": 3.0, **source}]))


def test_rtsp_stream_gives_results(tmp_path: Path, default_model: Path,
                                   stream_file: Path) -> None:
    with RtspServer(stream_file, 15) as server, \
            RunningApp(rtsp_app(tmp_path, default_model, server.url())) as running:
        wait_for(lambda: running.app.metrics.results >= 15, 60, "15 results from RTSP")
        health = running.health()
        cam = health["sources"]["cam"]
        assert cam["state"] == "up" and cam["last_frame_age_sec"] < 2.0, cam
        # the stream runs at 15 fps; the source converts only what is due at 10 fps
        assert 6 <= cam["fps"] <= 12, cam
    records = list(read_lines(tmp_path / "results"))
    assert any(r["detections"] for r in records), "no face found in the astronaut stream"


def test_rtsp_reconnects_after_the_server_restarts(tmp_path: Path, default_model: Path,
                                                   stream_file: Path) -> None:
    port = free_port()
    server = RtspServer(stream_file, 15, port=port).start()
    app = rtsp_app(tmp_path, default_model, server.url())
    with RunningApp(app) as running:
        try:
            wait_for(lambda: running.app.metrics.results >= 5, 60, "results before the restart")
            server.stop()
            wait_for(lambda: running.health()["sources"]["cam"]["state"] == "down", 30,
                     "the source to notice the server is gone")
            assert not running.health()["healthy"]
            server = RtspServer(stream_file, 15, port=port).start()
            count = running.app.metrics.results
            wait_for(lambda: running.app.metrics.results > count + 5, 90,
                     "results after the server came back")
            cam = running.health()["sources"]["cam"]
            assert cam["state"] == "up" and cam["reconnects"] >= 1, cam
        finally:
            server.stop()


def test_a_dead_url_is_a_degraded_source_not_a_crash(tmp_path: Path,
                                                      default_model: Path) -> None:
    url = f"rtsp://127.0.0.1:{free_port()}/nothing-here"
    with RunningApp(rtsp_app(tmp_path, default_model, url, max_age_sec=1.0)) as running:
        health = wait_for(lambda: (h := running.health())["sources"]["cam"]["state"] == "down"
                          and h, 30, "the dead URL to show as a down source")
        assert health["sources"]["cam"]["last_error"], health["sources"]["cam"]
        wait_for(lambda: "cam" in running.health()["status"], 10, "the status to name it")
        assert not running.health()["healthy"]
        _, restart_helps, _ = running.app.evaluate(time.monotonic())
        assert not restart_helps, "a dead camera URL must not restart the service"


def test_a_cameras_credentials_never_reach_health_or_the_status(tmp_path: Path,
                                                                 default_model: Path) -> None:
    """A camera URL's user, password and query stay in the config: /health, its status line
    (systemd's STATUS=) and the MQTT health topic (the same snapshot) show the URL without."""
    port = free_port()
    url = f"rtsp://viewer:s3cret@127.0.0.1:{port}/live?token=t0ken"
    with RunningApp(rtsp_app(tmp_path, default_model, url, max_age_sec=1.0)) as running:
        health = wait_for(lambda: (h := running.health())["sources"]["cam"]["last_error"]
                          and "cam" in h["status"] and h, 30, "the dead camera's error")
        _, _, status = running.app.evaluate(time.monotonic())
    text = str(health) + status
    assert "s3cret" not in text and "t0ken" not in text and "viewer" not in text, text
    # where it points stays, for the technician
    assert f"rtsp://127.0.0.1:{port}/live…" in health["sources"]["cam"]["last_error"]


def test_urls_lose_their_secrets_and_keep_where_they_point() -> None:
    from edgebake_runtime.redact import redact_text, redact_url

    assert redact_url("rtsp://u:p@cam.local:8554/s?x=1#f") == "rtsp://cam.local:8554/s…"
    assert redact_url("https://h/b.ebundle") == "https://h/b.ebundle"
    assert redact_url("http://u:p@[::1]:80/") == "http://[::1]:80/"
    assert redact_text("Errno 111: 'rtsp://a:b@10.0.0.5/x?t=1' refused") == \
        "Errno 111: 'rtsp://10.0.0.5/x…' refused"


def test_video_file_replay_through_pyav(tmp_path: Path, default_model: Path,
                                        stream_file: Path) -> None:
    config = make_config(tmp_path, default_model, [{"name": "clip", "kind": "replay",
                                                    "path": str(stream_file), "fps": 30}])
    with RunningApp(Service(config)) as running:
        # 3 s of video at 15 fps is 45 frames: more results than that means it looped
        wait_for(lambda: running.app.metrics.results > 60, 60, "the clip to loop")


class MjpegHandler(http.server.BaseHTTPRequestHandler):
    """multipart/x-mixed-replace JPEG frames, as IP cameras serve them."""

    frame = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        try:
            while True:
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                 + str(len(self.frame)).encode() + b"\r\n\r\n" + self.frame
                                 + b"\r\n")
                time.sleep(0.05)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        pass


def test_http_mjpeg_camera_gives_results(tmp_path: Path, default_model: Path) -> None:
    buf = io.BytesIO()
    Image.open(astronaut_path()).convert("RGB").save(buf, "JPEG")
    MjpegHandler.frame = buf.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), MjpegHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/video.mjpg"
    config = make_config(tmp_path, default_model, [{"name": "ipcam", "kind": "http",
                                                    "url": url, "fps": 10}])
    try:
        with RunningApp(Service(config)) as running:
            wait_for(lambda: running.app.metrics.results >= 10, 60, "results from MJPEG")
            assert running.health()["sources"]["ipcam"]["state"] == "up"
    finally:
        server.shutdown()
        server.server_close()
    assert any(r["detections"] for r in read_lines(tmp_path / "results"))
