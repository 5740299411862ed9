"""`invoke bench-rollout`: a fleet on one machine. N real unit processes on a local TLS
broker take a good bundle in four stages, then a bad one (its golden test fails on every
unit) that the failure threshold must stop, with no unit left on it."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from ..fleet import Broker, collect
from ..progress import Progress
from ..rollout.run import Rollout, RolloutRequest
from ..signing import write_private_key
from ..steps.model import DEFAULT_MODEL, fetch_locked_model, prepare_model, read_models_lock
from ..validate.broker import LocalBroker
from ..validate.trialbundles import make_rollout_bundles
from .hostunits import HostUnits

STAGES = "1,10%,50%,100%"
WINDOW_SEC = 10.0
DEADLINE_SEC = 600.0
REPORT_WAIT_SEC = 300.0


@dataclass(frozen=True)
class RolloutBench:
    units: int
    stages: int
    confirmed: int
    good_sec: float
    bad_failed: int
    threshold: int
    left_on_bad: int
    memory_mib_per_unit: float

    def line(self) -> str:
        return (f"rollout: {self.units} units, {self.stages} stages, {self.confirmed} "
                f"confirmed in {self.good_sec:.0f} s; bad bundle stopped after "
                f"{self.bad_failed} units (threshold {self.threshold}), {self.left_on_bad} "
                "left on it")


def bench_rollout(count: int, max_failures: int, progress: Progress) -> RolloutBench:
    folder = Path(tempfile.mkdtemp(prefix="edgebake-fleet-"))
    broker = LocalBroker.start_tls()
    assert broker.tls is not None
    fleet: HostUnits | None = None
    try:
        with progress.step("signing key, bundles and the units' model"):
            key = folder / "fleet.key"
            public = write_private_key(key).strip()
            from ..signing import read_private_key

            bundles = make_rollout_bundles(folder / "bundles", read_private_key(key), "pi4",
                                           progress)
            model = prepare_model(str(fetch_locked_model(read_models_lock()[DEFAULT_MODEL],
                                                         progress)), folder, progress).model
        with progress.step(f"starting {count} unit processes"):
            fleet = HostUnits(folder / "units", broker.port, broker.tls, public, model)
            fleet.start(count)
            _wait_for_reports(fleet, _broker(broker), count, progress)
            memory = sum(u.memory_kib() for u in fleet.units) / count / 1024
            progress.say(f"      memory: {memory:.0f} MiB per unit (service and camera "
                         "process, proportional set size)")
        request = RolloutRequest(bundles["2.0"], _broker(broker), key, STAGES, group="bench",
                                 max_failures=0, window_sec=WINDOW_SEC,
                                 deadline_sec=DEADLINE_SEC, state_path=folder / "good.json")
        with progress.step("rolling out the good bundle"):
            began = time.monotonic()
            good = Rollout(request, progress.say).run()
            good_sec = time.monotonic() - began
        with progress.step("rolling out the bad bundle"):
            bad = Rollout(RolloutRequest(
                bundles["2.1"], _broker(broker), key, STAGES, group="bench",
                max_failures=max_failures, window_sec=WINDOW_SEC, deadline_sec=DEADLINE_SEC,
                state_path=folder / "bad.json"), progress.say).run()
        left = sum(u.store_state.get("current") == "2.1" for u in fleet.units)
        if len(fleet.running()) != count:
            raise BuildError(f"{count - len(fleet.running())} unit process(es) died; see "
                             f"{folder}/units/*/service.log")
        return RolloutBench(count, len(good.ends), good.count("confirmed"), good_sec,
                            bad.count("failed"), max_failures, left, memory)
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def _broker(broker: LocalBroker) -> Broker:
    assert broker.tls is not None
    return Broker("127.0.0.1", broker.port, broker.tls.username, broker.tls.password,
                  str(broker.tls.ca_file))


def _wait_for_reports(fleet: HostUnits, broker: Broker, count: int,
                      progress: Progress) -> None:
    """Until every unit's retained health names its group (a rollout by --group finds it)."""
    deadline = time.monotonic() + REPORT_WAIT_SEC
    while True:
        seen = collect(broker, 2.0)
        ready = sum(view.group == fleet.group and view.online == "online"
                    for view in seen.values())
        progress.say(f"      {ready}/{count} units report on the broker")
        if ready >= count:
            return
        if len(fleet.running()) < count:
            raise BuildError("a unit process died at start; see its service.log under "
                             f"{fleet.folder}")
        if time.monotonic() > deadline:
            raise BuildError(f"only {ready} of {count} units reported in "
                             f"{REPORT_WAIT_SEC:.0f} s")
