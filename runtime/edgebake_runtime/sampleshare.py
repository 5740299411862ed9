"""Samples fetched over the unit's HTTP server for a while, on a signed order.

`collect-samples --broker` orders `{"share_samples": {"minutes": M, "token_sha256": H}}`.
The collector keeps the token; only its sha256 crosses the broker, so nobody who reads the
fleet's topics can use it. The unit answers with the URL to pull from, and serves
`/samples` (the names) and `/samples/<name>.jpg|.json` to requests that carry the token, for
M minutes (at most MAX_MINUTES) and at most MAX_REQUESTS requests. A collected sidecar moves
the unit's `.collected` mark, so pruning counts only what nobody fetched.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

from .http import Reply, Request
from .samples import NAME
from .samplestore import SampleStore

MAX_MINUTES = 60
MAX_REQUESTS = 20000
MAX_FILE_BYTES = 16 * 2**20
HEX64 = re.compile(r"[0-9a-f]{64}")


class SampleShare:
    def __init__(self, store: SampleStore, where: Callable[[], str]) -> None:
        self.store = store
        self.where = where  # the URL this unit's HTTP server is reached at, as the broker sees it
        self._lock = threading.Lock()
        self._digest = ""
        self._until = 0.0
        self.requests = 0
        self.refused = 0

    def open(self, order: Any) -> str:
        """A share order's answer: the URL to pull from (ValueError: a malformed order)."""
        if not isinstance(order, dict):
            raise ValueError("share_samples: expected {minutes, token_sha256}")
        minutes, digest = order.get("minutes"), order.get("token_sha256")
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or \
                not 0 < minutes <= MAX_MINUTES:
            raise ValueError(f"share_samples.minutes: expected 1 to {MAX_MINUTES}")
        if not isinstance(digest, str) or not HEX64.fullmatch(digest):
            raise ValueError("share_samples.token_sha256: expected 64 hex digits")
        with self._lock:
            self._digest, self._until, self.requests = digest, time.monotonic() + minutes * 60, 0
        return f"{self.where()}/samples"

    def answer(self, request: Request) -> Reply | None:
        """The HTTP reply for a /samples request (None: not one)."""
        path = request.path
        if path != "/samples" and not path.startswith("/samples/"):
            return None
        token = (request.query.get("token") or [""])[0]
        with self._lock:
            allowed = bool(self._digest) and time.monotonic() < self._until and \
                hmac.compare_digest(hashlib.sha256(token.encode()).hexdigest(), self._digest)
            if allowed:
                self.requests += 1
                allowed = self.requests <= MAX_REQUESTS
        if not allowed:
            self.refused += 1
            return Reply(403, "text/plain", b"samples are not shared with this token now\n")
        if path == "/samples":
            names = [name for name, files in self.store.listing() if len(files) == 2]
            return Reply(200, "application/json", json.dumps({"samples": names}).encode())
        match = re.fullmatch(r"/samples/(?P<name>[^/]+)\.(?P<kind>jpg|json)", path)
        if match is None or not NAME.fullmatch(match["name"]):
            return Reply(404, "text/plain", b"no such sample\n")
        file = self.store.folder / f"{match['name']}.{match['kind']}"
        try:
            with file.open("rb") as handle:
                body = handle.read(MAX_FILE_BYTES + 1)
        except OSError:
            return Reply(404, "text/plain", b"no such sample\n")
        if len(body) > MAX_FILE_BYTES:
            return Reply(413, "text/plain", b"sample too large\n")
        if match["kind"] == "json":
            with contextlib.suppress(OSError):  # only the unseen count is less exact then
                self.store.mark_collected(match["name"])
        kind = "image/jpeg" if match["kind"] == "jpg" else "application/json"
        return Reply(200, kind, body)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            left = max(0.0, self._until - time.monotonic()) if self._digest else 0.0
        return {"shared_for_sec": round(left), "requests": self.requests,
                "refused": self.refused}
