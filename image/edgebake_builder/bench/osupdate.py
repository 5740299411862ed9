"""`invoke bench-osupdate`: system updates on the emulated unit, good ones and every way one
can fail, each checked for what a technician would see.

One QEMU unit (one overlay: its card) boots the built image. Each cycle installs a new
system over SSH and times the install and the reboot to a healthy service. Then the
failures: a system whose service never gets healthy (rolled back after its window), one
whose kernel cannot boot (U-Boot falls back after three tries), a power cut during the
install (the old slot boots, the install is reported incomplete), and bundles the unit
must refuse (tampered, signed by another CA) without changing anything.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..flashing.pushos import os_status, push_os, wait_for_verdict
from ..oskeys import make_os_keys
from ..progress import Progress
from ..steps.osbundle import OsKeys, bundle_version
from ..validate.osbundles import derive_bundle
from ..validate.powercut import Unit
from ..validate.seed import render_seed

WINDOW_SEC = 60
VERDICT_DEADLINE_SEC = 1800
BOOT_TIMEOUT_SEC = 600
CARD_EXTRA_BYTES = 2**30  # a card larger than the image: /data grows and holds a bundle
SSH_EXTRA = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR"]


@dataclass
class Outcome:
    installed: int = 0
    install_tries: int = 0
    rolled_back: int = 0
    failures: int = 0
    refused: int = 0
    refusals: int = 0
    install_sec: list[float] = field(default_factory=list)
    healthy_sec: list[float] = field(default_factory=list)
    bundle_mb: float = 0.0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        install = sum(self.install_sec) / max(1, len(self.install_sec))
        healthy = sum(self.healthy_sec) / max(1, len(self.healthy_sec))
        return (f"os updates: installed {self.installed}/{self.install_tries}, failed updates "
                f"rolled back {self.rolled_back}/{self.failures}, refused "
                f"{self.refused}/{self.refusals}, install {install:.0f} s, "
                f"reboot-to-healthy {healthy:.0f} s, bundle {self.bundle_mb:.0f} MB")


class OsBench:
    def __init__(self, unit: Unit, keys: OsKeys, base: Path, compatible: str, work: Path,
                 progress: Progress) -> None:
        self.unit, self.keys, self.base = unit, keys, base
        self.compatible, self.work, self.progress = compatible, work, progress
        self.outcome = Outcome(bundle_mb=base.stat().st_size / 1e6)
        self.ssh: dict[str, Any] = {"port": unit.machine.ssh_port, "identity": str(unit.key),
                                    "extra_options": SSH_EXTRA}

    def status(self) -> dict[str, Any]:
        found = os_status("127.0.0.1", **self.ssh)
        if found is None:
            raise BuildError("the unit does not answer `edgebake-os status`")
        return found

    def bundle(self, version: str, kind: str) -> Path:
        return derive_bundle(self.base, self.keys, self.compatible, version,
                             self.work / f"{version}.raucb", kind)

    def wait_healthy_on(self, slot: str, began: float) -> float:
        deadline = began + BOOT_TIMEOUT_SEC + WINDOW_SEC
        while time.monotonic() < deadline:
            snap = self.unit.health()
            if snap and snap.get("healthy") and (snap.get("system") or {}).get("booted") == slot:
                return time.monotonic() - began
            time.sleep(2)
        raise BuildError(f"not healthy on slot {slot} after {BOOT_TIMEOUT_SEC} s")

    def good(self, version: str, bundle: Path | None = None) -> None:
        self.outcome.install_tries += 1
        was = self.status()["booted"]
        bundle = bundle or self.bundle(version, "good")
        began = time.monotonic()
        answer = push_os("127.0.0.1", bundle, window_sec=WINDOW_SEC, **self.ssh)
        self.outcome.install_sec.append(time.monotonic() - began)
        rebooted = time.monotonic()
        new = "B" if was == "A" else "A"
        self.outcome.healthy_sec.append(self.wait_healthy_on(new, rebooted))
        verdict = wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **self.ssh)
        state = verdict["update"]["state"]
        self.say(f"install {version}: {answer.split(': ', 1)[-1]}; {state} on slot "
                 f"{verdict['booted']}")
        if state == "confirmed" and verdict["booted"] == new:
            self.outcome.installed += 1
        else:
            self.outcome.problems.append(f"{version}: {state} ({verdict['update']})")

    def failing(self, version: str, kind: str) -> None:
        """A bundle that installs but must not be kept."""
        self.outcome.failures += 1
        was = self.status()
        push_os("127.0.0.1", self.bundle(version, kind), window_sec=WINDOW_SEC, **self.ssh)
        verdict = wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **self.ssh)
        update = verdict["update"]
        self.say(f"{kind} {version}: {update['state']} ({update.get('reason', '')}); "
                 f"slot {verdict['booted']} runs")
        if update["state"] == "rolled-back" and verdict["booted"] == was["booted"]:
            self.outcome.rolled_back += 1
        else:
            self.outcome.problems.append(f"{kind} {version}: {update}")

    def power_cut(self, version: str) -> None:
        """The plug pulled while RAUC writes the slot."""
        self.outcome.failures += 1
        was = self.status()["booted"]
        bundle = self.bundle(version, "good")
        pushing = threading.Thread(target=self._push_quietly, args=(bundle,), daemon=True)
        pushing.start()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            state = ((os_status("127.0.0.1", **self.ssh) or {}).get("update") or {})
            if state.get("version") == version and state.get("state") == "installing":
                break
            time.sleep(1)
        else:
            raise BuildError("the install never started")
        time.sleep(5)  # RAUC is writing the slot now
        self.unit.pull_plug()
        pushing.join(60)
        self.unit.power_on()
        self.unit.machine.wait_for_ssh(self.unit.key, BOOT_TIMEOUT_SEC)
        verdict = wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **self.ssh)
        update = verdict["update"]
        self.say(f"power cut during install of {version}: {update['state']} "
                 f"({update.get('reason', '')}); slot {verdict['booted']} runs")
        if update["state"] == "failed" and verdict["booted"] == was:
            self.outcome.rolled_back += 1
        else:
            self.outcome.problems.append(f"power cut {version}: {update}")

    def _push_quietly(self, bundle: Path) -> None:
        with contextlib.suppress(BuildError, subprocess.SubprocessError, OSError):
            push_os("127.0.0.1", bundle, window_sec=WINDOW_SEC, **self.ssh)

    def refused(self, what: str, bundle: Path) -> None:
        self.outcome.refusals += 1
        before = self.status()
        try:
            answer = push_os("127.0.0.1", bundle, window_sec=WINDOW_SEC, reboot=False,
                             **self.ssh)
        except BuildError as exc:
            answer = f"refused: {exc}"
        after = self.status()
        same = (before["booted"], before["slots"]) == (after["booted"], after["slots"])
        self.say(f"{what}: {answer.split(': ', 1)[-1][:160]}")
        if ("refused" in answer or "install failed" in answer) and same:
            self.outcome.refused += 1
        else:
            self.outcome.problems.append(f"{what}: {answer}")

    def say(self, text: str) -> None:
        self.progress.say(f"      {text}")


def tampered(bundle: Path, dest: Path) -> Path:
    data = bytearray(bundle.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    dest.write_bytes(bytes(data))
    return dest


def run_bench(image: Path, out_dir: Path, manifest: dict[str, Any], keys: OsKeys,
              cycles: int, progress: Progress, second: Path | None = None) -> Outcome:
    system = manifest["system"]
    base = out_dir / str(system["bundle"])
    logs = out_dir / "osupdate"
    logs.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgebake-osupdate-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgebake-bench",
                        "-f", str(key)], check=True)
        app = {"sources": [{"name": "pattern", "kind": "synthetic", "fps": 5}]}
        seed = render_seed("edgebake-osupdate", [key.with_suffix(".pub").read_text().strip()],
                           app=app, device_id="osupdate-unit")
        unit = Unit(image, tmp, logs, seed.encode(), key)
        unit.machine.disk_bytes = image.stat().st_size + CARD_EXTRA_BYTES
        bench = OsBench(unit, keys, base, str(system["compatible"]), tmp, progress)
        try:
            unit.new_card()
            unit.power_on()
            unit.machine.wait_for_ssh(key, BOOT_TIMEOUT_SEC)
            unit.wait_healthy(BOOT_TIMEOUT_SEC)
            version = str(system["version"])
            for cycle in range(cycles):
                if cycle == 0 and second is not None:
                    bench.good(bundle_version(second), second)
                else:
                    bench.good(f"{version}.{cycle + 1}")
            bench.failing(f"{version}.90-unhealthy", "unhealthy")
            bench.failing(f"{version}.91-unbootable", "unbootable")
            bench.power_cut(f"{version}.92-cut")
            bench.refused("tampered bundle", tampered(base, tmp / "tampered.raucb"))
            other = make_os_keys(tmp / "other-keys")
            stranger = OsKeys(other[0], other[3], other[2])
            bench.refused("bundle signed by another CA", derive_bundle(
                base, stranger, str(system["compatible"]), f"{version}.93-stranger",
                tmp / "stranger.raucb"))
        finally:
            unit.machine.stop()
    return bench.outcome

