"""Units as processes on this host: each one the real service (`edgebake-runtime`, with its
camera process and its update agent) with a synthetic source, its own /data folder, its own
device id and trusted key, all on one broker. What `bench-rollout` rolls out to, and what the
tests use for a fleet on one machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..hostcmd import die_with_parent
from ..validate.broker import BrokerTls

UNIT_FPS = 1.0
# at UNIT_FPS a few seconds' window holds a few inferences: that is the evidence these units
# need before a trial is judged (a unit's default, 20, would stretch every window to 20 s)
UNIT_TRIAL_INFERENCES = 2


@dataclass
class HostUnit:
    device: str
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def store_state(self) -> dict[str, Any]:
        """The unit's own record of which model runs (its /data/models/state.json)."""
        path = self.folder / "data" / "models" / "state.json"
        try:
            found = json.loads(path.read_text())
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}

    def memory_kib(self) -> int:
        """Proportional set size of the service and its camera process (shared pages split
        between the processes that map them, so N units sum to what N cost)."""
        if self.proc is None:
            return 0
        return sum(_pss_kib(pid) for pid in [self.proc.pid, *_children(self.proc.pid)])


@dataclass
class HostUnits:
    folder: Path
    broker_port: int  # a TLS broker on 127.0.0.1 with a login: orders come only over one
    tls: BrokerTls
    public_key: str
    model: Path
    group: str = "bench"
    target: str = "pi4"  # what /etc/edgebake/target says: a bundle must be made for it
    units: list[HostUnit] = field(default_factory=list)

    def start(self, count: int, prefix: str = "unit") -> None:
        for number in range(count):
            unit = HostUnit(f"{prefix}-{number:03d}", self.folder / f"{prefix}-{number:03d}")
            self._write(unit)
            log = (unit.folder / "service.log").open("ab")
            unit.proc = subprocess.Popen(
                [sys.executable, "-m", "edgebake_runtime.main", "--config",
                 str(unit.folder / "app.yaml"), "--overrides", str(unit.folder / "none.yaml"),
                 "--log-level", "WARNING"],
                stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True,
                preexec_fn=die_with_parent)
            log.close()
            self.units.append(unit)

    def _write(self, unit: HostUnit) -> None:
        tls = self.tls
        data = unit.folder / "data"
        keys = unit.folder / "update-keys"
        keys.mkdir(parents=True, exist_ok=True)
        (keys / "fleet.pub").write_text(self.public_key + "\n")
        (unit.folder / "target").write_text(f"{self.target}\n")
        config = {
            "device_id": unit.device,
            "model": {"path": str(self.model), "card": ""},
            "sources": [{"name": "pattern", "kind": "synthetic", "fps": UNIT_FPS,
                         "width": 160, "height": 120}],
            "journal": {"dir": str(data / "results")},
            "http": {"enabled": False},
            "inference": {"num_threads": 1},
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": self.broker_port,
                     "username": tls.username, "password": tls.password,
                     "tls": {"enabled": True, "ca_file": str(tls.ca_file)}},
            "update": {"dir": str(data / "models"), "keys_dir": str(keys),
                       "target_file": str(unit.folder / "target"),
                       "fleet_file": str(unit.folder / "fleet"),
                       "mqtt_commands": True, "mqtt_group": self.group, "poll_sec": 1.0,
                       "min_trial_inferences": UNIT_TRIAL_INFERENCES},
        }
        (unit.folder / "app.yaml").write_text(yaml.safe_dump(config))

    def running(self) -> list[HostUnit]:
        return [u for u in self.units if u.proc is not None and u.proc.poll() is None]

    def stop(self) -> None:
        for unit in self.units:
            if unit.proc is not None and unit.proc.poll() is None:
                os.killpg(unit.proc.pid, signal.SIGTERM)
        for unit in self.units:
            if unit.proc is None:
                continue
            try:
                unit.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(unit.proc.pid, signal.SIGKILL)
                unit.proc.wait()


def _env() -> dict[str, str]:
    import edgebake_runtime

    root = str(Path(edgebake_runtime.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += [int(child), *_children(int(child))]
    except OSError:
        pass
    return found


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0
