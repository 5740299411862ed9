"""`invoke push-os`: a system bundle to one unit over SSH, installed by RAUC, then a reboot.

The bundle goes to /data/os under a temporary name and is renamed when whole; the unit's
`edgebake-os install` hands it to RAUC, which checks the signature before it reads anything
else. With `wait`, the laptop waits for the unit to come back and for the new system's
verdict after its trial window (confirmed, or rolled back with the reason).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from ..errors import BuildError
from .push import SSH_TIMEOUT_SEC, connection, ssh_options

INCOMING = "/data/os/incoming.raucb"
DONE = ("confirmed", "rolled-back", "failed")


def _ssh(target: str, port: int, options: list[str], command: str, timeout: float
         ) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["ssh", "-p", str(port), *options, target, command],
                              capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], 255, "", "ssh timed out")


def os_status(host: str, port: int = 22, user: str = "root", identity: str = "",
              extra_options: list[str] | None = None) -> dict[str, Any] | None:
    """`edgebake-os status` on the unit, or None while it does not answer."""
    options = [*ssh_options(port, identity), *(extra_options or [])]
    result = _ssh(f"{user}@{host}", port, options, "edgebake-os status", 60)
    if result.returncode != 0:
        return None
    try:
        data = json.loads(result.stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def push_os(host: str, bundle: Path, port: int = 22, user: str = "root", identity: str = "",
            window_sec: int = 300, reboot: bool = True,
            extra_options: list[str] | None = None) -> str:
    """Copy, install, reboot; returns the unit's one-line answer."""
    options, target = connection(host, bundle, port, user, identity, extra_options)
    partial = f"{INCOMING}.part"
    made = _ssh(target, port, options, f"mkdir -p /data/os && rm -f {INCOMING} {partial} && "
                "df --output=avail -B1 /data | tail -1", 120)
    if made.returncode != 0:
        raise BuildError(f"{host}: cannot reach the unit over SSH: {made.stderr.strip()[-300:]}")
    free = int(made.stdout.split()[-1]) if made.stdout.split()[-1:] and \
        made.stdout.split()[-1].isdigit() else 0
    need = bundle.stat().st_size + 16 * 2**20  # and room for the journal meanwhile
    if free < need:
        raise BuildError(f"{host}: /data has {free / 2**20:.0f} MiB free, the bundle needs "
                         f"{need / 2**20:.0f} MiB; nothing was copied")
    copy = subprocess.run(["scp", "-q", "-s", "-P", str(port), *options, str(bundle),
                           f"{target}:{partial}"], capture_output=True, text=True,
                          check=False, timeout=SSH_TIMEOUT_SEC)
    if copy.returncode != 0:
        _ssh(target, port, options, f"rm -f {partial}", 60)
        raise BuildError(f"{host}: copying {bundle.name} failed: {copy.stderr.strip()[-300:]}")
    flag = " --reboot" if reboot else ""
    command = (f"mv {partial} {INCOMING} && edgebake-os install {INCOMING} "
               f"--window {int(window_sec)}{flag}; code=$?; rm -f {INCOMING}; exit $code")
    result = _ssh(target, port, options, command, SSH_TIMEOUT_SEC)
    lines = [x for x in (result.stdout.strip() + "\n" + result.stderr.strip()).splitlines()
             if x.strip() and "closed by remote host" not in x]
    line = lines[0] if lines else f"no answer (ssh exited {result.returncode})"
    # a reboot may cut the connection after the answer: the answer decides
    if result.returncode not in (0, 255) or line.startswith("error:"):
        raise BuildError(f"{host}: {line.removeprefix('error: ')}")
    return f"{host}: {line}"


def settled(status: dict[str, Any], version: str) -> bool:
    """The update to `version` is decided and the unit runs the slot the verdict leaves it
    on: a system that failed its trial is rolled back a moment before it reboots out."""
    update = status.get("update") or {}
    if update.get("version") != version or update.get("state") not in DONE:
        return False
    return update["state"] != "rolled-back" or status.get("booted") != update.get("to_slot")


def wait_for_verdict(host: str, version: str, deadline_sec: float, port: int = 22,
                     user: str = "root", identity: str = "",
                     extra_options: list[str] | None = None) -> dict[str, Any]:
    """Poll `edgebake-os status` until the update to `version` is decided; its status."""
    started = time.monotonic()
    last: dict[str, Any] | None = None
    while time.monotonic() - started < deadline_sec:
        last = os_status(host, port, user, identity, extra_options) or last
        if last is not None and settled(last, version):
            return last
        time.sleep(5)
    state = ((last or {}).get("update") or {}).get("state", "no answer")
    raise BuildError(f"{host}: no verdict on system {version} after {deadline_sec:.0f} s "
                     f"(last state: {state})")
