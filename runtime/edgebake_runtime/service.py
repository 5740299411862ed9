"""The service: camera processes -> journal/MQTT, with /health, model updates and systemd's
watchdog. This module wires the parts together and runs the READY/WATCHDOG loop."""

from __future__ import annotations

import logging
import sys
import threading
import time
from functools import partial
from typing import Any

from . import health, snapshot
from .camera.host import CameraProcess
from .cameras import Cameras
from .card import Card
from .config import AppConfig
from .http import HealthServer
from .interp import runtime_name_and_version
from .journal import Journal
from .metrics import Metrics
from .modelstore import ModelStore
from .pagetoken import page_token
from .results import ResultSink
from .rollout import Rollout
from .sampleshare import SampleShare
from .samplestore import SampleStore
from .sdnotify import Notifier, watchdog_interval_sec
from .supervise import Supervised
from .unitpage import UnitPage

log = logging.getLogger("edgebake")
# Reader threads of the camera processes get the GIL back soon after they wake.
SWITCH_INTERVAL_SEC = 0.0005
# Health snapshot to MQTT (`edgebake/<device>/health`, retained) this often.
HEALTH_TOPIC_SEC = 30.0
# READY=1 comes with the first result; without a camera it comes after this grace period so
# systemd does not kill a unit that is only waiting for a camera (its status says so).
READY_GRACE_SEC = 60.0


class Service:
    def __init__(self, config: AppConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.started = time.monotonic()
        self.status = "starting"
        self.healthy = False
        self.ready = False
        self._stop = threading.Event()
        self.runtime = runtime_name_and_version()
        self.results = ResultSink(config.journal)
        self.cameras = Cameras(config, self.metrics, self.results.write_lines, self._stop)
        self.rollout = Rollout(config, self.cameras, self.metrics, self._stop)
        self.rollout.load_first()
        self.mqtt: Any = None
        self.http: HealthServer | None = None
        self._health_published = 0.0
        self.samples: SampleStore | None = None
        self.samples_thread: Supervised | None = None
        self.share: SampleShare | None = None
        self.page: UnitPage | None = None
        self.page_error = ""

    @property
    def card(self) -> Card:
        """The card of the model every camera runs."""
        assert self.cameras.card is not None
        return self.cameras.card

    @property
    def store(self) -> ModelStore:
        return self.rollout.store

    @property
    def journal(self) -> Journal:
        return self.results.journal

    @property
    def workers(self) -> list[CameraProcess]:
        return self.cameras.processes

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_SEC)
        self.results.open()
        self.cameras.start()
        http = self.config.http
        if http.enabled:
            self.http = HealthServer(http.bind, http.port, self.snapshot, http.max_connections,
                                     http.timeout_sec, list(http.allow))
            self._open_page()
            self.http.start()
        if self.config.mqtt.enabled:
            from .mqtt import MqttPublisher

            self.mqtt = MqttPublisher(self.config.mqtt, self.journal.folder,
                                      self.config.device_id)
            self.journal.delivered = self.mqtt.cursor.position
        self.rollout.start(self.mqtt)
        if self.config.samples.enabled:
            self.samples = SampleStore(self.config.samples, self.config.journal.min_free_percent)
            self.samples_thread = Supervised("samples", partial(self.samples.run, self._stop),
                                             self._stop)
            self.samples_thread.start()
            if self.http is not None:
                self.share = SampleShare(self.samples, self._reached_at)
                self.http.routes.append(self.share.answer)
            if self.rollout.commands is not None:
                self.rollout.commands.take_samples = self.take_samples
                if self.share is not None:
                    self.rollout.commands.share_samples = self.share.open
        if self.mqtt is not None:
            self.mqtt.start()

    def _open_page(self) -> None:
        """The technician's page, unless its token cannot be kept (then /health says why)."""
        assert self.http is not None
        try:
            token = page_token(self.config.http)
        except OSError as exc:
            self.page_error = f"no page: its token cannot be kept: {exc}"[:300]
            log.error("%s", self.page_error)
            return
        self.page = UnitPage(self.config.http, token, lambda: list(self.cameras.processes),
                             self.snapshot)
        self.http.routes.append(self.page.answer)

    def _reached_at(self) -> str:
        """http://<address>:<port> of this unit's HTTP server, as the broker sees the unit."""
        address = (self.mqtt.local_address() if self.mqtt is not None else "") or "127.0.0.1"
        port = self.http.port if self.http is not None else 0
        return f"http://{f'[{address}]' if ':' in address else address}:{port}"

    def take_samples(self, count: int) -> str:
        """An order's request: every camera keeps its next `count` frames."""
        for camera in list(self.cameras.processes):
            camera.request_samples(count)
        return f"the next {count} frame(s) of {len(self.cameras.processes)} camera(s) kept"

    def stop(self) -> None:
        """Cameras first (their last lines still arrive), then the sinks."""
        self.notifier.stopping("stopping: draining queues and flushing results")
        self._stop.set()  # no camera is added from here on
        self.cameras.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.journal.close()
        if self.page is not None:
            self.page.closing.set()
        if self.http is not None:
            self.http.stop()

    def request_stop(self) -> None:
        self._stop.set()

    # --- health ------------------------------------------------------------------------
    def _threads(self) -> list[Supervised]:
        scanner = [self.cameras.scanner] if self.cameras.scanner is not None else []
        samples = [self.samples_thread] if self.samples_thread is not None else []
        return [*self.rollout.threads, *scanner, *samples]

    def verdict(self, now: float) -> health.Verdict:
        return health.judge(health.Observed(
            now=now, started=self.started, stall_sec=self.config.watchdog.stall_sec,
            switching=self.cameras.switching.locked(),
            last_result_at=max(self.metrics.last_result_at, self.rollout.switched_at),
            cameras=list(self.cameras.processes), threads=self._threads(),
            journal=self.journal, mqtt=self.mqtt,
            http_alive=self.http.alive() if self.http is not None else None))

    def evaluate(self, now: float, verdict: health.Verdict | None = None
                 ) -> tuple[bool, bool, str]:
        """(healthy, restart_helps, status)."""
        verdict = verdict or self.verdict(now)
        if not verdict.healthy:
            return False, verdict.restart_helps, verdict.status()
        cameras = list(self.cameras.processes)
        fps = sum(c.stats.fps for c in cameras)
        p50 = self.metrics.inference.percentile(50)
        latency = f", inference p50 {p50 * 1000:.1f} ms" if p50 is not None else ""
        return True, False, (f"running: {len(cameras)} source(s) at {fps:.1f} fps total"
                             f"{latency}, {self.journal.written} results journaled")

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        cameras = list(self.cameras.processes)
        # the sources first, then the verdict, judged now: a source the snapshot shows down
        # is down in the verdict too (a state changing between the two reads only moves on)
        sources = snapshot.sources(cameras, now)
        verdict = self.verdict(now)
        healthy, _, status = self.evaluate(now, verdict)
        rollout = self.rollout
        snap: dict[str, Any] = {
            "healthy": healthy, "ready": self.ready,
            "status": status if self.ready or healthy else f"starting: {status}",
            "problems": verdict.stuck + verdict.degraded,
            "uptime_sec": round(now - self.started, 1),
            "device_id": self.config.device_id,
            "group": self.config.update.mqtt_group,
            "model": snapshot.model(self.card, str(self.cameras.model), rollout.swaps,
                                    rollout.trial_health(),
                                    rollout.last_swap_gap_sec, self.runtime),
            "sources": sources,
            "inference": {**snapshot.inference(cameras, self.metrics),
                          "threads": self.cameras.threads_health()},
            "journal": self.journal.stats(),
            "update": rollout.stats(),
            "samples": self._samples_health(),
            "system": snapshot.system(),
            "page": self._page_health(),
        }
        if self.mqtt is not None:
            snap["mqtt"] = self.mqtt.stats()
        return snap

    def _page_health(self) -> dict[str, Any]:
        page = self.page
        if page is None:
            return {"enabled": False, "error": self.page_error}
        return {"enabled": True, "url": f"{self._reached_at()}/",
                "streams": page.streams, "watching": page.watching,
                "refused": page.refused,
                "streams_max": self.config.http.max_viewers}

    def _samples_health(self) -> dict[str, Any]:
        if self.samples is None:
            return {"enabled": False}
        kept: dict[str, Any] = {}
        for camera in list(self.cameras.processes):
            for key, value in camera.samples.items():
                kept[key] = kept.get(key, 0) + value if isinstance(value, int) else \
                    (value or kept.get(key, ""))
        shared = {"shared": self.share.stats()} if self.share is not None else {}
        return {"enabled": True, **self.samples.stats(), **kept, **shared}

    # --- the watchdog loop ---------------------------------------------------------------
    def run(self) -> None:
        """Supervise until asked to stop: READY after the first result, then WATCHDOG pings."""
        tick = min(watchdog_interval_sec() or 1.0, 1.0)
        last_status = ""
        self.notifier.status("loading done; waiting for the first frame to be inferred")
        while not self._stop.wait(tick):
            now = time.monotonic()
            self.journal.sync_if_due()
            self.healthy, restart_helps, status = self.evaluate(now)
            if self.ready:
                try:
                    self.rollout.judge_trial(self.card.version, self.healthy, restart_helps,
                                             status)
                except OSError as exc:  # /data trouble shows in the journal check too
                    log.error("model trial state: %s", exc)
            if not self.ready:
                status = self._maybe_ready(now, restart_helps, status)
            elif not restart_helps:
                self.notifier.watchdog()
            if self.mqtt is not None and now - self._health_published >= HEALTH_TOPIC_SEC:
                self._health_published = now
                self.mqtt.publish_health(self.snapshot())
            if status != last_status:
                self.notifier.status(status)
                if not self.healthy:
                    log.warning("%s", status)
                last_status = status
            self.status = status

    def _maybe_ready(self, now: float, restart_helps: bool, status: str) -> str:
        """READY=1 with the first result (or after the grace period without a camera)."""
        if self.metrics.results > 0 or (now - self.started > READY_GRACE_SEC
                                        and not restart_helps):
            self.ready = True
            self.notifier.ready(status)
            log.info("ready: %s", status)
            return status
        return "starting: waiting for the first frame to be inferred"
