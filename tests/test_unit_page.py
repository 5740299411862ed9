"""The technician's page on a real service on the host: a replay of a known picture through the
shipped face detector, pictures with what it found drawn on them, the token, bad requests,
the live stream's bounds, and the page itself in headless Chromium."""

from __future__ import annotations

import http.client
import io
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_builder.validate.browser import (
    artifacts,
    chromium,
    console_errors,
    open_unit_page,
    picture_shown,
)
from edgebake_runtime.service import Service
from PIL import Image
from runtime_helpers import RunningApp, astronaut_path, make_config, wait_for

TOKEN = "page-token-for-tests-0123456789"
SIDE = 128  # the face detector's input: a picture this size is replayed as it is


def known_picture(tmp: Path) -> tuple[Path, np.ndarray[Any, Any]]:
    folder = tmp / "replay"
    folder.mkdir()
    picture = Image.open(astronaut_path()).convert("RGB").resize((SIDE, SIDE))
    picture.save(folder / "astronaut.png")
    return folder, np.asarray(picture).astype(int)


def page_config(tmp: Path, model: Path, folder: Path, **http: Any) -> Any:
    sources = [{"name": "door", "kind": "replay", "path": str(folder), "fps": 10},
               {"name": "yard", "kind": "v4l2", "device": "/dev/video-not-plugged-in"}]
    return make_config(tmp, model, sources,
                       http={"token": TOKEN, "token_file": str(tmp / "web" / "token"), **http})


def request(app: RunningApp, path: str, headers: dict[str, str] | None = None,
            timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    assert app.app.http is not None
    conn = http.client.HTTPConnection("127.0.0.1", app.app.http.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        answer = conn.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        conn.close()


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def unit(tmp_path: Path, default_model: Path) -> Any:
    folder, raw = known_picture(tmp_path)
    with RunningApp(Service(page_config(tmp_path, default_model, folder))) as app:
        wait_for(lambda: app.health()["inference"]["results"] > 2, 120, "results")
        yield app, raw, tmp_path


def journal_box(tmp: Path) -> list[float]:
    lines = [json.loads(line) for f in sorted((tmp / "results").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    found = [d for line in lines if line["source"] == "door" for d in line["detections"]]
    assert found, "the detector found the astronaut's face"
    return [float(v) for v in found[-1]["box"]]


def test_boxes_are_drawn_where_the_journal_says(unit: Any) -> None:
    app, raw, tmp = unit
    code, headers, body = request(app, "/camera/door.jpg", BEARER)
    assert code == 200 and headers["content-type"] == "image/jpeg", body[:200]
    assert headers["cache-control"] == "no-store" and headers["x-content-type-options"] == "nosniff"
    shown = np.asarray(Image.open(io.BytesIO(body)).convert("RGB")).astype(int)
    assert shown.shape == raw.shape
    x0, y0, x1, y1 = (round(v * SIDE) for v in journal_box(tmp))
    border = np.concatenate([shown[y0, x0:x1] - raw[y0, x0:x1],
                             shown[y1 - 1, x0:x1] - raw[y1 - 1, x0:x1],
                             shown[y0:y1, x0] - raw[y0:y1, x0]])
    # the bottom-left corner is far from the face and from any label
    untouched = shown[-24:, :24] - raw[-24:, :24]
    assert np.abs(border).mean() > 40, "the box's border is drawn on the picture"
    assert np.abs(untouched).mean() < 15, "away from the box the picture is the camera's"
    Image.fromarray(shown.astype(np.uint8)).save(artifacts("host") / "unit-door.png")


def test_nobody_looking_costs_no_picture(unit: Any) -> None:
    app, _, _ = unit
    door = next(c for c in app.app.cameras.processes if c.name == "door")
    results = app.health()["inference"]["results"]
    wait_for(lambda: app.health()["inference"]["results"] > results + 5, 60, "more results")
    assert door.preview_at == 0.0, "no picture is made before anyone asks"
    assert request(app, "/camera/door.jpg", BEARER)[0] == 200
    assert door.preview_at > 0.0


def test_without_the_token_there_is_no_picture_and_no_cookie(unit: Any) -> None:
    app, _, _ = unit
    for path in ("/", "/unit.json", "/camera/door.jpg", "/camera/door.mjpeg",
                 "/?token=wrong-token-0123456"):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456"},
                        {"Cookie": "edgebake_token=wrong-token-0123456"}):
            code, answer, body = request(app, path, headers)
            assert code == 401, (path, headers, code)
            assert "set-cookie" not in answer and b"<img" not in body and b"\xff\xd8" not in body
    code, answer, _ = request(app, f"/?token={TOKEN}")
    assert code == 303 and answer["location"] == "/"
    cookie = answer["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    code, answer, body = request(app, "/", {"Cookie": cookie.split(";")[0]})
    assert code == 200 and b"<main" in body
    assert "script-src 'sha256-" in answer["content-security-policy"]
    assert request(app, "/health")[0] in (200, 503), "/health stays public"
    code, _, body = request(app, "/unit.json", BEARER)
    assert code == 200 and "door" in json.loads(body)["sources"]


def test_bad_requests_get_clear_answers(unit: Any) -> None:
    app, _, _ = unit
    assert request(app, "/favicon.ico")[0] == 204, "a browser's ask gets nothing, and no error"
    assert request(app, "/camera/nobody.jpg", BEARER)[0] == 404
    assert request(app, "/camera/../health.jpg", BEARER)[0] == 400
    assert request(app, "/camera/%2e%2e/door.jpg", BEARER)[0] == 404
    code, _, body = request(app, "/camera/yard.jpg", BEARER)
    assert code == 503 and b"yard" in body, body
    code, _, _ = request(app, "/camera/door.jpg", {**BEARER, "Range": "bytes=0-" + "9" * 4000})
    assert code == 200, "a Range is not honoured, nor does it hurt"
    assert request(app, "/?" + "q=" * 5000, BEARER)[0] in (400, 414, 431)
    assert app.app.http is not None and app.app.http.alive()
    assert app.health()["sources"]["door"]["state"] == "up"


def read_part(stream: Any) -> bytes:
    """One JPEG of a multipart stream."""
    length = 0
    while (line := stream.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    part: bytes = stream.read(length)
    stream.readline()
    return part


def test_live_streams_are_capped_and_a_slow_viewer_is_dropped(
        tmp_path: Path, default_model: Path) -> None:
    folder, _ = known_picture(tmp_path)
    config = page_config(tmp_path, default_model, folder, max_viewers=1, timeout_sec=1.0)
    with RunningApp(Service(config)) as app:
        wait_for(lambda: app.health()["inference"]["results"] > 2, 120, "results")
        assert app.app.http is not None and app.app.page is not None
        conn = http.client.HTTPConnection("127.0.0.1", app.app.http.port, timeout=30)
        conn.request("GET", "/camera/door.mjpeg", headers=BEARER)
        answer = conn.getresponse()
        assert answer.status == 200
        assert answer.getheader("Content-Type").startswith("multipart/x-mixed-replace")
        first, second = read_part(answer), read_part(answer)
        assert first.startswith(b"\xff\xd8") and second.startswith(b"\xff\xd8")
        code, _, body = request(app, "/camera/door.mjpeg", BEARER)
        assert code == 503 and b"too many live viewers" in body
        answer.close()  # the viewer leaves: the next part's write fails
        conn.close()
        wait_for(lambda: app.app.page is not None and app.app.page.watching == 0, 60,
                 "the closed stream's place to be free")
        # a viewer that never reads: its socket buffers fill and the write times out
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", app.app.http.port))
        slow.sendall(f"GET /camera/door.mjpeg HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "\r\n".encode())
        wait_for(lambda: app.app.page is not None and app.app.page.watching == 1, 60,
                 "the slow viewer's stream")
        wait_for(lambda: app.app.page is not None and app.app.page.watching == 0, 120,
                 "the slow viewer to be dropped")
        slow.close()
        assert request(app, "/camera/door.jpg", BEARER)[0] == 200


def test_the_page_in_a_browser(unit: Any) -> None:
    app, _, _ = unit
    assert app.app.http is not None
    base = f"http://127.0.0.1:{app.app.http.port}"
    with chromium() as browser:
        open_unit_page(browser, base, f"/?token={TOKEN}")
        wait_for(lambda: picture_shown(browser, "door"), 60, "the door camera's picture")
        yard = wait_for(lambda: browser.execute_script(
            "const w = document.querySelector('[data-camera=yard] .why');"
            "return w && w.textContent;"), 60, "the yard camera's reason")
        assert "video-not-plugged-in" in yard, yard
        assert "up " in browser.find_element("id", "verdict").text
        model = browser.find_element("id", "model-facts").text
        assert app.app.card.version in model and app.app.card.sha256[:16] in model
        assert browser.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth"), \
            "the page fits a phone's width"
        browser.save_screenshot(str(artifacts("host") / "unit-page.png"))
        assert console_errors(browser) == []


def test_a_token_is_made_once_kept_private_and_printed_by_update_status(
        tmp_path: Path, default_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgebake_runtime.config import validate
    from edgebake_runtime.pagetoken import page_token
    from edgebake_runtime.update import main as update_main
    from runtime_helpers import write_config

    config = make_config(tmp_path, default_model, [], http={
        "token_file": str(tmp_path / "web" / "token")})
    path = write_config(tmp_path, config)
    assert update_main(["--config", str(path), "--overrides", str(tmp_path / "none.yaml"),
                        "status"]) == 0
    assert json.loads(capsys.readouterr().out)["page"]["path"] == "", "none made yet"
    made = page_token(config.http)
    assert (tmp_path / "web" / "token").stat().st_mode & 0o777 == 0o600
    assert page_token(config.http) == made, "kept, not made again"
    assert update_main(["--config", str(path), "--overrides", str(tmp_path / "none.yaml"),
                        "status"]) == 0
    assert json.loads(capsys.readouterr().out)["page"]["path"] == f"/?token={made}"
    seeded = validate(dict(config.raw, http={**config.raw["http"], "token": TOKEN}), "seed")
    assert page_token(seeded.http) == TOKEN, "the seed's token wins"
    with pytest.raises(Exception, match=r"http\.token"):
        validate(dict(config.raw, http={**config.raw["http"], "token": "short"}), "seed")
