"""The service: sources -> latest-frame queues -> workers -> journal/MQTT, under a watchdog."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .card import Card, card_path_for, load_card
from .config import AppConfig
from .digest import sha256_file
from .frames import Frame, FrameSignal, LatestFrameQueue
from .http import HealthServer
from .interp import runtime_name_and_version
from .journal import Journal
from .metrics import Metrics
from .preprocess import Preprocessor
from .procworker import ProcessWorker
from .sdnotify import Notifier, watchdog_interval_sec
from .sources import Source, make_source
from .sources.discover import find_cameras
from .supervise import Supervised
from .worker import DecodeStage, InferenceWorker

log = logging.getLogger("edgebake")
SWITCH_INTERVAL_SEC = 0.0005
# Health snapshot to MQTT (`edgebake/<device>/health`, retained) this often.
HEALTH_TOPIC_SEC = 30.0
# New cameras are looked for this often (udev's /dev/v4l links; a replug takes effect within it).
CAMERA_SCAN_SEC = 2.0
# READY=1 comes with the first result; without a camera it comes after this grace period so
# systemd does not kill a unit that is only waiting for a camera (its status says so).
READY_GRACE_SEC = 60.0


class StartupError(Exception):
    """The service cannot start (bad model or card); the message goes to STATUS= and the log."""


class App:
    def __init__(self, config: AppConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.signal = FrameSignal()
        self.started = time.monotonic()
        self.status = "starting"
        self.healthy = False
        self.ready = False
        self._stop = threading.Event()
        self.card = self._load_card()
        self.runtime = runtime_name_and_version()
        inference = config.section("inference")
        depth = int(config.section("queue")["depth"])
        self.sources: dict[str, Source] = {s.name: make_source(s) for s in config.sources
                                           if s.enabled and s.kind != "v4l2-auto"}
        self.queues = {name: LatestFrameQueue(depth) for name in self.sources}
        self._depth = depth
        self.camera_template = next((s for s in config.sources
                                     if s.enabled and s.kind == "v4l2-auto"), None)
        self.scanner: Supervised | None = None
        jr = config.section("journal")
        self.journal = Journal(Path(jr["dir"]), float(jr["fsync_interval_sec"]),
                               int(jr["rotate_bytes"]), float(jr["min_free_percent"]))
        self.decoder = DecodeStage(self.card, self._emit, self.metrics,
                                   inference["score_threshold"], int(inference["top_k"]))
        self.workers: list[InferenceWorker | ProcessWorker] = []
        try:
            for i in range(int(inference["workers"])):
                if inference["processes"]:
                    process = ProcessWorker(
                        i, config.model_path, self.card, int(inference["num_threads"]),
                        self.queues, self.signal, self.metrics, self.decoder)
                    self.workers.append(process)
                    process.spawn()
                else:
                    worker = InferenceWorker(
                        i, config.model_path, self.card, int(inference["num_threads"]),
                        self.queues, self.signal, self._emit, self.metrics,
                        inference["score_threshold"], int(inference["top_k"]))
                    worker.handoff = self.decoder
                    self.workers.append(worker)
        except Exception as exc:
            for started in self.workers:
                started.stop()
            raise StartupError(f"model {config.model_path}: {exc}") from None
        self.preprocessor = Preprocessor(self.card)
        for source in self.sources.values():  # FFmpeg or PIL scale to the model's geometry
            source.size_for = self.preprocessor.native_size
        self.mqtt: Any = None
        self._results_seen = 0
        self._last_result_at = time.monotonic()
        self._health_published = 0.0
        self.http: HealthServer | None = None

    def _load_card(self) -> Card:
        from .card import CardError
        from .interp import ModelError, check_tflite_file, probe_model

        model = self.config.model_path
        try:
            check_tflite_file(model)
            card = load_card(self.config.card_path or card_path_for(model))
        except (ModelError, CardError) as exc:
            raise StartupError(str(exc)) from None
        actual = sha256_file(model)
        if actual != card.sha256:
            raise StartupError(f"{model}: sha256 {actual[:16]}… does not match its card "
                               f"({card.sha256[:16]}…); refusing a model that was changed")
        try:
            probe_model(model)
        except ModelError as exc:
            raise StartupError(str(exc)) from None
        return card

    # --- data path ---------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        """Runs in the source's thread: the frame becomes a ready input tensor here, so the
        workers only copy it in and run the model."""
        queue = self.queues[frame.source]
        if self.sources[frame.source].can_wait:
            queue.wait_for_room(timeout=1.0)
        frame.image, frame.placement = self.preprocessor(frame.image)
        queue.put(frame)
        self.signal.notify()

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.journal.append(record):
            self.metrics.journal_errors += 1

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        # Workers (threads in invoke(), or feeders waiting on their process) must get the
        # GIL back as soon as they wake, not after a 5 ms slice of a source or decoder thread.
        sys.setswitchinterval(SWITCH_INTERVAL_SEC)
        try:
            self.journal.open()
        except OSError as exc:
            self.journal.failed = f"{exc.strerror or exc} ({self.journal.folder})"
            log.error("journal unavailable: %s; inference and health keep running",
                      self.journal.failed)
        self.decoder.start()
        for worker in self.workers:
            worker.start()
        for source in self.sources.values():
            source.start(self._on_frame)
        if self.camera_template is not None:
            self.scan_cameras()  # the cameras present at boot start at once
            self.scanner = Supervised("camera-scan", self._scan_loop, self._stop)
            self.scanner.start()
        http = self.config.section("http")
        if http["enabled"]:
            self.http = HealthServer(http["bind"], int(http["port"]), self.snapshot,
                                     int(http["max_connections"]), float(http["timeout_sec"]),
                                     list(http["allow"]))
            self.http.start()
        mqtt = self.config.section("mqtt")
        if mqtt["enabled"]:
            from .mqtt import MqttPublisher

            self.mqtt = MqttPublisher(mqtt, self.journal.folder, self.config.raw["device_id"])
            self.journal.delivered = self.mqtt.cursor.position
            self.mqtt.start()

    # --- cameras found by themselves --------------------------------------------------
    def scan_cameras(self) -> list[str]:
        """Add a v4l2 source for every capture device not yet in use; returns new names.

        A camera that goes away keeps its source: it shows as down and comes back by itself
        when the same camera (same by-id or by-path link) is plugged in again."""
        template = self.camera_template
        assert template is not None
        in_use = {os.path.realpath(s.config.device) for s in list(self.sources.values())
                  if s.config.kind == "v4l2"}
        added = []
        for camera in find_cameras():
            if camera.node in in_use or camera.name in self.sources:
                continue
            config = dataclasses.replace(template, name=camera.name, kind="v4l2",
                                         device=camera.device)
            source = make_source(config)
            source.size_for = self.preprocessor.native_size
            self.queues[camera.name] = LatestFrameQueue(self._depth)
            self.sources[camera.name] = source
            in_use.add(camera.node)
            source.start(self._on_frame)
            added.append(camera.name)
            log.info("camera found: %s (%s -> %s)", camera.name, camera.device, camera.node)
        return added

    def _scan_loop(self) -> None:
        while not self._stop.wait(CAMERA_SCAN_SEC):
            self.scan_cameras()

    def stop(self) -> None:
        """Stop sources first, let workers finish what is queued, then flush the journal."""
        self.notifier.stopping("stopping: draining queues and flushing results")
        self._stop.set()  # no camera is added from here on
        for source in list(self.sources.values()):
            source.stop()
        deadline = time.monotonic() + 5.0
        while any(len(q) for q in self.queues.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for worker in self.workers:
            worker.stop()
        self.decoder.stop()
        if self.mqtt is not None:
            self.mqtt.stop()
        self.journal.close()
        if self.http is not None:
            self.http.stop()

    def request_stop(self) -> None:
        self._stop.set()

    # --- health ------------------------------------------------------------------------
    def evaluate(self, now: float) -> tuple[bool, bool, str]:
        """(healthy, restart_helps, status).

        Healthy means every enabled source is fresh, results are produced and every sink
        works. A restart helps only when something inside the service is stuck or dead: a
        worker, the decoder, the journal, or frames that arrive but give no results. A camera
        that is gone or a broker that is down is degraded, never a reason to restart: the
        source reconnects with backoff on its own, and the other cameras keep running.
        """
        stuck: list[str] = []
        degraded: list[str] = []
        stall = float(self.config.section("watchdog")["stall_sec"])
        fresh_sources = 0
        for name, source in list(self.sources.items()):
            age = source.stats.frame_age(now)
            limit = source.config.max_age_sec
            if source.stats.state == "finished":
                continue
            if age is None:
                if now - self.started > limit:
                    error = source.stats.last_error
                    degraded.append(f"{name} has delivered no frame ({source.stats.state}"
                                    f"{': ' + error if error else ''})")
            elif age > limit:
                degraded.append(f"{name} stale for {age:.0f}s ({source.stats.state})")
            elif source.stats.state == "down":
                degraded.append(f"{name} is down, reconnecting ({source.stats.last_error})")
            else:
                fresh_sources += 1
        if not self.sources:
            degraded.append("no camera found; waiting for one")
        if self.scanner is not None and not self.scanner.alive():
            stuck.append("camera discovery has died")
        for worker in self.workers:
            if not worker.alive():
                why = getattr(worker, "last_error", "")
                stuck.append(f"worker {worker.index} has died" + (f" ({why})" if why else ""))
            elif worker.busy_since and now - worker.busy_since > stall:
                stuck.append(f"worker {worker.index} stuck in inference for "
                             f"{now - worker.busy_since:.0f}s")
        if not self.decoder.alive():
            stuck.append("result decoding has died")
        elif self.decoder.busy_since and now - self.decoder.busy_since > stall:
            stuck.append(f"result decoding stuck for {now - self.decoder.busy_since:.0f}s")
        pending = any(len(q) for q in self.queues.values())
        newest_done = max((w.last_done for w in self.workers), default=now)
        if pending and now - newest_done > stall:
            stuck.append(f"no inference for {now - newest_done:.0f}s with frames waiting")
        if fresh_sources and now - self._last_result_at > stall:
            stuck.append(f"frames arrive but no result for {now - self._last_result_at:.0f}s")
        if self.journal.failed:
            stuck.append(f"journal cannot write: {self.journal.failed}")
        if self.mqtt is not None:
            if not self.mqtt.sender.alive():
                stuck.append("MQTT sender has died")
            elif not self.mqtt.connected.is_set():
                degraded.append(f"MQTT not connected ({self.mqtt.last_error or 'connecting'})")
        if self.journal.dropped_undelivered:
            degraded.append(f"{self.journal.dropped_undelivered} results deleted before "
                            "delivery (disk full)")
        if self.http is not None and not self.http.alive():
            stuck.append("HTTP health server has died")
        if stuck or degraded:
            kind = "stuck" if stuck else "degraded"
            return False, bool(stuck), f"{kind}: " + "; ".join(stuck + degraded)
        fps = sum(s.stats.fps for s in list(self.sources.values()))
        p50 = self.metrics.inference.percentile(50)
        latency = f", inference p50 {p50 * 1000:.1f} ms" if p50 is not None else ""
        return True, False, (f"running: {len(self.sources)} source(s) at {fps:.1f} fps total"
                             f"{latency}, {self.journal.written} results journaled")

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        sources = {}
        for name, source in list(self.sources.items()):
            st = source.stats
            age = st.frame_age(now)
            sources[name] = {"kind": source.config.kind, "state": st.state,
                             "device": source.config.device,
                             "fps": round(st.fps, 2), "frames": st.frames,
                             "last_frame_age_sec": round(age, 3) if age is not None else None,
                             "queue_depth": len(self.queues[name]),
                             "drops": self.queues[name].dropped,
                             "corrupt_frames": st.corrupt_frames, "reconnects": st.reconnects,
                             "last_error": st.last_error}
        p50, p99 = self.metrics.inference.percentile(50), self.metrics.inference.percentile(99)
        e50 = self.metrics.end_to_end.percentile(50)
        e99 = self.metrics.end_to_end.percentile(99)

        def ms(value: float | None) -> float | None:
            return round(value * 1000, 3) if value is not None else None

        # judged now, from the same source states the snapshot shows, not at the last tick
        healthy, _, status = self.evaluate(now)
        snap: dict[str, Any] = {
            "healthy": healthy, "ready": self.ready,
            "status": status if self.ready or healthy else f"starting: {status}",
            "uptime_sec": round(now - self.started, 1),
            "device_id": self.config.raw["device_id"],
            "model": {"version": self.card.version, "sha256": self.card.sha256,
                      "task": self.card.task, "path": str(self.config.model_path),
                      "runtime": self.runtime[0], "runtime_version": self.runtime[1]},
            "sources": sources,
            "inference": {"workers": len(self.workers), "results": self.metrics.results,
                          "errors": self.metrics.inference_errors,
                          "p50_ms": ms(p50), "p99_ms": ms(p99),
                          "end_to_end_p50_ms": ms(e50), "end_to_end_p99_ms": ms(e99),
                          "worker_restarts": sum(getattr(w, "restarts", 0)
                                                 for w in self.workers),
                          "processes": [w.stats() for w in self.workers
                                        if isinstance(w, ProcessWorker)]},
            "journal": self.journal.stats(),
        }
        if self.mqtt is not None:
            snap["mqtt"] = self.mqtt.stats()
        return snap

    def run(self) -> None:
        """Supervise until asked to stop: READY after the first result, then WATCHDOG pings."""
        ping_every = watchdog_interval_sec() or 1.0
        tick = min(ping_every, 1.0)
        last_status = ""
        self.notifier.status("loading done; waiting for the first frame to be inferred")
        while not self._stop.wait(tick):
            now = time.monotonic()
            self.journal.sync_if_due()
            if self.metrics.results != self._results_seen:
                self._results_seen, self._last_result_at = self.metrics.results, now
            self.healthy, restart_helps, status = self.evaluate(now)
            if not self.ready:
                if self.metrics.results > 0 or (now - self.started > READY_GRACE_SEC
                                                and not restart_helps):
                    self.ready = True
                    self.notifier.ready(status)
                    log.info("ready: %s", status)
                    last_status = status
                else:
                    status = "starting: waiting for the first frame to be inferred"
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
