"""Model updates ordered over MQTT, for one unit or a group of them.

Topics: `edgebake/<device>/update` and, with `update.mqtt_group`, `edgebake/group/<group>/update`.
An order is signed (`invoke send-order`, see `update.accept_order`): `EBORDER1 <signature>`, a
newline, and the JSON it signs, which names the key, a number larger than any order's before
(a recorded order cannot be replayed), the fleet and the topic's device or group, and either
`url` of a bundle or the bundle itself in base64 (up to MAX_INLINE_BYTES), with an optional
`window_sec` for its trial (the rollout's health window), or `rollback` with the version to
leave. On `edgebake/<device>/os-update` (an A/B unit), an order with `system: true` and the
`url` of a system bundle is downloaded and handed to root's installer (osinbox). Nothing in
an order is parsed before the signature checks out. The bundle then goes
through every check of `edgebake-update apply`. Each step is reported, retained, on
`edgebake/<device>/update/status` as JSON {at, step, detail, seq, version}: `seq` is the number
of the order it answers, so a rollout tells its own answers from older ones. A model taken on
trial gets its verdict there too (`confirmed` or `rolled-back`, with the order's number).

Orders are taken only over TLS from an authenticated broker (the config refuses
`update.mqtt_commands` otherwise), a URL only from `update.allowed_origins` (and the pull URL's
origin), with no redirect to another origin, and at most MAX_ORDERS an hour.

The MQTT network thread only queues the order; a supervised thread does the work. The queue
holds one order: a newer one replaces an older one still waiting (counted as superseded).
"""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bundle import BundleError
from .interp import ModelError
from .osinbox import MAX_OS_BUNDLE_BYTES
from .pull import fetch_bundle, origin
from .redact import redact_text

log = logging.getLogger("edgebake.commands")

MAX_INLINE_BYTES = 4 * 2**20
# At most this many orders are worked on in the window (each costs a download, a golden
# test and a latency run); more are refused and counted.
MAX_ORDERS = 6
RATE_WINDOW_SEC = 3600.0
URL = re.compile(r"https?://[^\s\x00-\x1f\x7f]+")

ApplyBundle = Callable[[Path, int, float | None], str]  # (bundle, order number, window)
MAX_WINDOW_SEC = 86400.0
RollBack = Callable[[str], str]  # (version to leave) -> what runs now
AcceptOrder = Callable[[str, bytes], dict[str, Any]]  # (device or group/<name>, payload)
Publish = Callable[[str, str, int, str], None]  # (step, detail, order number, version)
HandOver = Callable[[Path, int, float | None], str]  # (system bundle, order number, window)
SYSTEM_TOPIC = "os-update"
WINDOW_EXPECTED = f"window_sec: expected seconds from 0 to {MAX_WINDOW_SEC:g}"


def _kind(system: Any) -> str:
    return "system" if system else "model"


def _window(order: dict[str, Any]) -> float | bool | None:
    """The order's trial window in seconds, None when it gives none, False when it is bad."""
    window = order.get("window_sec")
    if window is None:
        return None
    if not isinstance(window, (int, float)) or isinstance(window, bool) or \
            not 0 <= window <= MAX_WINDOW_SEC:
        return False
    return float(window)


class UpdateCommands:
    def __init__(self, folder: Path, accept: AcceptOrder, apply: ApplyBundle, user_agent: str,
                 origins: tuple[str, ...] = (), rollback: RollBack | None = None) -> None:
        self.folder = folder
        self.accept = accept
        self.origins = origins  # where an ordered URL may point
        self._handled: collections.deque[float] = collections.deque()  # when, for the rate
        self.apply = apply
        self.rollback = rollback
        self.take_samples: Callable[[int], str] | None = None  # set while samples are on
        self.share_samples: Callable[[Any], str] | None = None  # ... and HTTP serves them
        self.user_agent = user_agent
        self.publish: Publish = lambda step, detail, seq, version: None
        self.seq = 0  # the number of the order being worked on
        self._pending: tuple[str, bytes] | None = None  # (topic, payload)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.received = 0
        self.superseded = 0
        self.applied = 0
        self.refused = 0
        self.limited = 0  # orders refused by the rate limit
        self.last = ""
        # system orders (edgebake/<device>/os-update): set on an A/B unit
        self.hand_over_os: HandOver | None = None
        self.os_folder = Path("/data/os/fetch")
        self.keep_free_percent = 0.0

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
        """Check, fetch or unpack, apply, report; returns the step it ended on."""
        target = self.folder / "incoming" / "ordered.ebundle"
        self.seq = 0
        try:
            try:  # the signature first: unsigned orders never count against the rate
                order = self.accept(topic.removeprefix("edgebake/").rsplit("/", 1)[0], payload)
            except BundleError as exc:
                self.refused += 1
                return self._report("refused", f"{topic}: {exc}")
            seq = order.get("seq")
            self.seq = seq if isinstance(seq, int) else 0
            now = time.monotonic()
            while self._handled and now - self._handled[0] > RATE_WINDOW_SEC:
                self._handled.popleft()
            if len(self._handled) >= MAX_ORDERS:
                self.limited += 1
                return self._report("refused", f"{topic}: more than {MAX_ORDERS} orders in "
                                    f"{RATE_WINDOW_SEC / 60:.0f} min; try again later")
            self._handled.append(now)
            system = topic.endswith("/" + SYSTEM_TOPIC)
            if bool(order.get("system")) != system:
                self.refused += 1
                return self._report("refused", f"{topic}: a {_kind(order.get('system'))} "
                                    f"order on the {_kind(system)} update topic")
            if system:
                return self._system(topic, order)
            if "rollback" in order:
                return self._roll_back(topic, order.get("rollback"))
            if "samples" in order:
                return self._samples(topic, order.get("samples"))
            if "share_samples" in order:
                return self._share(topic, order.get("share_samples"))
            if not self._fetch(topic, order, target):
                return "refused"
            window = _window(order)
            if window is False:
                self.refused += 1
                return self._report("refused", f"{topic}: {WINDOW_EXPECTED}")
            self._report("checking", f"{target.stat().st_size} bytes")
            try:
                line = self.apply(target, self.seq, window)
            except (BundleError, ModelError) as exc:
                self.refused += 1
                return self._report("refused", str(exc))
            self.applied += 1
            return self._report("applied", line)
        except (OSError, ValueError) as exc:
            return self._report("error", f"{type(exc).__name__}: {exc}")
        finally:
            target.unlink(missing_ok=True)

    def _system(self, topic: str, order: dict[str, Any]) -> str:
        """A signed order to install a system bundle from a URL: downloaded here (never
        eating into the journal's free space), then handed to root's installer."""
        if self.hand_over_os is None:
            self.refused += 1
            return self._report("refused", f"{topic}: this unit takes no system updates (not "
                                "an A/B system)")
        window = _window(order)
        url = order.get("url")
        if window is False or not isinstance(url, str):
            self.refused += 1
            return self._report("refused", f"{topic}: expected url of a system bundle "
                                f"(.raucb){'' if window is not False else '; ' + WINDOW_EXPECTED}")
        if not self._url_allowed(topic, url):
            return "refused"
        target = self.os_folder / "incoming" / "ordered.raucb"
        try:
            self._report("downloading", url)
            fetch_bundle(url, target, self.user_agent, MAX_OS_BUNDLE_BYTES,
                         self.keep_free_percent)
            line = self.hand_over_os(target, self.seq, window)
        finally:
            target.unlink(missing_ok=True)
        self.applied += 1
        return self._report("handed-over", line)

    def _url_allowed(self, topic: str, url: str) -> bool:
        if not URL.fullmatch(url):
            self._report("refused", f"{topic}: url: expected an http(s) URL")
            return False
        if origin(url) not in self.origins:
            self._report("refused", f"{topic}: url: {origin(url)} is not in "
                         "update.allowed_origins")
            return False
        return True

    def _roll_back(self, topic: str, version: Any) -> str:
        """A signed order to leave `version` for the model before it (a rollout's abort)."""
        if not isinstance(version, str) or self.rollback is None:
            self.refused += 1
            return self._report("refused", f"{topic}: rollback: expected the version to leave")
        try:
            line = self.rollback(version)
        except BundleError as exc:
            self.refused += 1
            return self._report("refused", str(exc), version)
        return self._report("rolled-back", line, version)

    def _samples(self, topic: str, count: Any) -> str:
        """A signed order to keep the next frames of every camera as samples."""
        if self.take_samples is None:
            self.refused += 1
            return self._report("refused", f"{topic}: samples are off on this unit "
                                "(samples.enabled)")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100:
            self.refused += 1
            return self._report("refused", f"{topic}: samples: expected 1 to 100 frames")
        return self._report("samples", self.take_samples(count))

    def _share(self, topic: str, wanted: Any) -> str:
        """A signed order to let a collector pull the samples over HTTP for a while."""
        if self.share_samples is None:
            self.refused += 1
            return self._report("refused", f"{topic}: samples are not shared here (samples "
                                "and http must be enabled)")
        try:
            return self._report("samples-shared", self.share_samples(wanted))
        except ValueError as exc:
            self.refused += 1
            return self._report("refused", f"{topic}: {exc}")

    def verdict(self, step: str, detail: str, seq: int, version: str) -> None:
        """A trial's end (confirmed or rolled-back), answering the order that began it."""
        self._report(step, detail, version, seq)

    def _fetch(self, topic: str, order: dict[str, Any], target: Path) -> bool:
        """The ordered bundle into `target`: downloaded from an allowed origin, or decoded."""
        url, inline = order.get("url"), order.get("bundle")
        if isinstance(url, str):
            if not self._url_allowed(topic, url):
                return False
            self._report("downloading", url)
            fetch_bundle(url, target, self.user_agent)
            return True
        if not isinstance(inline, str) or len(inline) > MAX_INLINE_BYTES * 4 // 3 + 4:
            self._report("refused", f"{topic}: expected url, or bundle in base64 of at most "
                         f"{MAX_INLINE_BYTES} bytes (else send a URL)")
            return False
        try:
            data = base64.b64decode(inline, validate=True)
        except binascii.Error:
            self._report("refused", f"{topic}: bundle: expected base64")
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return True

    def _report(self, step: str, detail: str, version: str = "", seq: int | None = None
                ) -> str:
        detail = redact_text(detail)
        self.last = f"{step}: {detail}"[:300]
        log.info("update order: %s", self.last)
        try:
            self.publish(step, detail[:500], self.seq if seq is None else seq, version)
        except Exception as exc:  # a lost report must not lose the update itself
            log.warning("update status not published: %s", exc)
        return step

    def stats(self) -> dict[str, Any]:
        return {"received": self.received, "superseded": self.superseded,
                "applied": self.applied, "refused": self.refused, "limited": self.limited,
                "last": self.last,
                "at": round(time.time(), 3)}
