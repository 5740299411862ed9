"""System updates on the booted unit (A/B images): a new root over SSH, kept after its
health window with the unit's identity and data (the update the reboot check rebooted the
unit with, see unit_reboot.py); a root whose service never becomes healthy, rolled back.
These reboot the unit, so they run after the other running checks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.flashing.pushos import wait_for_verdict
from edgebake_builder.validate.osbundles import MARKER, derive_bundle
from unit_reboot import (
    SYSTEM_UPDATE,
    VERDICT_DEADLINE_SEC,
    identity,
    install,
    os_keys,
    reboot_unit,
    ssh_args,
    takes_system_updates,
)

# a system whose service never answers /health fails a window of any length: a short one
# only ends the check sooner
UNHEALTHY_WINDOW_SEC = 5


@pytest.fixture(scope="module")
def system(manifest: dict[str, Any]) -> dict[str, Any]:
    info = takes_system_updates(manifest)
    if info is None and (manifest.get("system") or {}).get("layout") != "ab":
        pytest.skip("a single-root image takes no system updates")
    if info is None:
        pytest.skip("built without an OS key (keys/os-ca.crt): the image takes no system "
                    "updates; `invoke make-os-key --out keys/` and rebuild")
    return info


def test_a_new_system_is_installed_kept_and_keeps_the_unit(
        host: Any, system: dict[str, Any], manifest: dict[str, Any], tmp_path: Path) -> None:
    if not SYSTEM_UPDATE:  # the reboot check was not run (pytest -k): the update here
        reboot_unit(host, manifest, tmp_path)
    before, version, status = (SYSTEM_UPDATE[k] for k in ("before", "version", "status"))
    assert status["update"]["state"] == "confirmed", status
    assert status["booted"] != before["booted"], status
    assert status["slots"][status["booted"]] == version, status
    assert host.file(MARKER).content_string.startswith(version)
    assert identity(host) == before["identity"]
    assert before["results"] in host.run("cat /data/results/results-*.jsonl").stdout
    # the slot is good in RAUC's eyes, and /health says which runs
    rauc = json.loads(host.check_output("rauc status --output-format=json"))
    assert rauc["booted"] == status["booted"], rauc
    from test_running import health, wait
    snap = wait(lambda: (h := health()).get("ready") and h, 300, "the service after update")
    assert snap["system"]["booted"] == status["booted"]
    assert snap["system"]["version"] == version
    assert snap["system"]["update"]["state"] == "confirmed"


def order_over_mqtt(manifest_dir: Path, system: dict[str, Any], version: str, kind: str,
                    window_sec: int) -> dict[str, Any]:
    """The fleet's way: the bundle on the update server, a signed order on the unit's
    `os-update` topic; the unit downloads it, hands it to root, installs and reboots."""
    from edgebake_builder.fleet import Broker, send_order
    from edgebake_builder.signing import read_private_key, sign_order

    served = Path(os.environ["EDGEBAKE_SERVED_DIR"])
    bundle = derive_bundle(manifest_dir / system["bundle"], os_keys(), system["compatible"],
                           version, served / f"{kind}.raucb", kind)
    order = sign_order(read_private_key(Path(os.environ["EDGEBAKE_ORDER_KEY"])),
                       "qemu-test-unit", url=f"{os.environ['EDGEBAKE_SERVED_URL']}/{bundle.name}",
                       system=True, window_sec=window_sec)
    broker = Broker("127.0.0.1", int(os.environ["EDGEBAKE_MQTT_PORT"]),
                    os.environ["EDGEBAKE_MQTT_USER"], os.environ["EDGEBAKE_MQTT_PASSWORD"],
                    os.environ["EDGEBAKE_MQTT_CA"])
    send_order(broker, "qemu-test-unit", order, system=True)
    return wait_for_verdict("127.0.0.1", version, VERDICT_DEADLINE_SEC, **ssh_args())


def test_a_system_that_never_gets_healthy_is_rolled_back(
        host: Any, system: dict[str, Any], tmp_path: Path) -> None:
    """Ordered over MQTT (the SSH way is the check above): the whole fleet path, from the
    service's download through root's inbox to the trial's rollback."""
    if os.environ.get("EDGEBAKE_OS_ROLLBACK") != "1":
        pytest.skip("not asked for (--no-os-rollback or --no-update-trials)")
    was = json.loads(host.check_output("edgebake-os status"))
    version = f"{system['version']}.2-unhealthy"
    manifest_dir = Path(os.environ["EDGEBAKE_IMAGE"]).parent
    if os.environ.get("EDGEBAKE_MQTT_PORT"):
        status = order_over_mqtt(manifest_dir, system, version, "unhealthy",
                                 UNHEALTHY_WINDOW_SEC)
        assert status["update"]["via"] == "mqtt", status
    else:  # no mosquitto on the host
        status = install(system, version, "unhealthy", tmp_path, UNHEALTHY_WINDOW_SEC)
    assert status["update"]["state"] == "rolled-back", status
    assert "healthy" in status["update"]["reason"], status
    assert status["booted"] == was["booted"], status
    assert host.file("/etc/edgebake/version").content_string.strip() == was["version"]
    audit = host.run("tail -3 /data/os/audit.jsonl").stdout
    assert "os-rolled-back" in audit and version in audit
