"""System updates on the booted unit (A/B images): a new root over SSH, kept after its
health window with the unit's identity and data; a root whose service never becomes
healthy, rolled back. These reboot the unit, so they run after the other running checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.flashing.pushos import push_os, wait_for_verdict
from edgebake_builder.steps.osbundle import OsKeys
from edgebake_builder.validate.osbundles import MARKER, derive_bundle

WINDOW_SEC = 15  # healthy this long after the new system is ready: enough to prove the path
VERDICT_DEADLINE_SEC = 1500  # install, reboot, window, and for a rollback a second reboot
SSH_EXTRA = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR"]


@pytest.fixture(scope="module")
def system(manifest: dict[str, Any]) -> dict[str, Any]:
    info = manifest.get("system") or {}
    if info.get("layout") != "ab":
        pytest.skip("a single-root image takes no system updates")
    if not info.get("bundle"):
        pytest.skip("built without an OS key (keys/os-ca.crt): the image takes no system "
                    "updates; `invoke make-os-key --out keys/` and rebuild")
    return dict(info)


@pytest.fixture(scope="module")
def keys() -> OsKeys:
    folder = Path(os.environ["EDGEBAKE_OS_KEYS"])
    return OsKeys(folder / "os-ca.crt", folder / "os.key", folder / "os.crt")


def ssh_args() -> dict[str, Any]:
    return {"port": int(os.environ["EDGEBAKE_SSH_PORT"]),
            "identity": os.environ["EDGEBAKE_SSH_KEY"], "extra_options": SSH_EXTRA}


def identity(host: Any) -> dict[str, str]:
    return {"machine_id": host.file("/etc/machine-id").content_string.strip(),
            "host_keys": host.run("cat /etc/ssh/ssh_host_*_key.pub | sort").stdout,
            "hostname": host.run("hostname").stdout.strip()}


def install(manifest_dir: Path, system: dict[str, Any], keys: OsKeys, version: str,
            kind: str, tmp: Path) -> dict[str, Any]:
    bundle = derive_bundle(manifest_dir / system["bundle"], keys, system["compatible"],
                           version, tmp / f"{kind}.raucb", kind)
    answer = push_os("127.0.0.1", bundle, window_sec=WINDOW_SEC, **ssh_args())
    assert f"installed system {version}" in answer, answer
    return wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **ssh_args())


def test_a_strangers_system_bundle_on_a_stick_is_refused_and_shown(
        host: Any, system: dict[str, Any]) -> None:
    """The stick's edgebake/*.raucb went from the USB helper through the inbox to root's
    updater (the path unit), which refused it on RAUC's signature check: in /health and the
    audit log, nothing left in the inbox, no install begun, no unit failed."""
    name = os.environ.get("EDGEBAKE_USB_OS_BUNDLE")
    if not name:
        pytest.skip("no system bundle on the test stick (rauc missing on the host)")
    from test_running import health, wait

    refused = wait(lambda: ((health().get("system") or {}).get("refused") or {}), 300,
                   "the stick's system bundle refused in /health")
    assert refused["via"] == "usb" and refused["bundle"] == name, refused
    assert "signature" in refused["reason"], refused
    audit = host.run("cat /data/os/audit.jsonl").stdout
    assert '"os-refused"' in audit and name in audit, audit
    assert '"os-installing"' not in audit, audit
    assert not host.run("ls -A /data/os/inbox /data/os/incoming 2>/dev/null | grep -v :"
                        ).stdout.strip()
    failed = host.run("systemctl list-units --all --plain --no-legend --state=failed "
                      "'edgebake-os-*'").stdout
    assert not failed.strip(), failed
    assert host.service("edgebake-os-inbox.path").is_running


def test_a_new_system_is_installed_kept_and_keeps_the_unit(
        host: Any, system: dict[str, Any], keys: OsKeys, tmp_path: Path) -> None:
    before = identity(host)
    booted = json.loads(host.check_output("edgebake-os status"))["booted"]
    results = host.run("cat /data/results/results-*.jsonl | head -1").stdout.strip()
    assert results, "no results journaled before the update"
    version = f"{system['version']}.1-test"
    status = install(Path(os.environ["EDGEBAKE_IMAGE"]).parent, system, keys, version,
                     "good", tmp_path)
    assert status["update"]["state"] == "confirmed", status
    assert status["booted"] != booted, status
    assert status["slots"][status["booted"]] == version, status
    assert host.file(MARKER).content_string.startswith(version)
    assert identity(host) == before
    assert results in host.run("cat /data/results/results-*.jsonl").stdout
    # the slot is good in RAUC's eyes, and /health says which runs
    rauc = json.loads(host.check_output("rauc status --output-format=json"))
    assert rauc["booted"] == status["booted"], rauc
    from test_running import health, wait
    snap = wait(lambda: (h := health()).get("ready") and h, 300, "the service after update")
    assert snap["system"]["booted"] == status["booted"]
    assert snap["system"]["version"] == version
    assert snap["system"]["update"]["state"] == "confirmed"


def order_over_mqtt(manifest_dir: Path, system: dict[str, Any], keys: OsKeys, version: str,
                    kind: str) -> dict[str, Any]:
    """The fleet's way: the bundle on the update server, a signed order on the unit's
    `os-update` topic; the unit downloads it, hands it to root, installs and reboots."""
    from edgebake_builder.fleet import Broker, send_order
    from edgebake_builder.signing import read_private_key, sign_order

    served = Path(os.environ["EDGEBAKE_SERVED_DIR"])
    bundle = derive_bundle(manifest_dir / system["bundle"], keys, system["compatible"],
                           version, served / f"{kind}.raucb", kind)
    order = sign_order(read_private_key(Path(os.environ["EDGEBAKE_ORDER_KEY"])),
                       "qemu-test-unit", url=f"{os.environ['EDGEBAKE_SERVED_URL']}/{bundle.name}",
                       system=True, window_sec=WINDOW_SEC)
    broker = Broker("127.0.0.1", int(os.environ["EDGEBAKE_MQTT_PORT"]),
                    os.environ["EDGEBAKE_MQTT_USER"], os.environ["EDGEBAKE_MQTT_PASSWORD"],
                    os.environ["EDGEBAKE_MQTT_CA"])
    send_order(broker, "qemu-test-unit", order, system=True)
    return wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **ssh_args())


def test_a_system_that_never_gets_healthy_is_rolled_back(
        host: Any, system: dict[str, Any], keys: OsKeys, tmp_path: Path) -> None:
    """Ordered over MQTT (the SSH way is the check above): the whole fleet path, from the
    service's download through root's inbox to the trial's rollback."""
    if os.environ.get("EDGEBAKE_OS_ROLLBACK") != "1":
        pytest.skip("not asked for (--no-os-rollback or --no-update-trials)")
    was = json.loads(host.check_output("edgebake-os status"))
    version = f"{system['version']}.2-unhealthy"
    manifest_dir = Path(os.environ["EDGEBAKE_IMAGE"]).parent
    if os.environ.get("EDGEBAKE_MQTT_PORT"):
        status = order_over_mqtt(manifest_dir, system, keys, version, "unhealthy")
        assert status["update"]["via"] == "mqtt", status
    else:  # no mosquitto on the host
        status = install(manifest_dir, system, keys, version, "unhealthy", tmp_path)
    assert status["update"]["state"] == "rolled-back", status
    assert "healthy" in status["update"]["reason"], status
    assert status["booted"] == was["booted"], status
    assert host.file("/etc/edgebake/version").content_string.strip() == was["version"]
    audit = host.run("tail -3 /data/os/audit.jsonl").stdout
    assert "os-rolled-back" in audit and version in audit
