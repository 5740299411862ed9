"""`invoke bench-powercut`: pull the plug on the emulated unit again and again.

The image boots under QEMU through one qcow2 overlay that lives for the whole bench, like a
card in a unit. Each cycle kills QEMU with SIGKILL at a random moment (during a first boot,
during normal running, or while a model update is being applied), boots it again and checks
what a technician would: the unit is healthy again, no filesystem damage was left, no result
line is torn, the results lost are within the journal's fsync interval, the model, config and
seed state are intact, and SSH works. A last step freezes PID 1 and times the hardware
watchdog's reset back to inference.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..flashing.push import push_bundle
from ..progress import Progress
from .qemu import QemuMachine, console_tail
from .seed import render_seed, seed_overlay
from .trialbundles import make_trial_bundles

HOSTNAME = "edgebake-powercut"
BOOT_TIMEOUT_SEC = 480.0
HEALTHY_TIMEOUT_SEC = 300.0
POLL_SEC = 0.25
FIRST_BOOT_EVERY = 5  # cycle 0, 5, 10, …: a new card, cut during its first boot
UPDATE_EVERY = 5  # cycle 2, 7, 12, …: cut while a signed model update is applied
RESULTS = "/data/results"

# Run on the unit after each cut: every journal line parses, and the newest record from
# before the cut (given as the host's wall clock) is reported.
CHECK_JOURNAL = r"""
import json, pathlib, sys
cut = float(sys.argv[1])
torn = lines = 0
newest = None
for path in sorted(pathlib.Path(sys.argv[2]).glob("*.jsonl")):
    data = path.read_bytes()
    parts = data.split(b"\n")
    if parts and parts[-1]:
        torn += 1  # a last line without its newline
    for raw in parts[:-1]:
        lines += 1
        try:
            ts = float(json.loads(raw)["ts"])
        except Exception:
            torn += 1
            continue
        if ts <= cut and (newest is None or ts > newest):
            newest = ts
print(json.dumps({"torn": torn, "lines": lines, "newest_before_cut": newest}))
"""

# Filesystem damage the boot did not repair, as the kernel and systemd-fsck report it.
DAMAGE = ("UNEXPECTED INCONSISTENCY", "EXT4-fs error", "fsck failed", "Remounting filesystem "
          "read-only", "FAT-fs (vda1): error")


@dataclass
class Cut:
    cycle: int
    phase: str  # first-boot, running, update
    at_sec: float  # after QEMU started
    survived: bool = False
    lost_sec: float = 0.0
    slowest_fsync_sec: float = 0.0  # the journal's, before the cut
    torn: int = 0
    back_sec: float = 0.0
    problems: list[str] = field(default_factory=list)


class Unit:
    """The emulated unit: one overlay for its whole life, booted and killed again and again."""

    def __init__(self, image: Path, workdir: Path, logs: Path, seed: bytes, key: Path) -> None:
        self.image = image
        self.workdir = workdir
        self.logs = logs
        self.seed = seed
        self.key = key
        self.boots = 0
        self.fsync_sec = 1.0  # the journal's, read from /health once the unit runs
        self.machine = QemuMachine(image=image, workdir=workdir / "vm",
                                   console=logs / "console-0.log")

    def new_card(self) -> None:
        """A fresh overlay with the seed: the next boot is a first boot."""
        self.machine.stop()
        self.machine.prepare()
        seed_overlay(self.image, self.machine.overlay, self.machine.boot, self.seed,
                     self.machine.boot_files)

    def power_on(self) -> float:
        self.boots += 1
        self.machine.console = self.logs / f"console-{self.boots}.log"
        self.machine.start()
        return time.monotonic()

    def pull_plug(self) -> None:
        """SIGKILL to QEMU: the guest gets no warning, and unwritten caches are gone."""
        proc = self.machine.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        self.machine.proc = None

    def health(self) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.machine.http_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=3) as reply:
                return dict(json.loads(reply.read()))
        except urllib.error.HTTPError as exc:  # 503 still carries the snapshot
            try:
                return dict(json.loads(exc.read()))
            except (ValueError, OSError):
                return None
        except (OSError, ValueError):
            return None

    def wait_healthy(self, timeout: float, after_results: int = 0) -> dict[str, Any]:
        """The snapshot once the unit is healthy and has produced results beyond a count."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if not self.machine.alive():
                raise BuildError("QEMU exited; console tail:\n" +
                                 console_tail(self.machine.console))
            snap = self.health()
            if snap is not None:
                last = snap
                if snap.get("healthy") and snap["inference"]["results"] > after_results:
                    return snap
            time.sleep(1.0)
        raise BuildError(f"not healthy after {timeout:.0f}s; last status: "
                         f"{(last or {}).get('status', 'no answer on /health')}")

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return self.machine.ssh(self.key, command, timeout=timeout)


def plan(cycles: int) -> list[str]:
    phases = []
    for i in range(cycles):
        if i % FIRST_BOOT_EVERY == 0:
            phases.append("first-boot")
        elif i % UPDATE_EVERY == 2:
            phases.append("update")
        else:
            phases.append("running")
    return phases


def _watch_until(unit: Unit, seconds: float) -> tuple[float | None, float | None, float]:
    """Poll /health until the moment comes; the journal's newest written and synced ts, and
    its slowest fsync so far."""
    written = synced = None
    slowest = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        snap = unit.health()
        if snap is not None:
            journal = snap.get("journal", {})
            written = journal.get("last_written_ts") or written
            slowest = float(journal.get("slowest_fsync_sec", slowest))
            synced = journal.get("last_synced_ts") or synced
        time.sleep(POLL_SEC)
    return written, synced, slowest


def _check_after(unit: Unit, cut: Cut, cut_wall: float, written: float | None,
                 synced: float | None) -> None:
    """Everything a technician needs after the power came back; problems go into the cut."""
    began = time.monotonic()
    unit.machine.wait_for_ssh(unit.key, BOOT_TIMEOUT_SEC)
    snap = unit.wait_healthy(HEALTHY_TIMEOUT_SEC)
    cut.back_sec = time.monotonic() - began
    result = unit.ssh(f"python3 -c '{CHECK_JOURNAL}' {cut_wall:.3f} {RESULTS}")
    if result.returncode != 0:
        cut.problems.append(f"journal check failed: {result.stderr.strip()[-200:]}")
        return
    _check_journal(unit, cut, json.loads(result.stdout.strip().splitlines()[-1]), written,
                   synced)
    boot_log = unit.ssh("journalctl -b -k -o cat; journalctl -b -o cat -u 'systemd-fsck*'",
                        timeout=120).stdout
    damage = [line for line in boot_log.splitlines() if any(d in line for d in DAMAGE)]
    if damage:
        cut.problems.append("filesystem damage: " + damage[0][:160])
    model = snap["model"]
    digest = unit.ssh(f"sha256sum {model['path']}").stdout.split()
    if not digest or digest[0] != model["sha256"]:
        cut.problems.append(f"model file {model['path']} does not match its card")
    _check_state(unit, cut)
    cut.survived = not cut.problems


def _check_journal(unit: Unit, cut: Cut, found: dict[str, Any], written: float | None,
                   synced: float | None) -> None:
    """No torn line, and no more lost than the fsync interval allows."""
    cut.torn = int(found["torn"])
    if cut.torn:
        cut.problems.append(f"{cut.torn} torn or corrupt journal line(s)")
    newest = found["newest_before_cut"]
    if written is not None:
        if newest is None:
            cut.problems.append("no result from before the cut survived")
            cut.lost_sec = written - (synced or written)
        else:
            cut.lost_sec = max(0.0, written - float(newest))
            if synced is not None and float(newest) + 0.001 < synced:
                cut.problems.append(f"results fsynced at ts {synced:.3f} were lost (newest "
                                    f"kept {float(newest):.3f})")
        # a record is safe within the interval plus the slowest fsync the journal has seen;
        # the poll sees the journal a little late: allow two poll intervals beyond that
        allowed = unit.fsync_sec + cut.slowest_fsync_sec + 2 * POLL_SEC
        if cut.lost_sec > allowed:
            cut.problems.append(f"lost {cut.lost_sec:.2f}s of results (fsync every "
                                f"{unit.fsync_sec:.1f}s, slowest fsync "
                                f"{cut.slowest_fsync_sec:.2f}s)")


def _check_state(unit: Unit, cut: Cut) -> None:
    """The unit's identity, configuration and mounts as the seed and the image made them."""
    state = unit.ssh(
        "hostname; test -s /etc/ssh/ssh_host_ed25519_key.pub && echo keys; "
        "test -s /var/lib/edgebake/firstboot.done && echo seeded; "
        "python3 -c 'import yaml,sys; [yaml.safe_load(open(f)) for f in sys.argv[1:]]' "
        "/etc/edgebake/app.yaml /etc/edgebake/seed-overrides.yaml && echo config; "
        "edgebake-update status >/dev/null 2>&1 && echo updates; "
        "findmnt -no OPTIONS / | grep -q '^ro' && echo rootro; "
        "systemctl --failed --no-legend --plain | head -5").stdout.split("\n")
    if state[0].strip() != HOSTNAME:
        cut.problems.append(f"hostname is {state[0].strip()!r}, the seed says {HOSTNAME}")
    for word, problem in (("keys", "SSH host keys missing"),
                          ("seeded", "the seed's done-marker is missing"),
                          ("config", "app.yaml or the seed's overrides do not parse"),
                          ("updates", "edgebake-update status fails (model state unreadable)"),
                          ("rootro", "the root is not mounted read-only")):
        if word not in state:
            cut.problems.append(problem)
    failed = [line for line in state[1:] if line.strip() and
              line.strip() not in ("keys", "seeded", "config", "updates", "rootro")]
    if failed:
        cut.problems.append("failed units: " + "; ".join(failed))


def run_bench(image: Path, out_dir: Path, manifest: dict[str, Any], cycles: int,
              progress: Progress, seed: int | None = None, watchdog: bool = True
              ) -> tuple[list[Cut], float | None]:
    rng = random.Random(seed)
    logs = out_dir / "powercut"
    logs.mkdir(parents=True, exist_ok=True)
    cuts: list[Cut] = []
    watchdog_sec: float | None = None
    with tempfile.TemporaryDirectory(prefix="edgebake-powercut-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        key = tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgebake-bench",
                        "-f", str(key)], check=True)
        trials = make_trial_bundles(tmp / "bundles", str(manifest.get("target", "pi4")),
                                    progress)
        update_key, bundle = trials.public_key, str(trials.paths["good"])
        app = {"sources": [{"name": "pattern", "kind": "synthetic", "fps": 5}],
               "update": {"max_latency_ms": 20000, "window_sec": 3600}}
        seed_text = render_seed(HOSTNAME, [(tmp / "id_ed25519.pub").read_text().strip()],
                                app=app, device_id="powercut-unit", update_keys=[update_key])
        unit = Unit(image, tmp, logs, seed_text.encode(), key)
        try:
            for index, phase in enumerate(plan(cycles)):
                cut = _one_cycle(unit, index, phase, rng, bundle, progress)
                cuts.append(cut)
                verdict = "survived" if cut.survived else "FAILED: " + "; ".join(cut.problems)
                progress.say(f"      cycle {index + 1}/{cycles} ({phase}, cut at "
                             f"{cut.at_sec:.1f}s): {verdict}; lost {cut.lost_sec:.2f}s (slowest "
                             f"fsync {cut.slowest_fsync_sec:.2f}s), torn "
                             f"{cut.torn}, healthy again after {cut.back_sec:.0f}s")
            if watchdog:
                watchdog_sec = _watchdog(unit, progress)
        finally:
            unit.machine.stop()
    return cuts, watchdog_sec


def _one_cycle(unit: Unit, index: int, phase: str, rng: random.Random, bundle: str,
               progress: Progress) -> Cut:
    written = synced = None
    slowest = 0.0
    if phase == "first-boot" or not unit.machine.alive():
        if phase == "first-boot":
            unit.new_card()
        started = unit.power_on()
    if phase == "first-boot":
        # anywhere from the kernel's start to just past the first inference
        at = rng.uniform(2.0, 70.0)
        time.sleep(max(0.0, at - (time.monotonic() - started)))
    else:
        unit.machine.wait_for_ssh(unit.key, BOOT_TIMEOUT_SEC)
        snap = unit.wait_healthy(HEALTHY_TIMEOUT_SEC)
        unit.fsync_sec = float(snap["journal"].get("fsync_interval_sec", unit.fsync_sec))
        if phase == "update":  # `invoke push-model`'s own code, cut wherever it is
            threading.Thread(target=_push, args=(unit, Path(bundle)), daemon=True).start()
        started = time.monotonic()
        watch_sec = rng.uniform(1.0, 25.0 if phase == "update" else 8.0)
        written, synced, slowest = _watch_until(unit, watch_sec)
        at = time.monotonic() - started
    cut_wall = time.time()
    unit.pull_plug()
    cut = Cut(index, phase, at, slowest_fsync_sec=slowest)
    unit.power_on()
    try:
        _check_after(unit, cut, cut_wall, written, synced)
    except BuildError as exc:
        cut.problems.append(str(exc).splitlines()[0])
        progress.log(str(exc))
        # the next cycle starts from a machine that is at least running
    return cut


def _push(unit: Unit, bundle: Path) -> None:
    with contextlib.suppress(BuildError, subprocess.TimeoutExpired):
        push_bundle("127.0.0.1", bundle, unit.machine.ssh_port, "root", str(unit.key), True,
                    ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                     "-o", "LogLevel=ERROR"])


def _watchdog(unit: Unit, progress: Progress) -> float:
    """Freeze PID 1 and time the i6300esb's reset back to the next inference."""
    snap = unit.wait_healthy(HEALTHY_TIMEOUT_SEC)
    boot_before = unit.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    limit = unit.ssh("systemctl show -p RuntimeWatchdogUSec --value").stdout.strip()
    progress.say(f"      freezing PID 1 (SIGSEGV; systemd freezes on a crash), "
                 f"RuntimeWatchdogSec {limit or '?'}")
    began = time.monotonic()
    unit.ssh("kill -SEGV 1", timeout=20)
    while True:  # SSH answers from the frozen boot until the watchdog resets the machine
        if time.monotonic() - began > BOOT_TIMEOUT_SEC:
            raise BuildError("PID 1 was frozen but the hardware watchdog did not reset the "
                             "unit; console tail:\n" + console_tail(unit.machine.console))
        if not unit.machine.alive():
            raise BuildError("QEMU exited instead of resetting")
        answer = unit.ssh("cat /proc/sys/kernel/random/boot_id", timeout=15)
        if answer.returncode == 0 and answer.stdout.strip() not in ("", boot_before):
            break
        time.sleep(2)
    unit.wait_healthy(HEALTHY_TIMEOUT_SEC, after_results=0)
    del snap
    return time.monotonic() - began


def summary(cuts: list[Cut]) -> str:
    survived = sum(1 for c in cuts if c.survived)
    lost = max((c.lost_sec for c in cuts), default=0.0)
    torn = sum(c.torn for c in cuts)
    return (f"power cuts survived: {survived}/{len(cuts)}, max results lost: {lost:.2f} s, "
            f"torn lines: {torn}")
