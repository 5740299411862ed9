"""The technician's page on the unit: `/`, `/camera/<name>.jpg` and `/camera/<name>.mjpeg`.

The page (`web/unit.html`, plain HTML with its script inline) reads `/unit.json` (the
figures of `/health`) and shows each camera's newest picture with what the model found
drawn on it. Pictures of a site are private: everything here needs the unit's token, sent
as `Authorization: Bearer`, or as the cookie that `/?token=...` sets (and only then: no
token, no cookie). Pictures are made in the camera processes only while someone asks
(`camera.preview`). Live streams are capped at `http.max_viewers`; a viewer that stops
reading is dropped after the server's write timeout.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any

from .camera.host import CameraProcess
from .config import HttpSettings
from .http import Reply, Request

PAGE = Path(__file__).with_name("web") / "unit.html"
COOKIE = "edgebake_token"
CAMERA_PATH = re.compile(r"/camera/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})\.(?P<kind>jpg|mjpeg)")
# A picture younger than this is fresh enough to send as it is.
FRESH_SEC = 1.0
# How long a request waits for a camera's next picture.
PICTURE_WAIT_SEC = 4.0
STREAM_FPS = 5.0
# A stream without a new picture for this long sends the last one again (a viewer that has
# gone is noticed by the write); with none at all for this long it ends.
STREAM_IDLE_SEC = 5.0
BOUNDARY = "edgebake-frame"
TEXT = "text/plain; charset=utf-8"


def _inline_hashes(html: str) -> tuple[str, str]:
    """The CSP source of the page's inline script and of its style (their sha256)."""
    def digest(tag: str) -> str:
        found = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        assert found is not None, f"{PAGE} has no <{tag}>"
        return "'sha256-" + base64.b64encode(hashlib.sha256(found[1].encode()).digest()).decode() \
            + "'"
    return digest("script"), digest("style")


class UnitPage:
    def __init__(self, settings: HttpSettings, token: str,
                 cameras: Callable[[], list[CameraProcess]],
                 snapshot: Callable[[], dict[str, Any]]) -> None:
        self.token = token
        self.cameras = cameras
        self.snapshot = snapshot
        self.viewers = threading.BoundedSemaphore(settings.max_viewers) \
            if settings.max_viewers else None
        self.closing = threading.Event()
        self.html = PAGE.read_bytes()
        script, style = _inline_hashes(self.html.decode())
        self.csp = (f"default-src 'none'; script-src {script}; style-src {style}; "
                    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                    "form-action 'none'; frame-ancestors 'none'")
        self.refused = 0
        self.streams = 0  # live streams opened so far
        self.watching = 0  # live streams open now
        self._count_lock = threading.Lock()

    def answer(self, request: Request) -> Reply | None:
        """The reply to a page or camera path (None: not one of them)."""
        path = request.path
        if path == "/favicon.ico":  # a browser asks for it, the 401 page too: none, no error
            return Reply(204, TEXT, b"")
        if path not in ("/", "/index.html", "/unit.json") and not path.startswith("/camera/"):
            return None
        if ".." in path.split("/"):
            return Reply(400, TEXT, b"paths with '..' are refused\n")
        if path.startswith("/camera/") or path == "/unit.json":
            if not self._allowed(request.headers):
                return self._unauthorized()
            if path == "/unit.json":  # /health's figures, 200 however the unit is
                return Reply(200, "application/json",
                             json.dumps(self.snapshot(), sort_keys=True).encode())
            return self._camera(path)
        offered = (request.query.get("token") or [""])[0]
        if offered:
            if not self._matches(offered):
                return self._unauthorized()
            # the token leaves the address bar (and the browser's history) at once
            cookie = f"{COOKIE}={offered}; Path=/; HttpOnly; SameSite=Strict; Max-Age=604800"
            return Reply(303, TEXT, b"see /\n", [("Location", "/"), ("Set-Cookie", cookie)])
        if not self._allowed(request.headers):
            return self._unauthorized()
        return Reply(200, "text/html; charset=utf-8", self.html,
                     [("Content-Security-Policy", self.csp)])

    def _matches(self, offered: str) -> bool:
        return hmac.compare_digest(offered.encode(), self.token.encode())

    def _allowed(self, headers: Any) -> bool:
        bearer = str(headers.get("Authorization") or "")
        if bearer.startswith("Bearer ") and self._matches(bearer[len("Bearer "):].strip()):
            return True
        try:
            cookie = SimpleCookie(str(headers.get("Cookie") or ""))
        except CookieError:
            return False
        return COOKIE in cookie and self._matches(cookie[COOKIE].value)

    def _unauthorized(self) -> Reply:
        self.refused += 1
        return Reply(401, TEXT, b"this unit's page needs its token: open /?token=TOKEN "
                     b"(`sudo edgebake-update status` on the unit prints it)\n",
                     [("WWW-Authenticate", 'Bearer realm="edgebake"')])

    def _camera(self, path: str) -> Reply:
        match = CAMERA_PATH.fullmatch(path)
        camera = next((c for c in self.cameras() if match and c.name == match["name"]), None)
        if match is None or camera is None:
            return Reply(404, TEXT, b"no such camera; /health lists them under sources\n")
        if match["kind"] == "mjpeg":
            return self._stream(camera)
        now = time.monotonic()
        jpeg, _ = camera.newer_preview(now - FRESH_SEC, 1.0, PICTURE_WAIT_SEC)
        if not jpeg:
            why = camera.stats.last_error or f"it is {camera.stats.state}"
            return Reply(503, TEXT, f"camera {camera.name} sent no picture in "
                         f"{PICTURE_WAIT_SEC:.0f} s: {why}\n".encode())
        return Reply(200, "image/jpeg", jpeg)

    def _stream(self, camera: CameraProcess) -> Reply:
        if self.viewers is None or not self.viewers.acquire(blocking=False):
            return Reply(503, TEXT, b"too many live viewers; try again later\n",
                         [("Retry-After", "10")])
        with self._count_lock:
            self.streams += 1
            self.watching += 1
        return Reply(200, f"multipart/x-mixed-replace; boundary={BOUNDARY}", b"",
                     stream=Stream(self._parts(camera), self._stream_ended))

    def _stream_ended(self) -> None:
        with self._count_lock:
            self.watching -= 1
        assert self.viewers is not None
        self.viewers.release()

    def _parts(self, camera: CameraProcess) -> Iterator[bytes]:
        last_at, last = 0.0, b""
        quiet_since = time.monotonic()
        while not self.closing.is_set():
            jpeg, at = camera.newer_preview(last_at, STREAM_FPS, 1.0)
            now = time.monotonic()
            if jpeg:
                last_at, last, quiet_since = at, jpeg, now
            elif now - quiet_since < STREAM_IDLE_SEC:
                continue
            elif not last:
                return
            else:
                quiet_since = now
            yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                   f"Content-Length: {len(last)}\r\n\r\n").encode() + last + b"\r\n"


class Stream:
    """A live stream's parts, releasing its viewer's place once, however it ends."""

    def __init__(self, parts: Iterator[bytes], release: Callable[[], None]) -> None:
        self.parts = parts
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self.parts)

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()
        close = getattr(self.parts, "close", None)
        if close is not None:
            close()
