"""Every camera in its own process: spawning them, their thread budget, cameras plugged in
while running, and switching all of them to a new model at once."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import threadtune
from .camera.host import CameraProcess
from .card import Card, CardError, card_path_for, load_card
from .config import AppConfig, SourceConfig
from .metrics import Metrics
from .modelload import StartupError
from .sources.discover import find_cameras
from .supervise import Supervised

log = logging.getLogger("edgebake.cameras")

# New cameras are looked for this often (udev's /dev/v4l links; a replug takes effect within it).
CAMERA_SCAN_SEC = 2.0
# Threads per camera with inference.num_threads: 0 until the measurement has chosen.
UNTUNED_THREADS = 2


def cores() -> int:
    """The cores this service may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def threads_per_camera(configured: int, cameras: int) -> int:
    """Interpreter threads for one camera process: `inference.num_threads` at most, and no
    more than its share of the cores. Why: XNNPACK's workers spin while they wait, so more
    threads than cores in all (3 cameras x 2 threads on 4 cores) make every camera wait on
    threads that are not running."""
    return max(1, min(configured, cores() // max(1, cameras)))


def core_free(cameras: int) -> bool:
    """Whether with this many camera processes a core is left for decoding beside the invoke
    (the two cores of a 2-camera unit are both inferring)."""
    return cameras < cores()


class Cameras:
    """The camera processes, and the model (file and card) all of them run."""

    def __init__(self, config: AppConfig, metrics: Metrics,
                 write_lines: Callable[[bytes, int, float], None], stop: threading.Event
                 ) -> None:
        self.config = config
        self.metrics = metrics
        self.write_lines = write_lines
        self.stop_event = stop
        self.configured = [s for s in config.sources if s.enabled and s.kind != "v4l2-auto"]
        self.template = next((s for s in config.sources
                              if s.enabled and s.kind == "v4l2-auto"), None)
        self.processes: list[CameraProcess] = []
        self.by_name: dict[str, CameraProcess] = {}
        self.model = config.model_path
        self.card: Card | None = None
        # what the processes load: the model, or the variant of it the measurement chose
        self.running: tuple[Path, Card] | None = None
        self.switching = threading.Lock()  # held while every camera switches models
        self.tuning: threadtune.Tuning | None = None  # inference.num_threads: 0 (auto)
        self.tuning_error = ""
        self.scanner: Supervised | None = None

    def _threads(self, cameras: int) -> int:
        """Threads per camera process: the configured number, or when it is 0 (auto) the
        measured choice (2 until there is one), each time within the camera's share."""
        wanted = self.config.inference.num_threads
        if wanted == 0:
            wanted = self.tuning.threads if self.tuning is not None else UNTUNED_THREADS
        return threads_per_camera(wanted, cameras)

    def _tune(self, model: Path, cameras: int, serving: bool) -> None:
        """Measure the threads for `model` (inference.num_threads: 0); a failed measurement
        keeps the last choice and says why in /health."""
        if self.config.inference.num_threads != 0:
            return
        try:
            self.tuning = threadtune.tune_in_child(
                model, max(1, cameras), cores(),
                Path(self.config.update.dir) / threadtune.STORE_NAME, serving)
            self.tuning_error = ""
            log.info("interpreter threads per camera: %d (results/s of %d camera(s) by "
                     "threads: %s)", self.tuning.threads, self.tuning.cameras,
                     self.tuning.results_per_sec)
        except Exception as exc:  # the model's own load reports a broken model
            self.tuning_error = f"{type(exc).__name__}: {exc}"[:300]
            log.warning("measuring interpreter threads failed: %s", self.tuning_error)

    def _to_run(self, model: Path, card: Card) -> tuple[Path, Card]:
        """The variant of `model` the measurement chose (same version, task and labels,
        checked there), or `model` itself."""
        tuning = self.tuning
        if tuning is None or not tuning.variant_path:
            return model, card
        variant = Path(tuning.variant_path)
        if variant.parent != threadtune.variants_folder(model):
            return model, card  # chosen for another model (its measurement has failed since)
        try:
            return variant, load_card(card_path_for(variant))
        except CardError as exc:  # gone or changed since it was measured: the model itself
            log.warning("model variant %s: %s; running the model itself", variant, exc)
            return model, card

    def threads_health(self) -> dict[str, Any]:
        """How the cameras' interpreter threads were chosen, for /health."""
        configured = self.config.inference.num_threads
        if configured != 0:
            return {"chosen_by": "inference.num_threads", "configured": configured}
        shown: dict[str, Any] = {"chosen_by": "measurement"}
        if self.tuning is not None:
            shown.update(self.tuning.health())
        if self.tuning_error:
            shown["error"] = self.tuning_error
        return shown

    def _new(self, index: int, source: SourceConfig, cameras: int) -> CameraProcess:
        """A camera process, launched; `cameras`: how many there will be with this one."""
        assert self.running is not None
        model, card = self.running
        camera = CameraProcess(index, source, model, card, self._threads(cameras),
                               self.config.queue.depth, self.config.inference.score_threshold,
                               self.config.inference.top_k, self.write_lines, self.metrics)
        camera.decode_beside = core_free(cameras)
        camera.hung_after = self.config.watchdog.stall_sec
        samples = self.config.samples
        if samples.enabled:
            camera.samples_spec = {"settings": {f.name: getattr(samples, f.name)
                                                for f in dataclasses.fields(samples)},
                                   "device": self.config.device_id}
        camera.launch()
        return camera

    def load(self, model: Path, card: Card) -> None:
        """At start: a process per configured camera, all loading the model at once."""
        self.model, self.card = model, card
        # before any camera runs, for the cameras there will be (those found by themselves too)
        found = len(find_cameras()) if self.template is not None else 0
        self._tune(model, len(self.configured) + found, serving=False)
        self.running = self._to_run(model, card)
        launched: list[CameraProcess] = []
        try:
            for index, source in enumerate(self.configured):
                launched.append(self._new(index, source, len(self.configured)))
            for camera in launched:
                camera.await_ready()
        except Exception as exc:
            for camera in launched:
                camera.stop()
            raise StartupError(f"model {model}: {exc}") from None
        for camera in launched:
            self._keep(camera)

    def _keep(self, camera: CameraProcess) -> None:
        self.processes.append(camera)
        self.by_name[camera.name] = camera

    def start(self) -> None:
        for camera in self.processes:
            camera.start()
        if self.template is not None:
            self.scan()  # the cameras present at boot start at once
            self.scanner = Supervised("camera-scan", self._scan_loop, self.stop_event)
            self.scanner.start()

    def switch(self, model: Path, card: Card) -> float:
        """Every camera loads `model` beside the running one and switches to it; if one
        cannot, those that did go back and StartupError says why. Returns when it began."""
        with self.switching:
            began = time.monotonic()
            old_running, old_tuning = self.running, self.tuning
            assert old_running is not None  # the cameras were loaded before any switch
            # measured with the old model's cameras still running (said so, and measured
            # again quietly at the next start)
            self._tune(model, len(self.processes), serving=True)
            threads = self._threads(len(self.processes))
            running = self._to_run(model, card)
            switched: list[CameraProcess] = []
            try:
                for camera in self.processes:
                    camera.switch(*running, threads)
                    switched.append(camera)
            except Exception as exc:
                self.tuning = old_tuning
                for camera in switched:
                    with contextlib.suppress(Exception):
                        camera.switch(*old_running, self._threads(len(self.processes)))
                raise StartupError(f"model {model}: {exc}") from None
            self.model, self.card, self.running = model, card, running
            for camera in self.processes:  # stalls are judged from the switch on
                camera.last_done = max(camera.last_done, began)
            return began

    # --- cameras found by themselves ---------------------------------------------------
    def scan(self) -> list[str]:
        """A camera process for every capture device not yet in use; returns new names.

        A camera that goes away keeps its process: it shows as down and comes back by itself
        when the same camera (same by-id or by-path link) is plugged in again."""
        template = self.template
        assert template is not None
        in_use = {os.path.realpath(c.config.device) for c in list(self.processes)
                  if c.config.kind == "v4l2"}
        added = []
        for found in find_cameras():
            if found.node in in_use or found.name in self.by_name:
                continue
            self._add(dataclasses.replace(template, name=found.name, kind="v4l2",
                                          device=found.device))
            in_use.add(found.node)
            added.append(found.name)
            log.info("camera found: %s (%s -> %s)", found.name, found.device, found.node)
        return added

    def _add(self, source: SourceConfig) -> None:
        """A camera found while running gets its process, loaded with the serving model."""
        with self.switching:  # not while the cameras switch models
            index = max((c.index for c in self.processes), default=-1) + 1
            camera = self._new(index, source, len(self.processes) + 1)
            camera.await_ready()
            self._keep(camera)
            beside = core_free(len(self.processes))
            for running in self.processes:
                running.set_decode_beside(beside)
            camera.start()

    def _scan_loop(self) -> None:
        while not self.stop_event.wait(CAMERA_SCAN_SEC):
            self.scan()

    def stop(self) -> None:
        for camera in self.processes:
            camera.stop()
