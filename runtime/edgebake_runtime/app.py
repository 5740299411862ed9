"""The service: sources -> latest-frame queues -> workers -> journal/MQTT, under a watchdog."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from .camworker import CameraProcess
from .card import Card, card_path_for, load_card
from .config import AppConfig, SourceConfig
from .digest import sha256_file
from .frames import Frame, FrameSignal, LatestFrameQueue
from .http import HealthServer
from .interp import runtime_name_and_version
from .journal import Journal
from .metrics import Metrics
from .modelstore import ModelStore, Slot, boot_id
from .preprocess import Preprocessor
from .procworker import ProcessWorker
from .sdnotify import Notifier, watchdog_interval_sec
from .sources import Source, make_source
from .sources.discover import find_cameras
from .supervise import Supervised
from .worker import DecodeStage, InferenceWorker, deliver_encoded

log = logging.getLogger("edgebake")
SWITCH_INTERVAL_SEC = 0.0005
# Health snapshot to MQTT (`edgebake/<device>/health`, retained) this often.
HEALTH_TOPIC_SEC = 30.0
OLD_WORKER_STOP_SEC = 1.0
# New cameras are looked for this often (udev's /dev/v4l links; a replug takes effect within it).
CAMERA_SCAN_SEC = 2.0
# READY=1 comes with the first result; without a camera it comes after this grace period so
# systemd does not kill a unit that is only waiting for a camera (its status says so).
READY_GRACE_SEC = 60.0


@dataclass
class ModelSet:
    """One model with everything built for it; swapped as a whole."""

    card: Card
    preprocessor: Preprocessor
    decoder: DecodeStage | None  # None when each camera decodes in its own process
    workers: list[InferenceWorker | ProcessWorker | CameraProcess]
    generation: int  # frames carry it; workers skip frames prepared for another model
    model: Path


class StartupError(Exception):
    """The service cannot start (bad model or card); the message goes to STATUS= and the log."""


def load_checked_card(model: Path, card_path: Path | None) -> Card:
    """The model's card, once the model is a loadable TFLite file whose sha256 the card names."""
    from .card import CardError
    from .interp import ModelError, check_tflite_file, probe_model

    try:
        check_tflite_file(model)
        card = load_card(card_path or card_path_for(model))
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


def _cores() -> int:
    """The cores this service may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


class App:
    def __init__(self, config: AppConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self.signal = FrameSignal()
        self._offer_turn = 0
        self.started = time.monotonic()
        self.status = "starting"
        self.healthy = False
        self.ready = False
        self._stop = threading.Event()
        update = config.section("update")
        self.store = ModelStore(Path(update["dir"]))
        self.runtime = runtime_name_and_version()
        depth = int(config.section("queue")["depth"])
        inference = config.section("inference")
        # each camera in its own process: the service holds only their mirrors
        self.per_camera = bool(inference["processes"] and inference["per_camera"])
        self._camera_configs = [s for s in config.sources
                                if s.enabled and s.kind != "v4l2-auto"]
        self.sources: dict[str, Source | CameraProcess] = {} if self.per_camera else {
            s.name: make_source(s) for s in self._camera_configs}
        self.queues: dict[str, LatestFrameQueue | Any] = {
            name: LatestFrameQueue(depth) for name in self.sources}
        self._depth = depth
        self.camera_template = next((s for s in config.sources
                                     if s.enabled and s.kind == "v4l2-auto"), None)
        self.scanner: Supervised | None = None
        self.model_watch: Supervised | None = None
        self.puller: Any = None  # BundlePuller when update.pull_url is set
        self.pull_thread: Supervised | None = None
        self.commands: Any = None  # UpdateCommands when update.mqtt_commands is on
        self._apply_lock = threading.Lock()
        self.command_thread: Supervised | None = None
        jr = config.section("journal")
        self.journal = Journal(Path(jr["dir"]), float(jr["fsync_interval_sec"]),
                               int(jr["rotate_bytes"]), float(jr["min_free_percent"]))
        self._swap_lock = threading.Lock()
        self.generation = 0
        self._check_trial_after_reboot()
        slot = self.store.current()
        self.model_path, card_path = (slot.model, slot.card) if slot else \
            (config.model_path, config.card_path)
        try:
            self.models = self._load_models(self.model_path, card_path, slot)
        except StartupError:
            if slot is None:
                raise
            # a slot that no longer loads: back to what ran before, never a restart loop
            self.store.audit("rollback", reason=f"model {slot.version} does not load")
            self.store.rollback()
            slot = self.store.current()
            self.model_path, card_path = (slot.model, slot.card) if slot else \
                (config.model_path, config.card_path)
            self.models = self._load_models(self.model_path, card_path, slot)
        self.running_version = slot.version if slot else None  # None: the image's model
        for source in self.sources.values():  # FFmpeg or PIL scale to the model's geometry
            if not isinstance(source, CameraProcess):
                source.size_for = self.preprocessor.native_size
        self.swaps = 0
        self.last_swap_gap_sec: float | None = None
        self.mqtt: Any = None
        self._results_seen = 0
        self._last_result_at = time.monotonic()
        self._health_published = 0.0
        self._trial_errors = (0, 0)  # (results, errors) when the trial began
        self.http: HealthServer | None = None

    # the running model set: card, preprocessing, decoding and workers of one model
    @property
    def card(self) -> Card:
        return self.models.card

    @property
    def preprocessor(self) -> Preprocessor:
        return self.models.preprocessor

    @property
    def decoder(self) -> DecodeStage | None:
        return self.models.decoder

    @property
    def workers(self) -> list[InferenceWorker | ProcessWorker | CameraProcess]:
        return self.models.workers

    def _load_models(self, model: Path, card_path: Path | None, slot: Slot | None
                     ) -> ModelSet:
        """Card checked against the model, workers spawned and loaded; not yet started."""
        card = self._load_card(model, card_path)
        if slot is not None:
            card.data["version"] = slot.version  # the bundle's version names the model
        inference = self.config.section("inference")
        generation = self.generation + 1
        if self.per_camera:
            return self._load_cameras(model, card, generation)
        decoder = DecodeStage(card, self._emit, self.metrics, inference["score_threshold"],
                              int(inference["top_k"]))
        workers: list[InferenceWorker | ProcessWorker | CameraProcess] = []
        try:
            for i in range(int(inference["workers"])):
                if inference["processes"]:
                    process = ProcessWorker(
                        i, model, card, int(inference["num_threads"]),
                        self.queues, self.signal, self.metrics,
                        partial(self._deliver, card), inference["score_threshold"],
                        int(inference["top_k"]), generation)
                    workers.append(process)
                    process.spawn()
                else:
                    worker = InferenceWorker(
                        i, model, card, int(inference["num_threads"]),
                        self.queues, self.signal, self._emit, self.metrics,
                        inference["score_threshold"], int(inference["top_k"]), generation)
                    worker.handoff = decoder
                    workers.append(worker)
        except Exception as exc:
            for started in workers:
                started.stop()
            raise StartupError(f"model {model}: {exc}") from None
        self.generation = generation
        return ModelSet(card, Preprocessor(card), decoder, workers, generation, model)

    def _load_card(self, model: Path, card_path: Path | None) -> Card:
        return load_checked_card(model, card_path)

    # --- each camera in its own process ----------------------------------------------
    def _new_camera(self, index: int, config: SourceConfig, model: Path, card: Card,
                    cameras: int, wait: bool = True) -> CameraProcess:
        """A camera process, started (and with `wait`, loaded); `cameras`: how many there
        will be with this one."""
        inference = self.config.section("inference")
        threads = self._threads_per_camera(int(inference["num_threads"]), cameras)
        camera = CameraProcess(index, config, model, card, threads,
                               self._depth, inference["score_threshold"],
                               int(inference["top_k"]), self._write_lines, self.metrics)
        camera.decode_beside = self._core_free(cameras)
        camera.launch()
        if wait:
            camera.await_ready()
        return camera

    @staticmethod
    def _threads_per_camera(configured: int, cameras: int) -> int:
        """Interpreter threads for one camera process: `inference.num_threads` at most, and
        no more than its share of the cores. Why: XNNPACK's workers spin while they wait, so
        more threads than cores in all (3 cameras x 2 threads on 4 cores) make every camera
        wait on threads that are not running."""
        return max(1, min(configured, _cores() // max(1, cameras)))

    @staticmethod
    def _core_free(cameras: int) -> bool:
        """Whether with this many camera processes a core is left for decoding beside the
        invoke (the two cores of a 2-camera unit are both inferring)."""
        return cameras < _cores()

    def _load_cameras(self, model: Path, card: Card, generation: int) -> ModelSet:
        """At start: a process per camera, each loaded with the model. At a switch: the
        running processes load the new model beside the old one and switch to it; if one
        cannot, those that did go back and the switch is refused."""
        if not hasattr(self, "models"):
            cameras: list[CameraProcess] = []
            try:  # every camera loads its model at the same time, one per core
                for index, config in enumerate(self._camera_configs):
                    cameras.append(self._new_camera(index, config, model, card,
                                                    len(self._camera_configs), wait=False))
                for camera in cameras:
                    camera.await_ready()
            except Exception as exc:
                for started in cameras:
                    started.stop()
                raise StartupError(f"model {model}: {exc}") from None
            for camera in cameras:
                self.sources[camera.name] = camera
                self.queues[camera.name] = camera.queue
        else:
            cameras = [w for w in self.models.workers if isinstance(w, CameraProcess)]
            old_model, old_card = self.models.model, self.models.card
            switched: list[CameraProcess] = []
            try:
                for camera in cameras:
                    camera.switch(model, card)
                    switched.append(camera)
            except Exception as exc:
                for camera in switched:
                    with contextlib.suppress(Exception):
                        camera.switch(old_model, old_card)
                raise StartupError(f"model {model}: {exc}") from None
        self.generation = generation
        return ModelSet(card, Preprocessor(card), None, list(cameras), generation, model)

    # --- model updates -------------------------------------------------------------------
    def _listen_for_orders(self, mqtt: Any, update: dict[str, Any]) -> None:
        from .commands import UpdateCommands

        self.commands = UpdateCommands(self.store.root, self._apply_bundle,
                                       f"edgebake/{mqtt.device}")
        self.commands.publish = mqtt.publish_update_status
        mqtt.command_topics = [f"edgebake/{mqtt.device}/update"]
        if update["mqtt_group"]:
            mqtt.command_topics.append(f"edgebake/group/{update['mqtt_group']}/update")
        mqtt.on_command = self.commands.order
        self.command_thread = Supervised("update-orders", partial(self.commands.run, self._stop),
                                         self._stop)
        self.command_thread.start()

    def _apply_bundle(self, bundle: Path) -> str:
        """A pulled bundle through every check of `edgebake-update apply`; the model watch
        then switches to it like to any other."""
        from .update import apply, current_version, unit_target

        settings = self.config.section("update")
        baked_card = self.config.card_path or card_path_for(self.config.model_path)
        with self._apply_lock:  # a pulled and an ordered bundle never install at once
            return apply(bundle, self.store, Path(settings["keys_dir"]),
                         unit_target(settings), current_version(self.store, baked_card),
                         settings, False)

    def _check_trial_after_reboot(self) -> None:
        """A model still on trial from an earlier boot did not survive its window: roll back."""
        trial = self.store.state().get("trial")
        if trial and trial.get("boot_id") != boot_id():
            self.store.audit("rollback", version=trial.get("version"),
                             reason="the unit rebooted inside the health window")
            self.store.rollback()

    def swap_to(self, slot: Slot | None) -> None:
        """Load the new model beside the running one, then switch frames over to it."""
        model, card_path = (slot.model, slot.card) if slot else \
            (self.config.model_path, self.config.card_path)
        with self._swap_lock:
            old = self.models
            # the old model keeps running; camera processes have switched when this returns
            new = self._load_models(model, card_path, slot)
            newest_before = self.metrics.results
            began = time.monotonic()
            self.models = new  # frames preprocessed from now on are for the new model
            if not self.per_camera:
                self._switch_pool(old, new)
            else:  # stalls are judged again from the switch on, not from before the load
                self._last_result_at = max(self._last_result_at, began)
                for worker in new.workers:
                    worker.last_done = max(worker.last_done, began)
            self.model_path = model
            self.running_version = slot.version if slot else None
            self.swaps += 1
            self._trial_errors = (self.metrics.results, self.metrics.inference_errors)
        self.last_swap_gap_sec = self._first_result_after(
            began, newest_before, slot.version if slot else None)
        log.info("model %s now serving (first result after %s)", new.card.version,
                 "none yet" if self.last_swap_gap_sec is None
                 else f"{self.last_swap_gap_sec:.3f}s")

    def _switch_pool(self, old: ModelSet, new: ModelSet) -> None:
        """Sources scale for the new model, its workers start and the old ones go."""
        assert new.decoder is not None and old.decoder is not None
        new.decoder.start()
        for source in list(self.sources.values()):
            source.size_for = new.preprocessor.native_size
        for worker in new.workers:
            worker.start()
        for worker in old.workers:
            # a worker holds no state: after a second it is killed, not waited for (a
            # hung model being rolled back would otherwise hold the switch for long)
            worker.stop(timeout=OLD_WORKER_STOP_SEC)
        old.decoder.stop()

    def _first_result_after(self, began: float, results_before: int, wanted: str | None
                            ) -> float | None:
        """Seconds from the switch to the new model's first result (the gap frames saw), or
        None when none came in 10 s or a rollback was asked for meanwhile (a hung new model
        must not hold up its own rollback)."""
        checked = began
        while self.metrics.results == results_before:
            now = time.monotonic()
            if now - began > 10 or self._stop.is_set():
                return None
            if now - checked > 0.1:
                checked = now
                if self.store.state().get("current") != wanted:
                    return None
            time.sleep(0.005)
        return time.monotonic() - began

    def _watch_models(self) -> None:
        poll = float(self.config.section("update")["poll_sec"])
        while not self._stop.wait(poll):
            wanted = self.store.state().get("current")
            if wanted != self.running_version:
                slot = self.store.slot(wanted)
                if wanted and slot is None:
                    continue  # named but not written yet
                try:
                    self.swap_to(slot)
                    self.store.audit("serving", version=wanted or "image model",
                                     switch_sec=round(self.last_swap_gap_sec or 0, 3))
                except StartupError as exc:
                    self.store.audit("rollback", version=wanted, reason=str(exc))
                    self.store.rollback()

    def _judge_trial(self, healthy: bool, restart_helps: bool, status: str) -> None:
        """During a trial: unhealthy or erring -> roll back; a clean window -> confirmed."""
        trial = self.store.state().get("trial")
        if not trial or trial.get("version") != self.card.version:
            return
        results, errors = self._trial_errors
        new_results = self.metrics.results - results
        new_errors = self.metrics.inference_errors - errors
        rate = new_errors / max(new_results + new_errors, 1)
        limit = float(self.config.section("update")["max_error_rate"])
        reason = ""
        if restart_helps:
            reason = f"unhealthy in the health window: {status}"
        elif new_results + new_errors >= 20 and rate > limit:
            reason = f"inference errors {rate:.0%} in the health window (limit {limit:.0%})"
        if reason:
            self.store.audit("rollback", version=trial["version"], reason=reason)
            log.error("model %s rolled back: %s", trial["version"], reason)
            self.store.rollback()
        elif healthy and time.time() - float(trial["started"]) >= float(trial["window_sec"]):
            self.store.confirm()
            self.store.audit("confirmed", version=trial["version"])
            log.info("model %s confirmed after its health window", trial["version"])

    # --- data path ---------------------------------------------------------------------
    def _on_frame(self, frame: Frame) -> None:
        """Runs in the source's thread: the frame becomes a ready input tensor here, so the
        workers only copy it in and run the model."""
        queue = self.queues[frame.source]
        if self.sources[frame.source].can_wait:
            queue.wait_for_room(timeout=1.0)
        models = self.models
        frame.image, frame.placement = models.preprocessor(frame.image)
        frame.generation = models.generation
        queue.put(frame)
        workers = models.workers
        if workers and isinstance(workers[0], ProcessWorker):
            # a worker process with a free slot takes the frame in this thread; if none has
            # one, the frame waits for the reply that frees the next slot
            self._offer_turn = (self._offer_turn + 1) % len(workers)
            for step in range(len(workers)):
                if not len(queue):
                    break
                worker = workers[(self._offer_turn + step) % len(workers)]
                assert isinstance(worker, ProcessWorker)
                worker.offer()
            return
        self.signal.notify()

    def _deliver(self, card: Card, worker: int, frame: Frame, result_json: str,
                 invoke_seconds: float) -> None:
        """A result a worker process decoded and encoded becomes a journal line (in that
        worker's feeder thread)."""
        deliver_encoded(card, frame, result_json, invoke_seconds, worker, self._write_line,
                        self.metrics)

    def _emit(self, record: dict[str, Any]) -> None:
        if not self.journal.append(record):
            self.metrics.journal_errors += 1

    def _write_line(self, line: bytes, stamp: float) -> None:
        if not self.journal.append_line(line, stamp):
            self.metrics.journal_errors += 1

    def _write_lines(self, block: bytes, count: int, stamp: float) -> None:
        if not self.journal.append_lines(block, count, stamp):
            self.metrics.journal_errors += count

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
        if self.decoder is not None:
            self.decoder.start()
        for worker in self.workers:
            worker.start()
        for source in self.sources.values():
            if not isinstance(source, CameraProcess):
                source.start(self._on_frame)
        self.model_watch = Supervised("model-watch", self._watch_models, self._stop)
        self.model_watch.start()
        update = self.config.section("update")
        if update["pull_url"]:
            from .pull import BundlePuller

            self.puller = BundlePuller(update["pull_url"], float(update["pull_sec"]),
                                       self.store.root, self._apply_bundle,
                                       f"edgebake/{self.config.raw['device_id'] or 'unit'}")
            self.pull_thread = Supervised("update-pull", partial(self.puller.run, self._stop),
                                          self._stop)
            self.pull_thread.start()
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
            if update["mqtt_commands"]:
                self._listen_for_orders(self.mqtt, update)
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
            if self.per_camera:
                self._add_camera_process(config)
                in_use.add(camera.node)
                added.append(camera.name)
                log.info("camera found: %s (%s -> %s), in its own process", camera.name,
                         camera.device, camera.node)
                continue
            source = make_source(config)
            source.size_for = self.preprocessor.native_size
            self.queues[camera.name] = LatestFrameQueue(self._depth)
            self.sources[camera.name] = source
            in_use.add(camera.node)
            source.start(self._on_frame)
            added.append(camera.name)
            log.info("camera found: %s (%s -> %s)", camera.name, camera.device, camera.node)
        return added

    def _add_camera_process(self, config: SourceConfig) -> None:
        """A camera found while running gets its process, loaded with the serving model."""
        with self._swap_lock:  # not while the cameras switch models
            index = max((w.index for w in self.models.workers), default=-1) + 1
            camera = self._new_camera(index, config, self.models.model, self.models.card,
                                      len(self.models.workers) + 1)
            self.models.workers.append(camera)
            beside = self._core_free(len(self.models.workers))
            for running in self.models.workers:
                if isinstance(running, CameraProcess):
                    running.set_decode_beside(beside)
            self.queues[camera.name] = camera.queue
            self.sources[camera.name] = camera
            camera.start()

    def _scan_loop(self) -> None:
        while not self._stop.wait(CAMERA_SCAN_SEC):
            self.scan_cameras()

    def stop(self) -> None:
        """Stop sources first, let workers finish what is queued, then flush the journal."""
        self.notifier.stopping("stopping: draining queues and flushing results")
        self._stop.set()  # no camera is added from here on
        for source in list(self.sources.values()):
            if not isinstance(source, CameraProcess):
                source.stop()
        deadline = time.monotonic() + 5.0
        waiting = [q for q in self.queues.values() if isinstance(q, LatestFrameQueue)]
        while any(len(q) for q in waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        for worker in self.workers:
            worker.stop()
        if self.decoder is not None:
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
        # Camera processes load a new model inside themselves, which can hold their GIL (and
        # so their results and statuses) for the load; each switch is bounded (a process
        # that does not answer in MODEL_TIMEOUT_SEC is replaced), so stalls are not judged
        # meanwhile.
        switching = self.per_camera and self._swap_lock.locked()
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
        if self.model_watch is not None and not self.model_watch.alive():
            stuck.append("model update watcher has died")
        if self.scanner is not None and not self.scanner.alive():
            stuck.append("camera discovery has died")
        if self.pull_thread is not None and not self.pull_thread.alive():
            stuck.append("update pull has died")
        if self.command_thread is not None and not self.command_thread.alive():
            stuck.append("the MQTT update order handler has died")
        for worker in self.workers:
            if not worker.alive():
                why = getattr(worker, "last_error", "")
                stuck.append(f"worker {worker.index} has died" + (f" ({why})" if why else ""))
            elif worker.busy_since and now - worker.busy_since > stall and not switching:
                stuck.append(f"worker {worker.index} stuck in inference for "
                             f"{now - worker.busy_since:.0f}s")
        if self.decoder is not None and not self.decoder.alive():
            stuck.append("result decoding has died")
        elif self.decoder is not None and self.decoder.busy_since and \
                now - self.decoder.busy_since > stall:
            stuck.append(f"result decoding stuck for {now - self.decoder.busy_since:.0f}s")
        pending = any(len(q) for q in self.queues.values())
        newest_done = max((w.last_done for w in self.workers), default=now)
        if pending and now - newest_done > stall and not switching:
            stuck.append(f"no inference for {now - newest_done:.0f}s with frames waiting")
        if fresh_sources and now - self._last_result_at > stall and not switching:
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
                             "frame_size": list(st.frame_size) if st.frame_size else None,
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
                      "task": self.card.task, "path": str(self.model_path),
                      "swaps": self.swaps, "trial": self.store.state().get("trial"),
                      "last_switch_sec": self.last_swap_gap_sec,
                      "runtime": self.runtime[0], "runtime_version": self.runtime[1]},
            "sources": sources,
            "inference": {"workers": len(self.workers), "results": self.metrics.results,
                          "errors": self.metrics.inference_errors,
                          "p50_ms": ms(p50), "p99_ms": ms(p99),
                          "end_to_end_p50_ms": ms(e50), "end_to_end_p99_ms": ms(e99),
                          "worker_restarts": sum(getattr(w, "restarts", 0)
                                                 for w in self.workers),
                          "processes": [w.stats() if isinstance(w, ProcessWorker)
                                        else w.process_stats() for w in self.workers
                                        if isinstance(w, (ProcessWorker, CameraProcess))]},
            "journal": self.journal.stats(),
            "update": {"pull": self.puller.stats() if self.puller is not None else None,
                       "pull_restarts": self.pull_thread.restarts if self.pull_thread else 0,
                       "orders": self.commands.stats() if self.commands is not None else None},
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
            if self.ready:
                try:
                    self._judge_trial(self.healthy, restart_helps, status)
                except OSError as exc:  # /data trouble shows in the journal check too
                    log.error("model trial state: %s", exc)
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
