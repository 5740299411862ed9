"""Model updates while running: bundles in (pull, MQTT orders), the switch to a new model, its
trial, and the rollback when it fails.

The store on /data says which model should run (`current`) and whether it is on trial; this
module makes the cameras run it, and judges the trial with the service's health verdict.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .bundle import BundleError
from .cameras import Cameras
from .card import Card
from .commands import SYSTEM_TOPIC
from .config import AppConfig
from .metrics import Metrics
from .modelload import StartupError, load_checked_card
from .modelstore import Slot, boot_id
from .supervise import Supervised

log = logging.getLogger("edgebake.rollout")
# A switch waits this long for the new model's first result (the gap the frames saw).
FIRST_RESULT_SEC = 10.0
# a trial short of update.min_trial_inferences at the end of its window waits for more this
# long (3 windows, at least half a minute) before it is rolled back for want of evidence
EVIDENCE_WAIT_WINDOWS = 3.0
EVIDENCE_WAIT_MIN_SEC = 30.0
OS_FETCH = Path("/data/os/fetch")  # where the service downloads system bundles


class Rollout:
    """Which model serves, how it got there, and whether it is confirmed."""

    def __init__(self, config: AppConfig, cameras: Cameras, metrics: Metrics,
                 stop: threading.Event) -> None:
        self.config = config
        self.cameras = cameras
        self.metrics = metrics
        self.stop = stop
        from .update import UnitUpdates

        self.updates = UnitUpdates.of(config)
        self.store = self.updates.store
        self.running_version: str | None = None  # None: the image's model
        self.swaps = 0
        self.last_swap_gap_sec: float | None = None
        self.switched_at = 0.0  # monotonic time of the last switch
        self._counts_at_switch = (0, 0)  # (results, errors) when the model now served began
        self._apply_lock = threading.Lock()
        self.threads: list[Supervised] = []
        self.puller: Any = None  # BundlePuller when update.pull_url is set
        self.os_puller: Any = None  # ... of system bundles, when update.os_pull_url is set
        self.commands: Any = None  # UpdateCommands when update.mqtt_commands is on
        self._untold: tuple[dict[str, Any], str] | None = None  # a verdict from before MQTT

    # --- at start ----------------------------------------------------------------------
    def load_first(self) -> Card:
        """The model to serve at start: the store's current one, unless it no longer loads
        (then what ran before, never a restart loop); the cameras are loaded with it."""
        self._end_trial_interrupted_by_reboot()
        while True:
            slot = self.store.current()
            try:
                card = self._load(slot)
                break
            except StartupError as exc:
                if slot is None:
                    raise
                trial = self.store.state().get("trial")
                reason = f"model {slot.version} does not load: {exc}"
                if trial and trial.get("version") == slot.version:
                    self._untold = (trial, reason)
                self._roll_back(slot.version, reason)  # at last the image's own model
        self.running_version = slot.version if slot else None
        return card

    def _load(self, slot: Slot | None) -> Card:
        model, card = self._checked(slot)
        self.cameras.load(model, card)
        return card

    def _checked(self, slot: Slot | None) -> tuple[Path, Card]:
        model, card_path = (slot.model, slot.card) if slot else \
            (self.config.model_path, self.config.card_path)
        if slot is not None:
            try:
                self.updates.check_slot(slot)
            except BundleError as exc:
                raise StartupError(str(exc)) from None
        card = load_checked_card(model, card_path)
        if slot is not None:
            card.data["version"] = slot.version  # the bundle's version names the model
        return model, card

    def _end_trial_interrupted_by_reboot(self) -> None:
        """A model still on trial from an earlier boot did not survive its window."""
        trial = self.store.state().get("trial")
        if trial and trial.get("boot_id") != boot_id():
            self._untold = (trial, "the unit rebooted inside the health window")
            self._roll_back(trial.get("version"), self._untold[1])

    def start(self, mqtt: Any) -> None:
        self._supervise("model-watch", self._watch_models)
        update = self.config.update
        agent = f"edgebake/{self.config.device_id or 'unit'}"
        if update.pull_url:
            from .pull import BundlePuller

            self.puller = BundlePuller(update.pull_url, update.pull_sec, self.store.root,
                                       self.apply_bundle, agent)
            self._supervise("update-pull", partial(self.puller.run, self.stop))
        if update.os_pull_url and self.takes_system_updates():
            from .osinbox import MAX_OS_BUNDLE_BYTES
            from .pull import BundlePuller

            self.os_puller = BundlePuller(
                update.os_pull_url, update.os_pull_sec, OS_FETCH, self._hand_over_pulled,
                agent, name="pulled.raucb", max_bytes=MAX_OS_BUNDLE_BYTES,
                keep_free_percent=self.config.journal.min_free_percent)
            self._supervise("os-pull", partial(self.os_puller.run, self.stop))
        if mqtt is not None and update.mqtt_commands:
            self._listen_for_orders(mqtt)

    @staticmethod
    def takes_system_updates() -> bool:
        """An A/B unit (booted from a slot) with the inbox root installs from."""
        from .osinbox import INBOX

        try:
            booted = "rauc.slot=" in Path("/proc/cmdline").read_text()
        except OSError:
            return False
        return booted and INBOX.is_dir() and OS_FETCH.is_dir()

    @staticmethod
    def _hand_over_pulled(bundle: Path) -> str:
        from .osinbox import hand_over

        return hand_over(bundle, "pull")

    @staticmethod
    def _hand_over_ordered(bundle: Path, seq: int, window_sec: float | None) -> str:
        from .osinbox import hand_over

        return hand_over(bundle, "mqtt", window_sec, seq)

    def _supervise(self, name: str, body: Callable[[], None]) -> None:
        thread = Supervised(name, body, self.stop)
        self.threads.append(thread)
        thread.start()

    def _listen_for_orders(self, mqtt: Any) -> None:
        from .commands import UpdateCommands
        from .pull import origin

        update = self.config.update
        origins = (*update.allowed_origins,
                   *(origin(url) for url in (update.pull_url, update.os_pull_url) if url))
        self.commands = UpdateCommands(self.store.root, self.updates.accept_order,
                                       self.apply_bundle,
                                       f"edgebake/{mqtt.device}", origins, self.leave)
        self.commands.publish = mqtt.publish_update_status
        if self._untold is not None:  # sent once the broker connects (QoS 1)
            self._tell("rolled-back", *self._untold)
        kinds = ["update"]
        if self.takes_system_updates():
            self.commands.hand_over_os = self._hand_over_ordered
            self.commands.os_folder = OS_FETCH
            self.commands.keep_free_percent = self.config.journal.min_free_percent
            kinds.append(SYSTEM_TOPIC)
        mqtt.command_topics = [f"edgebake/{mqtt.device}/{kind}" for kind in kinds]
        if self.config.update.mqtt_group:
            mqtt.command_topics += [f"edgebake/group/{self.config.update.mqtt_group}/{kind}"
                                    for kind in kinds]
        mqtt.on_command = self.commands.order
        self._supervise("update-orders", partial(self.commands.run, self.stop))

    def apply_bundle(self, bundle: Path, order_seq: int = 0,
                     window_sec: float | None = None) -> str:
        """A pulled or ordered bundle through every check of `edgebake-update apply`; the
        model watch then switches to it like to any other."""
        with self._apply_lock:  # a pulled and an ordered bundle never install at once
            return self.updates.apply(bundle, order_seq=order_seq, window_sec=window_sec)

    def leave(self, version: str) -> str:
        """An ordered rollback (a rollout's abort): back to the model before `version`, only
        while `version` is the one that should run."""
        with self._apply_lock:
            current = self.store.state().get("current")
            if current != version:
                raise BundleError(f"rollback of {version} refused: this unit runs "
                                  f"{current or 'the image model'}")
            now = self._roll_back(version, "ordered")
        return f"left {version}; running {now or 'the image model'}"

    def _roll_back(self, version: Any, reason: str) -> str | None:
        self.store.audit("rollback", version=version, reason=reason)
        return self.store.rollback()

    def _tell(self, step: str, trial: dict[str, Any] | None, detail: str) -> None:
        """A trial's verdict on the update status topic, for the rollout that ordered it."""
        if self.commands is not None and trial:
            seq = trial.get("order")
            self.commands.verdict(step, detail, seq if isinstance(seq, int) else 0,
                                  str(trial.get("version")))

    # --- the switch ----------------------------------------------------------------------
    def swap_to(self, slot: Slot | None) -> None:
        """Load the new model beside the running one in every camera, then switch to it."""
        model, card = self._checked(slot)
        newest_before = self.metrics.results
        began = self.cameras.switch(model, card)
        self.switched_at = began
        self.running_version = slot.version if slot else None
        self.swaps += 1
        self._counts_at_switch = (self.metrics.results, self.metrics.inference_errors)
        self.last_swap_gap_sec = self._first_result_after(
            began, newest_before, slot.version if slot else None)
        log.info("model %s now serving (first result after %s)", card.version,
                 "none yet" if self.last_swap_gap_sec is None
                 else f"{self.last_swap_gap_sec:.3f}s")

    def _first_result_after(self, began: float, results_before: int, wanted: str | None
                            ) -> float | None:
        """Seconds from the switch to the new model's first result, or None when none came
        in FIRST_RESULT_SEC or a rollback was asked for meanwhile (a hung new model must not
        hold up its own rollback)."""
        checked = began
        while self.metrics.results == results_before:
            now = time.monotonic()
            if now - began > FIRST_RESULT_SEC or self.stop.is_set():
                return None
            if now - checked > 0.1:
                checked = now
                if self.store.state().get("current") != wanted:
                    return None
            time.sleep(0.005)
        return time.monotonic() - began

    def _watch_models(self) -> None:
        while not self.stop.wait(self.config.update.poll_sec):
            wanted = self.store.state().get("current")
            if wanted == self.running_version:
                continue
            slot = self.store.slot(wanted)
            if wanted and slot is None:
                continue  # named but not written yet
            try:
                self.swap_to(slot)
                self.store.audit("serving", version=wanted or "image model",
                                 switch_sec=round(self.last_swap_gap_sec or 0, 3))
            except StartupError as exc:
                trial = self.store.state().get("trial")
                self._roll_back(wanted, str(exc))
                self._tell("rolled-back", trial, str(exc))

    # --- the trial -----------------------------------------------------------------------
    def judge_trial(self, serving: str, healthy: bool, restart_helps: bool,
                    status: str) -> None:
        """During a trial: unhealthy or erring -> roll back; a clean window with enough
        inferences to judge -> confirmed; too few inferences long after the window -> rolled
        back, since a model nobody saw work is not kept."""
        trial = self.store.state().get("trial")
        if not trial or trial.get("version") != serving:
            return
        attempts, errors = self.trial_attempts()
        needed = self.config.update.min_trial_inferences
        limit = self.config.update.max_error_rate
        window = float(trial["window_sec"])
        elapsed = time.time() - float(trial["started"])
        reason = ""
        if restart_helps:
            reason = f"unhealthy in the health window: {status}"
        elif attempts >= needed and errors / attempts > limit:
            reason = (f"inference errors {errors / attempts:.0%} in the health window "
                      f"(limit {limit:.0%})")
        elif attempts < needed and elapsed >= window + max(EVIDENCE_WAIT_WINDOWS * window,
                                                           EVIDENCE_WAIT_MIN_SEC):
            reason = (f"only {attempts} inferences in {elapsed:.0f} s of trial; a model is "
                      f"kept after {needed}")
        if reason:
            log.error("model %s rolled back: %s", trial["version"], reason)
            self._roll_back(trial["version"], reason)
            self._tell("rolled-back", trial, reason)
        elif healthy and elapsed >= window and attempts >= needed:
            self.store.confirm()
            self.store.audit("confirmed", version=trial["version"], inferences=attempts)
            log.info("model %s confirmed after its health window", trial["version"])
            self._tell("confirmed", trial, f"healthy for {window:g} s")

    def trial_health(self) -> dict[str, Any] | None:
        """The trial as /health shows it: its state and how much evidence it has so far."""
        trial = self.store.state().get("trial")
        if not trial:
            return None
        return {**trial, "inferences": self.trial_attempts()[0],
                "inferences_needed": self.config.update.min_trial_inferences}

    def trial_attempts(self) -> tuple[int, int]:
        """(inferences tried, of them failed) since the model on trial began serving."""
        results, errors = self._counts_at_switch
        new_errors = self.metrics.inference_errors - errors
        return self.metrics.results - results + new_errors, new_errors

    def stats(self) -> dict[str, Any]:
        pull = next((t for t in self.threads if t.name == "update-pull"), None)
        return {"pull": self.puller.stats() if self.puller is not None else None,
                "os_pull": self.os_puller.stats() if self.os_puller is not None else None,
                "pull_restarts": pull.restarts if pull else 0,
                "orders": self.commands.stats() if self.commands is not None else None}
