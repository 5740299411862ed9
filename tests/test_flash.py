"""`invoke flash` on a real block device (a loop device made here), one unit or a batch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.errors import BuildError

ROOT = Path(__file__).resolve().parents[1]
SECTOR = 512
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ6oB9bHt0pLq7d3m0Yl1f3S0oQm7bTqkQJ0Zk0m3nXv tech"


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)


@pytest.fixture
def card(built: dict[str, Any], tmp_path: Path) -> Iterator[Path]:
    """A loop device 64 MiB larger than the image, like a card."""
    backing = tmp_path / "card.bin"
    size = built["image"].stat().st_size + 64 * 2**20
    subprocess.run(["truncate", "-s", str(size), str(backing)], check=True)
    device = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                            text=True, check=True).stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def seed_on(device: Path, built: dict[str, Any]) -> str:
    boot = built["partitions"]["partitions"][0]
    subprocess.run(["blockdev", "--flushbufs", str(device)], check=True)
    return subprocess.run(["mtype", "-i", f"{device}@@{boot['start'] * SECTOR}",
                           "::/edgebake-seed.yaml"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.image
def test_flash_a_block_device_with_a_seed(built: dict[str, Any], card: Path,
                                          tmp_path: Path) -> None:
    seed = tmp_path / "unit.yaml"
    seed.write_text("hostname: pole-17\ndevice_id: pole-17\n")
    refused = invoke("flash", "--image", str(built["image"]), "--device", str(card),
                     "--seed", str(seed), "--yes")
    assert refused.returncode == 1 and "NOT removable" in refused.stderr
    assert "Traceback" not in refused.stderr
    # the published .img.zst, unpacked by bmaptool with the .img's block map
    packed = built["out"] / built["manifest"]["image_compressed"]
    result = invoke("flash", "--image", str(packed), "--device", str(card),
                    "--seed", str(seed), "--yes", "--force")
    assert result.returncode == 0, result.stderr
    assert "read back from the device" in result.stdout
    assert "hostname: pole-17" in seed_on(card, built)
    table = json.loads(subprocess.run(["sfdisk", "-J", str(card)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    # the card's table is the image's: boot, root A, root B, data
    assert len(table["partitions"]) == len(built["partitions"]["partitions"]) == 4


@pytest.mark.image
def test_flash_units_one_card_per_row_with_a_log(built: dict[str, Any], card: Path,
                                                 tmp_path: Path) -> None:
    units = tmp_path / "units.csv"
    units.write_text("hostname,device_id,ssh_authorized_keys,app.mqtt.host,app.mqtt.enabled\n"
                     f"pole-1,pole-1,{KEY},broker.lan,true\n"
                     "pole-2,pole-2,,broker.lan,true\n")
    log = tmp_path / "flash-log.jsonl"
    result = invoke("flash", "--image", str(built["image"]), "--device", str(card),
                    "--units", str(units), "--log", str(log), "--yes", "--force")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["unit"] for e in entries] == ["pole-1", "pole-2"]
    assert all(e["image_sha256"] == built["manifest"]["image_sha256"] for e in entries)
    assert entries[0]["seed_sha256"] != entries[1]["seed_sha256"]
    last = seed_on(card, built)  # the same loop device stood in for both cards
    assert "hostname: pole-2" in last and "host: broker.lan" in last


@pytest.mark.parametrize(("csv", "message"), [
    ("name,device_id\nx,y\n", "columns: expected hostname"),
    ("hostname\npole-1\npole-1\n", "found pole-1 twice"),
    ("hostname,app.mqtt.port\npole-1,0\n", "row 2: app: mqtt.port: expected an integer"),
    ("hostname\nBad_Name\n", "row 2: hostname: expected lowercase"),
])
def test_bad_units_file_is_refused_before_any_card(tmp_path: Path, csv: str,
                                                   message: str) -> None:
    from edgebake_builder.flashing.units import read_units

    units = tmp_path / "units.csv"
    units.write_text(csv)
    with pytest.raises(BuildError) as caught:
        read_units(units)
    assert message in str(caught.value) and str(units) in str(caught.value)


def test_system_disk_and_partitions_are_refused() -> None:
    """Only lsblk is run here: the guard refuses before anything could be written."""
    from edgebake_builder.flashing.guard import check_device, system_disks

    disks = system_disks()
    assert disks, "findmnt/lsblk found no disk under /"
    for disk in disks:
        with pytest.raises(BuildError, match="holds this machine's root filesystem"):
            check_device(Path(disk), force=True)


def test_a_card_that_is_not_there_is_an_error_before_anything_is_written(
        tmp_path: Path) -> None:
    """bmaptool would create /dev/sdX as a regular file, and the log would say flashed."""
    from edgebake_builder.flashing.write import flash

    image = tmp_path / "u.img"
    image.write_bytes(b"\0" * 4096)
    image.with_name("u.img.bmap").write_text("<bmap/>")
    missing = Path("/dev/edgebake-no-such-card")
    with pytest.raises(BuildError, match="no such block device; is the card inserted"):
        flash(image, missing, None)
    assert not missing.exists()


def test_push_model_puts_no_file_name_into_a_remote_command(tmp_path: Path) -> None:
    """A bundle named to be a shell command reaches the unit under a fixed name: ssh and scp
    (stand-ins on PATH that record what they were asked) never see the name."""
    import os
    import stat

    from edgebake_builder.flashing.push import push_bundle

    log = tmp_path / "calls.log"
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("ssh", "scp"):
        script = tools / tool
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> {log}\n'
                          'echo "model 2.0 installed and on trial"\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    bundle = tmp_path / "x;touch $HOME.pwned;.ebundle"
    bundle.write_bytes(b"bundle")
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{tools}:{path}"
    try:
        answer = push_bundle("unit.local", bundle)
    finally:
        os.environ["PATH"] = path
    assert "installed" in answer
    calls = log.read_text()
    assert "pwned" not in calls.replace(str(bundle), ""), calls
    assert "scp -q -s" in calls and ":/data/incoming/pushed.ebundle.part" in calls, calls
