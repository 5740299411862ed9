"""The running checks' one reboot. An image that takes system updates reboots into a new
system: the update check's own install, kept after its window. One reboot under QEMU's
emulation (~50 s) then proves both what a reboot must keep and what a system update must."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgebake_builder.flashing.pushos import push_os, wait_for_verdict
from edgebake_builder.steps.osbundle import OsKeys
from edgebake_builder.validate.osbundles import derive_bundle

WINDOW_SEC = 15  # healthy this long after the new system is ready: enough to prove the path
VERDICT_DEADLINE_SEC = 1500  # install, reboot, window, and for a rollback a second reboot
# the update the reboot was: its status, its version, and the unit as it was before it
SYSTEM_UPDATE: dict[str, Any] = {}


def takes_system_updates(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The image's system section when it is A/B and built with an OS key, else None."""
    info = manifest.get("system") or {}
    return dict(info) if info.get("layout") == "ab" and info.get("bundle") else None


def os_keys() -> OsKeys:
    folder = Path(os.environ["EDGEBAKE_OS_KEYS"])
    return OsKeys(folder / "os-ca.crt", folder / "os.key", folder / "os.crt")


def ssh_options() -> list[str]:
    """The checks' own SSH settings (test-image writes them): their shared connection, and
    no host-key records for a unit that is new at every run."""
    return ["-F", os.environ["EDGEBAKE_SSH_CONFIG"]]


def ssh_args() -> dict[str, Any]:
    return {"port": int(os.environ["EDGEBAKE_SSH_PORT"]),
            "identity": os.environ["EDGEBAKE_SSH_KEY"], "extra_options": ssh_options()}


def identity(host: Any) -> dict[str, str]:
    return {"machine_id": host.file("/etc/machine-id").content_string.strip(),
            "host_keys": host.run("cat /etc/ssh/ssh_host_*_key.pub | sort").stdout,
            "hostname": host.run("hostname").stdout.strip()}


def install(system: dict[str, Any], version: str, kind: str, tmp: Path,
            window_sec: int = WINDOW_SEC) -> dict[str, Any]:
    """A bundle derived from the image's own, pushed over SSH; the unit's verdict on it."""
    manifest_dir = Path(os.environ["EDGEBAKE_IMAGE"]).parent
    bundle = derive_bundle(manifest_dir / system["bundle"], os_keys(), system["compatible"],
                           version, tmp / f"{kind}.raucb", kind)
    answer = push_os("127.0.0.1", bundle, window_sec=window_sec, **ssh_args())
    assert f"installed system {version}" in answer, answer
    return wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **ssh_args())


def reboot_unit(host: Any, manifest: dict[str, Any], tmp: Path) -> bool:
    """Into a new system where the image takes them (returns True once it is decided),
    else `systemctl reboot` (returns False at once)."""
    system = takes_system_updates(manifest)
    if system is None:
        host.run("systemctl reboot")
        return False
    results = host.run("cat /data/results/results-*.jsonl | head -1").stdout.strip()
    assert results, "no results journaled before the update"
    before = {"identity": identity(host), "results": results,
              "booted": json.loads(host.check_output("edgebake-os status"))["booted"]}
    version = f"{system['version']}.1-test"
    SYSTEM_UPDATE.update(before=before, version=version,
                         status=install(system, version, "good", tmp))
    return True
