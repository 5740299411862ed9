"""HTTP pull of model bundles: the unit asks a URL now and then, and applies what is new.

Each poll sends the last ETag as If-None-Match, so an unchanged bundle costs one small 304.
A new one is streamed to /data/models/incoming (size-capped, temp name, renamed when
complete) and goes through exactly the checks of `edgebake-update apply`: signature, target,
version, golden test, latency. A refused bundle is remembered by its ETag (or its sha256 when
the server sends none), so it is not fetched and refused again every poll. Errors back off
from 10 s, doubling up to the poll interval or an hour, whichever is longer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .bundle import MAX_BUNDLE_BYTES, BundleError
from .interp import ModelError
from .redact import redact_text, redact_url
from .supervise import Backoff

log = logging.getLogger("edgebake.pull")

TIMEOUT_SEC = 30.0
CHUNK = 256 * 1024
FIRST_BACKOFF_SEC = 10.0
ROOM_CHECK_BYTES = 16 * 2**20  # free space is looked at again after this much

# apply(bundle path) -> the one line `edgebake-update apply` prints; raises on refusal
ApplyBundle = Callable[[Path], str]


def room_left(folder: Path, keep_free_percent: float) -> int:
    """Bytes that may still be written to `folder`'s filesystem while `keep_free_percent` of
    it stays free (the journal's own reserve: a download must never push results out)."""
    fs = os.statvfs(folder)
    return int(fs.f_bavail * fs.f_frsize - fs.f_blocks * fs.f_frsize * keep_free_percent / 100)


def save_bundle(reply: Any, final: Path, what: str, max_bytes: int = MAX_BUNDLE_BYTES,
                keep_free_percent: float = 0.0) -> tuple[Path, str]:
    """Stream a bundle to a temp name (size-capped, fsynced, never eating into the free space
    kept), then rename; (path, sha256)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    announced = int(reply.headers.get("Content-Length") or 0) if hasattr(reply, "headers") \
        else 0
    if announced > max_bytes:
        raise ValueError(f"{what}: {announced} bytes; this unit takes at most {max_bytes}")
    if keep_free_percent and announced > room_left(final.parent, keep_free_percent):
        raise ValueError(f"{what}: /data has no room for {announced / 2**20:.0f} MiB beside "
                         f"the {keep_free_percent:g} % kept free; nothing was written")
    digest = hashlib.sha256()
    size = 0
    try:
        with part.open("wb") as out:
            while True:
                chunk = reply.read(CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"{what}: more than {max_bytes} bytes; not a "
                                     "bundle this unit takes")
                if keep_free_percent and size % ROOM_CHECK_BYTES < len(chunk) and \
                        room_left(final.parent, keep_free_percent) < CHUNK:
                    raise ValueError(f"{what}: /data filled up during the download (the "
                                     f"{keep_free_percent:g} % kept free is reached); "
                                     "nothing was kept")
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        part.replace(final)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return final, digest.hexdigest()


def origin(url: str) -> str:
    """scheme://host[:port] of a URL."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


class SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are followed only within the origin asked: a bundle server that points
    elsewhere (another host, ftp://, a file) is refused, not followed."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        if origin(newurl) != origin(req.full_url):
            raise urllib.error.URLError(f"redirect to another origin "
                                        f"({redact_url(newurl)}) refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


OPENER = urllib.request.build_opener(SameOriginRedirects)


def fetch_bundle(url: str, final: Path, user_agent: str, max_bytes: int = MAX_BUNDLE_BYTES,
                 keep_free_percent: float = 0.0) -> tuple[Path, str]:
    """GET a bundle from a URL into `final` (no ETag: an MQTT command asks for this one)."""
    request = urllib.request.Request(url, headers={"User-Agent": user_agent})
    try:
        with OPENER.open(request, timeout=TIMEOUT_SEC) as reply:
            return save_bundle(reply, final, url, max_bytes, keep_free_percent)
    except urllib.error.HTTPError as exc:
        raise OSError(f"HTTP {exc.code} from {url}") from None


class BundlePuller:
    def __init__(self, url: str, every_sec: float, folder: Path, apply: ApplyBundle,
                 user_agent: str, name: str = "pulled.ebundle",
                 max_bytes: int = MAX_BUNDLE_BYTES, keep_free_percent: float = 0.0) -> None:
        """`name`, `max_bytes`, `keep_free_percent`: where in `folder`/incoming a download
        goes, how large it may be, and how much of /data it must leave free."""
        self.url = url
        self.name = name
        self.max_bytes = max_bytes
        self.keep_free_percent = keep_free_percent
        self.every_sec = every_sec
        self.folder = folder
        self.apply = apply
        self.user_agent = user_agent
        self.state_file = folder / "pull.json"
        self.checks = 0
        self.not_modified = 0
        self.downloads = 0
        self.last_check: float | None = None  # wall clock
        self.last_result = ""
        self.last_error = ""
        self._backoff = Backoff(FIRST_BACKOFF_SEC, max(every_sec, 3600.0))

    # --- the loop (run by Supervised) ---------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll_once()
                self.last_error = ""
                self._backoff.reset()
                stop.wait(self.every_sec)
            except (OSError, ValueError, urllib.error.URLError) as exc:
                self.last_error = redact_text(f"{type(exc).__name__}: {exc}")[:300]
                log.warning("update pull from %s failed: %s; next try in %.0fs",
                            redact_url(self.url),
                            self.last_error, self._backoff.delay)
                self._backoff.pause(stop)

    def poll_once(self) -> str:
        """One request; returns what happened: not-modified, applied, refused, or seen."""
        remembered = self._remembered()
        request = urllib.request.Request(self.url, headers={"User-Agent": self.user_agent})
        if remembered.get("etag"):
            request.add_header("If-None-Match", str(remembered["etag"]))
        self.checks += 1
        self.last_check = time.time()
        try:
            reply = OPENER.open(request, timeout=TIMEOUT_SEC)
        except urllib.error.HTTPError as exc:
            if exc.code == 304:
                self.not_modified += 1
                return "not-modified"
            raise OSError(f"HTTP {exc.code} from {self.url}") from None
        with reply:
            etag = reply.headers.get("ETag", "")
            bundle, digest = self._download(reply)
        try:
            if not etag and digest == remembered.get("sha256"):
                return "seen"  # no ETag from the server: the same bytes as last time
            try:
                self.last_result = self.apply(bundle)
                outcome = "applied"
            except (BundleError, ModelError) as exc:
                self.last_result = f"refused: {exc}"[:300]
                outcome = "refused"
            log.info("update pull: %s", self.last_result)
            self._remember({"etag": etag, "sha256": digest, "result": self.last_result,
                            "at": round(time.time(), 3)})
            return outcome
        finally:
            bundle.unlink(missing_ok=True)

    # --- helpers --------------------------------------------------------------------------
    def _download(self, reply: Any) -> tuple[Path, str]:
        found = save_bundle(reply, self.folder / "incoming" / self.name, self.url,
                            self.max_bytes, self.keep_free_percent)
        self.downloads += 1
        return found

    def _remembered(self) -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.state_file.read_text())
            if isinstance(data, dict):
                return data
        return {}

    def _remember(self, data: dict[str, Any]) -> None:
        write_atomic(self.state_file, json.dumps(data, sort_keys=True).encode())

    def stats(self) -> dict[str, Any]:
        return {"url": redact_url(self.url), "every_sec": self.every_sec, "checks": self.checks,
                "not_modified": self.not_modified, "downloads": self.downloads,
                "last_check": self.last_check, "last_result": self.last_result,
                "last_error": self.last_error}
