"""Model updates ordered over MQTT, for one unit or a group of them.

Topics: `edgebake/<device>/update` and, with `update.mqtt_group`, `edgebake/group/<group>/update`.
A message is either `{"url": "https://…/model.ebundle"}` or the bundle's own bytes (up to
MAX_INLINE_BYTES). Either way the bundle goes through every check of `edgebake-update apply`;
an order never bypasses the signature. Each step is reported, retained, on
`edgebake/<device>/update/status` as JSON {at, step, detail}.

Orders are taken only over TLS from an authenticated broker (the config refuses
`update.mqtt_commands` otherwise), a URL only from `update.allowed_origins` (and the pull URL's
origin), with no redirect to another origin, and at most MAX_ORDERS an hour.

The MQTT network thread only queues the order; a supervised thread does the work. The queue
holds one order: a newer one replaces an older one still waiting (counted as superseded).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bundle import BundleError
from .interp import ModelError
from .pull import fetch_bundle, origin
from .redact import redact_text

log = logging.getLogger("edgebake.commands")

MAX_INLINE_BYTES = 4 * 2**20
# At most this many orders are worked on in the window (each costs a download, a golden
# test and a latency run); more are refused and counted.
MAX_ORDERS = 6
RATE_WINDOW_SEC = 3600.0
URL = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")

ApplyBundle = Callable[[Path], str]
Publish = Callable[[str, str], None]  # (step, detail)


class UpdateCommands:
    def __init__(self, folder: Path, apply: ApplyBundle, user_agent: str,
                 origins: tuple[str, ...] = ()) -> None:
        self.folder = folder
        self.origins = origins  # where an ordered URL may point
        self._handled: collections.deque[float] = collections.deque()  # when, for the rate
        self.apply = apply
        self.user_agent = user_agent
        self.publish: Publish = lambda step, detail: None
        self._pending: tuple[str, bytes] | None = None  # (topic, payload)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.received = 0
        self.superseded = 0
        self.applied = 0
        self.refused = 0
        self.limited = 0  # orders refused by the rate limit
        self.last = ""

    def order(self, topic: str, payload: bytes) -> None:
        """From the MQTT thread: keep the newest order, never block."""
        with self._lock:
            if self._pending is not None:
                self.superseded += 1
            self._pending = (topic, payload)
            self.received += 1
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """The supervised worker: one order at a time."""
        while not stop.is_set():
            self._wake.wait(1.0)
            with self._lock:
                item, self._pending = self._pending, None
                self._wake.clear()
            if item is not None:
                self.handle(*item)

    def handle(self, topic: str, payload: bytes) -> str:
        """Fetch or unpack, apply, report; returns the step it ended on."""
        now = time.monotonic()
        while self._handled and now - self._handled[0] > RATE_WINDOW_SEC:
            self._handled.popleft()
        if len(self._handled) >= MAX_ORDERS:
            self.limited += 1
            return self._report("refused", f"{topic}: more than {MAX_ORDERS} orders in "
                                f"{RATE_WINDOW_SEC / 60:.0f} min; try again later")
        self._handled.append(now)
        target = self.folder / "incoming" / "ordered.ebundle"
        try:
            if payload[:1] == b"{":
                try:
                    url = json.loads(payload)["url"]
                except (ValueError, KeyError, TypeError):
                    return self._report("refused", f"{topic}: expected {{\"url\": …}} or a "
                                        "bundle's bytes")
                if not isinstance(url, str) or not URL.fullmatch(url):
                    return self._report("refused", f"{topic}: url: expected an http(s) URL")
                if origin(url) not in self.origins:
                    return self._report("refused", f"{topic}: url: {origin(url)} is not in "
                                        "update.allowed_origins")
                self._report("downloading", url)
                fetch_bundle(url, target, self.user_agent)
            else:
                if len(payload) > MAX_INLINE_BYTES:
                    return self._report("refused", f"{topic}: {len(payload)} bytes inline "
                                        f"(limit {MAX_INLINE_BYTES}); send a URL instead")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(payload)
            self._report("checking", f"{target.stat().st_size} bytes")
            try:
                line = self.apply(target)
            except (BundleError, ModelError) as exc:
                self.refused += 1
                return self._report("refused", str(exc))
            self.applied += 1
            return self._report("applied", line)
        except (OSError, ValueError) as exc:
            return self._report("error", f"{type(exc).__name__}: {exc}")
        finally:
            target.unlink(missing_ok=True)

    def _report(self, step: str, detail: str) -> str:
        detail = redact_text(detail)
        self.last = f"{step}: {detail}"[:300]
        log.info("update order: %s", self.last)
        try:
            self.publish(step, detail[:500])
        except Exception as exc:  # a lost report must not lose the update itself
            log.warning("update status not published: %s", exc)
        return step

    def stats(self) -> dict[str, Any]:
        return {"received": self.received, "superseded": self.superseded,
                "applied": self.applied, "refused": self.refused, "limited": self.limited,
                "last": self.last,
                "at": round(time.time(), 3)}
