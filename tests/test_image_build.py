"""Builds the real pi4 image and inspects it with the tools a user would: sfdisk, mtools,
debugfs, sha256sum and bmaptool. Slow the first time (the base rootfs), then cached."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.validate.diskimage import Partition, extract

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke"]
SECTOR = 512

pytestmark = pytest.mark.image


def invoke(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INVOKE, *args], cwd=cwd, capture_output=True, text=True,
                          check=False)


def debugfs(fs: Path, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, str(fs)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="session")
def root_fs(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    part = built["partitions"]["partitions"][1]
    root = Partition(2, part["start"] * SECTOR, part["size"] * SECTOR, part["type"])
    return extract(built["image"], root, tmp_path_factory.mktemp("fs") / "root.ext4")


def test_partition_table(built: dict[str, Any]) -> None:
    table = built["partitions"]
    assert table["label"] == "dos"
    parts = table["partitions"]
    # boot, root A, root B (empty, a hole in the file), data
    assert [p["type"] for p in parts] == ["c", "83", "83", "83"]
    assert built["manifest"]["system"]["layout"] == "ab"
    assert parts[0].get("bootable") is True
    assert parts[0]["start"] * SECTOR == 4 * 2**20
    assert parts[0]["size"] * SECTOR == 256 * 2**20
    assert int(table["id"], 16) == built["manifest"]["partitions"]["disk_signature"]
    for first, second in itertools.pairwise(parts):
        assert first["start"] + first["size"] <= second["start"]


def test_boot_partition_holds_firmware_uboot_and_its_script(built: dict[str, Any]) -> None:
    """The Pi firmware loads U-Boot; U-Boot runs boot.scr, which boots a slot's own kernel
    (QEMU cannot run the Pi firmware: this is what a Pi 4 needs on its card)."""
    offset = built["partitions"]["partitions"][0]["start"] * SECTOR
    target = f"{built['image']}@@{offset}"
    listing = subprocess.run(["mdir", "-b", "-i", target, "::/"], capture_output=True,
                             text=True, check=True).stdout
    names = {line.rsplit("/", 1)[-1] for line in listing.split()}
    config = subprocess.run(["mtype", "-i", target, "::/config.txt"], capture_output=True,
                            text=True, check=True).stdout
    kernels = [ln.split("=", 1)[1] for ln in config.splitlines() if ln.startswith("kernel=")]
    assert kernels == ["u-boot.bin"], config
    assert not [ln for ln in config.splitlines() if ln.startswith("initramfs ")], config
    assert "arm_64bit=1" in config
    for required in ("config.txt", "u-boot.bin", "boot.scr", "boot-state.env",
                     "bcm2711-rpi-4-b.dtb", "bcm2711-rpi-400.dtb", "bcm2711-rpi-cm4-io.dtb",
                     "start4.elf", "fixup4.dat"):
        assert required in names, f"{required} missing from the boot partition: {sorted(names)}"
    assert not [n for n in names if n.startswith(("vmlinuz", "initrd"))], names  # in the slots
    uboot = subprocess.run(["mtype", "-i", target, "::/u-boot.bin"], capture_output=True,
                           check=True).stdout
    assert b"U-Boot" in uboot and b"rpi" in uboot.lower()  # Debian's rpi_arm64 build
    script = subprocess.run(["mtype", "-i", target, "::/boot.cmd"], capture_output=True,
                            text=True, check=True).stdout
    for needed in ("BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT", "booti", "rauc.slot=",
                   "console=ttyS1,115200", "/boot/vmlinuz", "/boot/initrd.img", "fatwrite"):
        assert needed in script, needed
    state = subprocess.run(["mtype", "-i", target, "::/boot-state.env"], capture_output=True,
                           check=True).stdout
    assert len(state) == 0x4000 and zlib.crc32(state[4:]) == int.from_bytes(state[:4], "little")
    assert b"BOOT_ORDER=A B\0" in state and b"BOOT_B_LEFT=0\0" in state
    assert "enable_uart=1" in config and "dtparam=watchdog=on" in config
    fsinfo = subprocess.run(["minfo", "-i", target, "::"], capture_output=True, text=True,
                            check=True).stdout
    assert "FAT32" in fsinfo or "fat32" in fsinfo.lower()


def test_system_bundle_is_signed_and_holds_the_root(built: dict[str, Any]) -> None:
    system = built["manifest"]["system"]
    bundle = built["out"] / system["bundle"]
    assert bundle.name == f"edgebake-pi4-{system['version']}.raucb"
    info = subprocess.run(["rauc", "info", "--keyring", str(ROOT / "keys" / "os-ca.crt"),
                           "--output-format=json", str(bundle)], capture_output=True,
                          text=True, check=False)
    assert info.returncode == 0, info.stderr
    data = json.loads(info.stdout)
    assert data["compatible"] == "edgebake-pi4" and data["version"] == system["version"]
    assert [next(iter(i)) for i in data["images"]] == ["rootfs"]
    # another CA's keyring refuses it: the signature is what is checked
    other = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "/dev/null",
                            "-out", str(built["out"].parent / "other-ca.crt"), "-days", "1",
                            "-subj", "/CN=other"], capture_output=True, check=False)
    assert other.returncode == 0
    refused = subprocess.run(["rauc", "info", "--keyring",
                              str(built["out"].parent / "other-ca.crt"), str(bundle)],
                             capture_output=True, text=True, check=False)
    assert refused.returncode != 0 and "signature" in refused.stderr.lower(), refused.stderr


def test_root_fs_has_app_unit_and_model(built: dict[str, Any], root_fs: Path) -> None:
    listing = debugfs(root_fs, "ls -p /opt/edgebake")
    for name in ("bin", "lib", "model"):
        assert f"/{name}/" in listing
    assert "edgebake_runtime" in debugfs(root_fs, "ls -p /opt/edgebake/lib")
    assert "tflite_runtime" in debugfs(root_fs, "ls -p /opt/edgebake/lib")
    wants = debugfs(root_fs, "ls -p /etc/systemd/system/multi-user.target.wants")
    assert "/edgebake.service/" in wants
    unit = debugfs(root_fs, "cat /usr/lib/systemd/system/edgebake.service")
    for directive in ("Type=notify", "WatchdogSec=30", "User=edgebake", "ProtectSystem=strict",
                      "NoNewPrivileges=yes", "DeviceAllow=char-video4linux rw"):
        assert directive in unit
    model = built["manifest"]["model"]
    with subprocess.Popen(["debugfs", "-R", f"cat {model['path']}", str(root_fs)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
        assert proc.stdout is not None
        data = proc.stdout.read()
    assert hashlib.sha256(data).hexdigest() == model["sha256"]
    assert model["verified_on_target"] is True


def test_no_account_has_a_password_and_no_baked_identity(root_fs: Path) -> None:
    shadow = debugfs(root_fs, "cat /etc/shadow")
    for line in shadow.strip().splitlines():
        name, password = line.split(":")[:2]
        assert password.startswith(("!", "*")), f"account {name} has a usable password"
    assert "edgebake:" in debugfs(root_fs, "cat /etc/passwd")
    assert debugfs(root_fs, "cat /etc/machine-id").strip() == "uninitialized"
    assert "ssh_host_" not in debugfs(root_fs, "ls /etc/ssh")
    sshd = debugfs(root_fs, "cat /etc/ssh/sshd_config.d/edgebake.conf")
    assert "PasswordAuthentication no" in sshd


def test_manifest_fields(built: dict[str, Any]) -> None:
    m = built["manifest"]
    for key in ("target", "image", "image_compressed", "bmap", "recipe_sha256", "packages",
                "python_wheels", "model", "source_date_epoch", "build_seconds", "rootfs_bytes"):
        assert key in m
    names = {p["name"] for p in m["packages"]}
    assert {"linux-image-arm64", "raspi-firmware", "python3", "systemd"} <= names
    assert all(p["arch"] in ("arm64", "all") for p in m["packages"])
    assert {w["name"] for w in m["python_wheels"]} == {
        "tflite-runtime", "paho-mqtt", "av"}  # cryptography is Debian's (layer python)
    assert "python3-cryptography" in names
    assert m["model"]["card"]["task"] == "blazeface"


def test_checksums_and_bmap(built: dict[str, Any], tmp_path: Path) -> None:
    out = built["out"]
    check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True,
                           text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # image, .zst, bmap, SPDX and CycloneDX SBOMs, system bundle, manifest
    assert check.stdout.count(": OK") == 7
    copy = tmp_path / "flashed.img"
    flash = subprocess.run(["bmaptool", "copy", "--bmap", str(out / built["manifest"]["bmap"]),
                            str(built["image"]), str(copy)], capture_output=True, text=True,
                           check=False)
    assert flash.returncode == 0, flash.stderr
    assert copy.stat().st_size == built["image"].stat().st_size
    # the published .img.zst unpacks to the very image
    packed = out / built["manifest"]["image_compressed"]
    assert packed.name.endswith(".img.zst")
    unpacked = subprocess.run(["zstd", "-dc", str(packed)], capture_output=True, check=True)
    assert hashlib.sha256(unpacked.stdout).hexdigest() == built["manifest"]["image_sha256"]


def test_rebuild_is_bit_identical(built: dict[str, Any], tmp_path: Path) -> None:
    result = invoke("build-image", "--target", "pi4", "--out", str(tmp_path / "again"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert again["image_sha256"] == built["manifest"]["image_sha256"]
    # the compressed copy too: zstd's output does not depend on its threads
    # the manifest holds the build's time, and the system bundle's signature its signing
    # time: the root inside the bundle is what must match
    sums = [[line for line in (folder / "SHA256SUMS").read_text().splitlines()
             if not line.endswith(("manifest.json", ".raucb"))]
            for folder in (built["out"], tmp_path / "again")]
    assert sums[0] == sums[1] and len(sums[0]) == 5, sums  # the SBOMs are the same too
    roots = [json.loads(subprocess.run(
        ["rauc", "info", "--no-verify", "--output-format=json",
         str(folder / built["manifest"]["system"]["bundle"])], capture_output=True, text=True,
        check=True).stdout)["images"][0]["rootfs"]["checksum"]
        for folder in (built["out"], tmp_path / "again")]
    assert roots[0] == roots[1], roots
    assert "cached base rootfs" in result.stdout


def test_bad_inputs_fail_early_with_one_line(tmp_path: Path) -> None:
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("layout:\n  boot_mib: tiny\n")
    not_a_model = tmp_path / "notes.tflite"
    not_a_model.write_text("hello")
    cases = [
        (["--recipe", str(bad_recipe)], f"{bad_recipe}: layout.boot_mib: expected an integer"),
        (["--model", str(tmp_path / "missing.tflite")], "missing.tflite: model file not found"),
        (["--model", str(not_a_model)], "notes.tflite: not a TFLite model"),
        (["--target", "pi9"], "unknown target 'pi9'"),
    ]
    for args, message in cases:
        result = invoke("build-image", *args, "--out", str(tmp_path / "o"))
        assert result.returncode == 1
        assert "Traceback" not in result.stderr + result.stdout
        assert message in result.stderr, result.stderr
    assert not list((tmp_path / "o").glob("*.img"))


def test_missing_host_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgebake_builder import preflight
    from edgebake_builder.errors import BuildError

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BuildError, match=r"missing host tools: .*genimage.*apt-get install "
                                         r".*bmap-tools"):
        preflight.require_tools()
    assert os.environ["PATH"] == "/nonexistent"


def test_flash_writes_image_and_seed_and_reads_back(built: dict[str, Any], tmp_path: Path) -> None:
    seed = tmp_path / "unit.yaml"
    seed.write_text("hostname: pole-17\ndevice_id: pole-17\n")
    card = tmp_path / "sdcard.img"
    result = invoke("flash", "--image", str(built["image"]), "--device", str(card),
                    "--seed", str(seed))
    assert result.returncode == 0, result.stderr
    assert "read back" in result.stdout
    boot = built["partitions"]["partitions"][0]
    seed_back = subprocess.run(["mtype", "-i", f"{card}@@{boot['start'] * SECTOR}",
                                "::/edgebake-seed.yaml"], capture_output=True, text=True,
                               check=True).stdout
    assert "hostname: pole-17" in seed_back
    bad = tmp_path / "bad.yaml"
    bad.write_text("hostname: Not_Valid\n")
    refused = invoke("flash", "--image", str(built["image"]), "--device",
                     str(tmp_path / "other.img"), "--seed", str(bad))
    assert refused.returncode == 1 and "hostname: expected" in refused.stderr
    assert not (tmp_path / "other.img").exists()


def test_model_variants_are_verified_on_the_target_and_shipped(tmp_path: Path) -> None:
    """recipe `model.variants`: the variant is golden-tested in the target like the model,
    listed in the manifest, and in the root beside the model where the unit looks for it."""
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.model import fetch_locked_model, read_models_lock

    full = fetch_locked_model(read_models_lock()["face_detection_full_range"], Progress(1))
    recipe = tmp_path / "variants.yaml"
    recipe.write_text(f"model:\n  variants: [{full}]\n")
    out = tmp_path / "out"
    result = invoke("build-image", "--target", "pi4", "--recipe", str(recipe), "--out", str(out))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"variant {full.name}" in result.stdout
    assert result.stdout.count("golden cases match") == 2, result.stdout[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    model = manifest["model"]
    assert [v["file"] for v in model["variants"]] == [full.name], model["variants"]
    folder = Path(model["path"]).with_suffix(".variants")
    image = out / manifest["image"]
    table = json.loads(subprocess.run(["sfdisk", "-J", str(image)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    part = table["partitions"][1]
    root = extract(image, Partition(2, part["start"] * SECTOR, part["size"] * SECTOR,
                                    part["type"]), tmp_path / "root.ext4")
    listing = debugfs(root, f"ls -l {folder}")
    assert full.name in listing and f"{full.stem}.card.json" in listing, listing
