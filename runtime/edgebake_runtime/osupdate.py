"""`edgebake-os`: system updates through RAUC, and the health-gated commit after the reboot.

`install` hands a bundle to `rauc install` (RAUC checks its signature against the image's
keyring before it reads anything in it, and writes the slot not running). The next boot
runs the new slot on trial: `trial` (edgebake-os-trial.service, at every boot) watches the
service's own health verdict on `/health` for the window, then runs `rauc status mark-good`,
or `mark-bad` and a reboot into the old slot. A slot that never reaches this point is
U-Boot's to drop after three tries; `trial` then finds the old slot booted and says so.
Everything it decides goes to /data/os (state, audit lines, the status `/health` shows).
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from .bundle import BundleError, version_key
from .osinbox import INBOX, read_note, waiting
from .osstate import OsState, OsUpdateError

SYSTEM_CONF = Path("/etc/rauc/system.conf")
VERSION_FILE = Path("/etc/edgebake/version")
HEALTH_URL = "http://127.0.0.1:8080/health"
DEFAULT_WINDOW_SEC = 300
POLL_SEC = 5.0
TRIES = 3  # U-Boot's tries per slot (boot.scr), given back by mark-good
SLOT = re.compile(r"\brauc\.slot=([AB])\b")
# the unit's identity, copied into the slot an update wrote: who it is, how it is reached,
# and what its seed set (docs/system-updates.md)
IDENTITY = ("etc/machine-id", "etc/hostname", "etc/hosts", "etc/ssh/ssh_host_*",
            "etc/ssh/authorized_keys.d/root", "etc/edgebake/seed-overrides.yaml",
            "etc/edgebake/update-keys/seed.pub", "etc/edgebake/mqtt-ca.pem",
            "etc/wpa_supplicant/wpa_supplicant-wlan0.conf",
            "etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service")


def booted_slot(cmdline: Path = Path("/proc/cmdline")) -> str:
    found = SLOT.search(cmdline.read_text())
    if not found:
        raise OsUpdateError("this system was not booted from an A/B slot (no rauc.slot= on "
                            "the kernel command line); it takes no system updates")
    return found.group(1)


def other(slot: str) -> str:
    return "B" if slot == "A" else "A"


def rauc(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rauc", *args], capture_output=True, text=True, check=False,
                          timeout=timeout)


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [x.strip() for x in (result.stderr + "\n" + result.stdout).splitlines()
             if x.strip()]
    return lines[-1] if lines else f"rauc exited {result.returncode}"


def slot_versions() -> dict[str, str]:
    """The version RAUC recorded for each slot it installed (a factory slot has none)."""
    result = rauc("status", "--detailed", "--output-format=json", timeout=60)
    versions: dict[str, str] = {}
    if result.returncode != 0:
        return versions
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        for entry in json.loads(result.stdout).get("slots", []):
            for slot in entry.values():
                bundle = (slot.get("slot_status") or {}).get("bundle") or {}
                if slot.get("bootname") and bundle.get("version"):
                    versions[slot["bootname"]] = str(bundle["version"])
    return versions


def own_version() -> str:
    try:
        return VERSION_FILE.read_text().strip()
    except OSError:
        return "unknown"


def status(state: OsState) -> dict[str, Any]:
    """Both slots, which one runs, and the update in flight; kept for `/health`."""
    booted = booted_slot()
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((state.root / "status.json").read_text())
    versions = {**previous.get("slots", {}), **slot_versions(), booted: own_version()}
    refusals = state.refusals()
    return {"layout": "ab", "booted": booted, "version": own_version(), "slots": versions,
            "update": state.update(), "refused": refusals[-1] if refusals else None,
            "refusals": refusals}


def install(bundle: Path, state: OsState, window_sec: int, via: str = "ssh", seq: int = 0,
            name: str = "") -> str:
    """Check, then install into the other slot; the caller reboots into it. Every refusal
    is audited and shown in `/health` (`name`: the bundle's name where it came from)."""
    booted = booted_slot()
    came = {"via": via, "seq": seq, "bundle": name or bundle.name}
    current = state.update()
    if current.get("state") in ("installed", "trial"):
        raise state.refuse(f"system {current.get('version')} is still on trial "
                           f"({current.get('state')}); wait for its verdict "
                           "(edgebake-os status)", **came)
    if not bundle.is_file():
        raise OsUpdateError(f"{bundle}: no such bundle")
    info = rauc("info", "--output-format=json", str(bundle), timeout=600)
    if info.returncode != 0:  # signature, keyring, format: RAUC says which
        raise state.refuse(last_line(info), **came)
    try:
        manifest = json.loads(info.stdout)
        version = str(manifest["version"])
    except (ValueError, KeyError, TypeError):
        raise state.refuse("rauc info gave no manifest", **came) from None
    problem = unfit(manifest, other(booted)) or same_or_older(version, own_version(), via)
    if problem:
        raise state.refuse(problem, version=version, **came)
    flight = {"version": version, "from_slot": booted, "to_slot": other(booted),
              "window_sec": window_sec, "via": via, "seq": seq}
    state.set_update(state="installing", **flight)
    state.audit("os-installing", version=version, slot=other(booted), via=via)
    result = rauc("install", str(bundle))
    if result.returncode != 0:
        state.set_update(state="failed", reason=last_line(result), **flight)
        state.audit("os-refused", version=version, reason=last_line(result), via=via)
        raise OsUpdateError(f"install failed: {last_line(result)}")
    state.set_update(state="installed", **flight)
    state.audit("os-installed", version=version, slot=other(booted), via=via)
    state.publish_status(status(state))
    return (f"installed system {version} into slot {other(booted)}; it runs after a reboot, "
            f"on trial for {window_sec} s")


def take(state: OsState, inbox: Path = INBOX) -> str:
    """`edgebake-os take` (root, started by the inbox's path unit): the newest bundle out of
    the service's reach and through `install`; older ones waiting are superseded."""
    bundles = waiting(inbox)
    if not bundles:
        return "nothing in the system update inbox"
    *older, newest = bundles
    for old in older:
        state.audit("os-superseded", bundle=old.name)
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    note = read_note(newest)
    newest.with_suffix(".json").unlink(missing_ok=True)
    held = state.root / "incoming"
    held.mkdir(mode=0o700, exist_ok=True)
    taken = held / "taken.raucb"
    try:
        os.replace(newest, taken)
    except OSError as exc:  # never left in the inbox: the path unit would start again
        newest.unlink(missing_ok=True)
        raise state.refuse(f"{newest.name}: cannot take it: {exc.strerror}",
                           via=note["via"], bundle=note["name"]) from None
    try:
        info = os.lstat(taken)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise state.refuse(f"{newest.name}: not a plain file with one name",
                               via=note["via"], seq=note["seq"], bundle=note["name"])
        os.chown(taken, 0, 0)  # from here on the service can neither rename nor replace it
        os.chmod(taken, 0o600)
        return install(taken, state, note["window_sec"] or DEFAULT_WINDOW_SEC,
                       via=note["via"], seq=note["seq"], name=note["name"])
    finally:
        taken.unlink(missing_ok=True)
        with contextlib.suppress(OSError, OsUpdateError):
            state.publish_status(status(state))


def same_or_older(version: str, running: str, via: str) -> str:
    """Why a bundle is not newer than the running system, or "": the same version never
    installs again (a stick left in would otherwise install at every boot), and an older one
    only over SSH, where someone chose it."""
    if version == running:
        return f"system {version} already runs here"
    try:
        older = version_key(version) < version_key(running)
    except BundleError:  # not plain dotted numbers: no order to judge
        older = False
    if older and via != "ssh":
        return (f"system {version} is older than the running {running}; a downgrade goes "
                "over SSH (invoke push-os)")
    return ""


def read_conf(conf: Path = SYSTEM_CONF) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(conf)
    return parser


def slot_devices(parser: configparser.ConfigParser) -> dict[str, str]:
    """bootname -> block device, from RAUC's system.conf."""
    return {parser[s]["bootname"]: parser[s]["device"] for s in parser.sections()
            if s.startswith("slot.") and "bootname" in parser[s] and "device" in parser[s]}


def unfit(manifest: dict[str, Any], target: str, conf: Path = SYSTEM_CONF) -> str:
    """Why a bundle cannot go into the `target` slot, in one line; "" when it can (RAUC
    checks both again; saying it first leaves no failed install behind)."""
    parser = read_conf(conf)
    ours = parser.get("system", "compatible", fallback="")
    if manifest.get("compatible") != ours:
        return (f"the bundle is for {manifest.get('compatible')!r}, this unit is {ours!r} "
                "(compatible in /etc/rauc/system.conf)")
    device = slot_devices(parser).get(target)
    sizes = [int(next(iter(i.values())).get("size") or 0) for i in manifest.get("images", [])
             if isinstance(i, dict) and i]
    if device and sizes:
        try:
            with open(device, "rb") as slot:
                room = slot.seek(0, os.SEEK_END)
        except OSError:
            return ""
        if max(sizes) > room:
            return (f"its root filesystem is {max(sizes) / 2**20:.0f} MiB, slot {target} "
                    f"holds {room / 2**20:.0f} MiB")
    return ""


def read_health(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            data = json.loads(answer.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def judge_window(window_sec: float, url: str, started: float, patience: float = 0.0
                 ) -> tuple[bool, str]:
    """Healthy at the window's end, and never stuck once it was ready (a camera gone or a
    broker down is the world's fault, not the system's). With `patience`, the end waits
    that much longer for a system that is still starting."""
    last = "the service never answered /health"
    ready = False
    while True:
        health = read_health(url)
        if health is not None:
            last = str(health.get("status", ""))
            ready = ready or bool(health.get("ready"))
            if ready and last.startswith("stuck"):
                return False, f"the service got stuck on trial: {last}"
        elif ready:
            last = "the service stopped answering /health"
        elapsed = time.monotonic() - started
        if elapsed >= window_sec:
            if health is not None and health.get("ready") and health.get("healthy"):
                return True, last
            if elapsed >= window_sec + patience:
                return False, (f"not healthy at the end of the {window_sec + patience:.0f} s "
                               f"window: {last}")
        time.sleep(POLL_SEC)


def trial(state: OsState, url: str = HEALTH_URL) -> str:
    """At every boot: commit or roll back an update in flight, and publish the status."""
    booted = booted_slot()
    update = state.update()
    phase = update.get("state")
    version = update.get("version")
    verdict = "no system update in flight"
    if phase == "installing":
        rauc("status", "mark-bad", "other")
        state.set_update(**{**update, "state": "failed",
                            "reason": "the install was cut off (power lost?); the old "
                                      "system runs"})
        state.audit("os-install-incomplete", version=version, slot=booted)
        verdict = f"system {version}: install incomplete; slot {booted} runs"
    elif phase in ("installed", "trial") and booted != update.get("to_slot"):
        rauc("status", "mark-bad", "other")
        reason = (f"the new system never came up; U-Boot went back to slot {booted} after "
                  "its tries")
        state.set_update(**{**update, "state": "rolled-back", "reason": reason})
        state.audit("os-rolled-back", version=version, reason=reason)
        verdict = f"system {version}: rolled back ({reason})"
    elif phase in ("installed", "trial"):
        state.set_update(**{**update, "state": "trial"})
        state.publish_status(status(state))
        window = float(update.get("window_sec") or DEFAULT_WINDOW_SEC)
        good, why = judge_window(window, url, time.monotonic())
        if good:
            marked = rauc("status", "mark-good", timeout=120)
            state.set_update(**{**update, "state": "confirmed", "reason": why})
            state.audit("os-confirmed", version=version, slot=booted,
                        marked=marked.returncode == 0)
            verdict = f"system {version}: confirmed after {window:.0f} s healthy"
        else:
            rauc("status", "mark-bad", timeout=120)
            state.set_update(**{**update, "state": "rolled-back", "reason": why})
            state.audit("os-rolled-back", version=version, reason=why)
            state.publish_status(status(state))
            print(f"system {version}: {why}; back to slot {other(booted)}", flush=True)
            subprocess.run(["systemctl", "reboot"], check=False)
            return f"system {version}: rolled back ({why})"
    state.publish_status(status(state))
    if phase not in ("installed", "trial"):
        verdict += "; " + renew_tries(booted, url)
    return verdict


def renew_tries(booted: str, url: str) -> str:
    """Each boot uses one of the slot's tries; once the running system is healthy it gets
    them back (RAUC's mark-good), so only a system that keeps failing runs out of them."""
    good, why = judge_window(0, url, time.monotonic(), patience=DEFAULT_WINDOW_SEC)
    if not good:
        return f"slot {booted} keeps its count of tries ({why})"
    left = subprocess.run(["fw_printenv", "-n", f"BOOT_{booted}_LEFT"], capture_output=True,
                          text=True, check=False).stdout.strip()
    if left == str(TRIES):
        return f"slot {booted} healthy, {left} tries left"
    marked = rauc("status", "mark-good", timeout=120)
    return (f"slot {booted} healthy: tries renewed ({left or '?'} -> {TRIES})"
            if marked.returncode == 0 else f"mark-good failed: {last_line(marked)}")


def keep_identity(slot_device: str, old_root: Path = Path("/")) -> str:
    """RAUC's post-install handler: the unit's identity into the slot just written, so an
    update never changes who the unit is."""
    with tempfile.TemporaryDirectory(prefix="edgebake-slot-", dir="/run") as mount:
        subprocess.run(["mount", "-t", "ext4", slot_device, mount], check=True)
        copied = 0
        try:
            for pattern in IDENTITY:
                for source in sorted(old_root.glob(pattern)):
                    target = Path(mount) / source.relative_to(old_root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    subprocess.run(["cp", "-a", "--remove-destination", str(source),
                                    str(target)], check=True)
                    copied += 1
        finally:
            subprocess.run(["sync"], check=False)
            subprocess.run(["umount", mount], check=False)
    return f"kept the unit's identity in {slot_device} ({copied} files)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgebake-os", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install_cmd = sub.add_parser("install", help="check and install a system bundle (.raucb)")
    install_cmd.add_argument("bundle", type=Path)
    install_cmd.add_argument("--window", type=int, default=DEFAULT_WINDOW_SEC,
                             help="seconds the new system must stay healthy after its boot")
    install_cmd.add_argument("--reboot", action="store_true", help="reboot into it at once")
    sub.add_parser("take", help="install the newest bundle in /data/os/inbox and reboot "
                   "(its path unit runs this)")
    sub.add_parser("status", help="both slots, the booted one, the update in flight")
    sub.add_parser("trial", help="at boot: commit or roll back the update in flight")
    sub.add_parser("keep-identity", help="RAUC post-install handler")
    args = parser.parse_args(argv)
    state = OsState()
    try:
        if args.command == "install":
            print(install(args.bundle, state, args.window), flush=True)
            if args.reboot:
                subprocess.run(["systemctl", "reboot"], check=False)
        elif args.command == "take":
            try:
                line = take(state)
            except OsUpdateError as exc:  # audited and in /health; the path unit goes on
                print(exc, flush=True)
                return 0
            print(line, flush=True)
            if line.startswith("installed"):
                subprocess.run(["systemctl", "reboot"], check=False)
        elif args.command == "trial":
            print(trial(state), flush=True)
        elif args.command == "keep-identity":
            for number in os.environ.get("RAUC_TARGET_SLOTS", "").split():
                print(keep_identity(os.environ[f"RAUC_SLOT_DEVICE_{number}"]), flush=True)
        else:
            print(json.dumps({**status(state), "audit": state.audit_tail()}, indent=1))
    except (OsUpdateError, OSError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
