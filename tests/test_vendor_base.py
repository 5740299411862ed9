"""`build-image --base`: a Raspberry Pi OS Lite image (here its look-alike, since the real one
cannot be downloaded) is imported without mounts, gets our layers, keeps its kernel and
firmware, and the result boots under QEMU and passes the same checks as our own base."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.validate.diskimage import Partition, extract
from helpers import INVOKE, ROOT, invoke, partition_table

SECTOR = 512

pytestmark = pytest.mark.image


@pytest.fixture(scope="session")
def lookalike(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("raspios") / "raspios-lite.img.xz"
    result = invoke("make-raspios-lookalike", "--out", str(out), "--firstrun", "--cloud-init")
    assert result.returncode == 0, result.stderr[-2000:]
    sha = result.stdout.strip().splitlines()[-1].split()[-1]
    return out, sha


@pytest.fixture(scope="session")
def vendor_built(lookalike: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
                 ) -> dict[str, Any]:
    image, sha = lookalike
    out = tmp_path_factory.mktemp("pi4-raspios")
    recipe = out.parent / "extra-package.yaml"
    # a package the base lacks: apt adds it inside the imported tree under qemu-user
    recipe.write_text("packages: [jq]\n")
    result = invoke("build-image", "--target", "pi4", "--base", str(image), "--base-sha256",
                    sha, "--recipe", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    built = out / manifest["image"]
    return {"out": out, "manifest": manifest, "image": built,
            "partitions": partition_table(built), "build_log": result.stdout}


def fat_text(built: dict[str, Any], name: str) -> str:
    offset = built["partitions"]["partitions"][0]["start"] * SECTOR
    return subprocess.run(["mtype", "-i", f"{built['image']}@@{offset}", f"::/{name}"],
                          capture_output=True, text=True, check=True).stdout


def test_manifest_names_the_base_and_what_was_added(vendor_built: dict[str, Any],
                                                     lookalike: tuple[Path, str]) -> None:
    base = vendor_built["manifest"]["base_image"]
    assert base["sha256"] == lookalike[1]
    assert base["name"] == "raspios-lite.img.xz"
    assert "look-alike" in base["rpi_issue"]
    assert "init=/usr/lib/raspberrypi-sys-mods/firstboot" in base["cmdline"]
    assert "systemd.run=/boot/firmware/firstrun.sh" in base["cmdline"]
    # the look-alike has every package our layers list; the recipe's jq came through apt
    assert "jq" in base["packages_added"] and "python3" not in base["packages_added"]
    assert "adding 1 package(s) to the base with apt" in vendor_built["build_log"]
    assert vendor_built["manifest"]["base_key"] is None


def test_boot_partition_keeps_the_vendor_kernel_and_fixes_cmdline(
        vendor_built: dict[str, Any]) -> None:
    cmdline = fat_text(vendor_built, "cmdline.txt").split()
    assert f"root=PARTUUID={vendor_built['manifest']['partitions']['partuuids']['root']}" \
        in cmdline
    assert not [a for a in cmdline if a.startswith("init=")], "vendor resize left in cmdline"
    assert "console=serial0,115200" in cmdline and "rootwait" in cmdline
    assert "ro" in cmdline and "rw" not in cmdline
    config = fat_text(vendor_built, "config.txt")
    assert "auto_initramfs=1" in config and "camera_auto_detect=1" in config
    assert config.rstrip().endswith("# edgebake recipe settings\ndtparam=watchdog=on")
    offset = vendor_built["partitions"]["partitions"][0]["start"] * SECTOR
    listing = subprocess.run(["mdir", "-b", "-i", f"{vendor_built['image']}@@{offset}", "::/"],
                             capture_output=True, text=True, check=True).stdout
    names = {line.rsplit("/", 1)[-1] for line in listing.split()}
    assert {"kernel8.img", "kernel_2712.img", "initramfs8", "bcm2712-rpi-5-b.dtb"} <= names
    assert [p["type"] for p in vendor_built["partitions"]["partitions"]] == ["c", "83", "83"]
    # Imager's customisation is left for Imager's own first boot
    assert {"firstrun.sh", "user-data", "network-config"} <= names
    assert "systemd.run=/boot/firmware/firstrun.sh" in cmdline
    assert "hostname: from-imager" in fat_text(vendor_built, "user-data")


def test_setuid_bits_survive_the_import_and_units_are_enabled(
        vendor_built: dict[str, Any], tmp_path: Path) -> None:
    part = vendor_built["partitions"]["partitions"][1]
    root = extract(vendor_built["image"], Partition(2, part["start"] * SECTOR,
                                                    part["size"] * SECTOR, "83"),
                   tmp_path / "root.ext4")
    for path in ("/usr/bin/su", "/usr/bin/passwd", "/usr/bin/mount"):
        out = subprocess.run(["debugfs", "-R", f"stat {path}", str(root)], capture_output=True,
                             text=True, check=True).stdout
        assert "Mode:  04755" in out, f"{path} lost its setuid bit: {out[:200]}"
    sshd = subprocess.run(["debugfs", "-R", "stat /usr/lib/openssh/ssh-keysign", str(root)],
                          capture_output=True, text=True, check=True).stdout
    assert "Mode:  04755" in sshd
    wants = subprocess.run(["debugfs", "-R", "ls -l /etc/systemd/system/multi-user.target.wants",
                            str(root)], capture_output=True, text=True, check=True).stdout
    assert "edgebake.service" in wants
    # the vendor's host key unit is masked: first boot makes the unit's one key
    masked = subprocess.run(["debugfs", "-R", "stat /etc/systemd/system/"
                             "regenerate_ssh_host_keys.service", str(root)],
                            capture_output=True, text=True, check=True).stdout
    assert "Fast link dest: \"/dev/null\"" in masked, masked[:300]


def test_bad_base_arguments_fail_with_one_line(lookalike: tuple[Path, str],
                                               tmp_path: Path) -> None:
    image, sha = lookalike
    cases = [
        (["--target", "pi4", "--base", str(image), "--base-sha256", "0" * 64],
         "sha256 is"),
        (["--target", "pi4", "--base", str(image), "--base-sha256", "xyz"],
         "expected 64 lowercase hex digits"),
        (["--target", "pi5"], "needs a vendor image"),
        (["--target", "pi4-trixie", "--base", str(image), "--base-sha256", sha],
         "cannot be built on a vendor image"),
        (["--target", "pi4", "--base", str(tmp_path / "missing.img"), "--base-sha256", sha],
         "file not found"),
        (["--target", "pi4", "--base-sha256", sha], "without --base"),
    ]
    not_an_image = tmp_path / "notes.img"
    not_an_image.write_bytes(b"\0" * 4096)
    import hashlib
    cases.append((["--target", "pi4", "--base", str(not_an_image), "--base-sha256",
                   hashlib.sha256(not_an_image.read_bytes()).hexdigest()],
                  "expected a Raspberry Pi OS layout"))
    for args, expected in cases:
        result = invoke("build-image", *args, "--out", str(tmp_path / "out"))
        assert result.returncode != 0, args
        assert expected in result.stderr, (args, result.stderr[-800:])
        assert "Traceback" not in result.stderr, result.stderr[-1500:]
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.boot
def test_the_vendor_based_image_boots_and_passes_its_checks(
        vendor_built: dict[str, Any]) -> None:
    result = subprocess.run([*INVOKE, "test-image", "--target", "pi4", "--image",
                             str(vendor_built["image"]), "--no-update-trials",
                             "--no-supervision-trials", "--no-runtime-checks"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    print(result.stdout[-5000:], result.stderr[-2000:])
    assert result.returncode == 0
    assert "boot-to-first-inference:" in result.stdout
