"""The A/B boot script in real U-Boot (Debian's qemu_arm64 build under QEMU), on a small disk
with the image's partition layout: which slot it picks, how it counts tries, what it writes
back, and how it falls back. No kernel boots here; the console says what U-Boot did."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
from edgebake_builder.recipe import load_recipe
from edgebake_builder.steps import abboot
from edgebake_builder.validate.qemu import UBOOT_QEMU

pytestmark = pytest.mark.skipif(
    not Path(UBOOT_QEMU).is_file() or shutil.which("qemu-system-aarch64") is None
    or shutil.which("mkimage") is None, reason="needs u-boot-qemu, u-boot-tools and QEMU "
    "(bash .ci/bootstrap installs them)")

MIB = 2**20


def make_disk(tmp: Path, state: dict[str, str], kernel_in: str = "") -> Path:
    """boot (FAT: boot.scr, boot-state.env), root A, root B, data; `kernel_in` names the slot
    whose /boot/vmlinuz is a file (not a kernel: U-Boot's booti refuses it)."""
    boot = tmp / "boot"
    boot.mkdir()
    (boot / "boot.cmd").write_text(abboot.boot_script(load_recipe("pi4")))
    subprocess.run(["mkimage", "-A", "arm64", "-O", "linux", "-T", "script", "-C", "none",
                    "-d", str(boot / "boot.cmd"), str(boot / "boot.scr")], check=True,
                   capture_output=True)
    (boot / abboot.STATE_FILE).write_bytes(abboot.state_env(state))
    fat = tmp / "boot.vfat"
    subprocess.run(["mkdosfs", "-F", "32", "-C", str(fat), str(64 * 1024)], check=True,
                   capture_output=True)
    subprocess.run(["mcopy", "-i", str(fat), str(boot / "boot.scr"),
                    str(boot / abboot.STATE_FILE), "::/"], check=True)
    parts = [fat]
    for slot in ("A", "B", "data"):
        tree = tmp / f"tree-{slot}"
        (tree / "boot").mkdir(parents=True)
        if slot == kernel_in:
            (tree / "boot" / "vmlinuz").write_bytes(b"not a kernel" * 100)
            (tree / "boot" / "initrd.img").write_bytes(b"not an initrd")
        fs = tmp / f"{slot}.ext4"
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(fs), "8M"],
                       check=True)
        parts.append(fs)
    disk = tmp / "disk.img"
    offsets = []
    at = MIB
    with disk.open("wb") as out:
        for part in parts:
            offsets.append(at)
            out.seek(at)
            out.write(part.read_bytes())
            at += part.stat().st_size
        out.truncate(at + MIB)
    rows = enumerate(zip(offsets, parts, strict=True))
    table = "label: dos\n" + "".join(
        f"start={o // 512}, size={p.stat().st_size // 512}, type={'c' if i == 0 else '83'}"
        f"{', bootable' if i == 0 else ''}\n" for i, (o, p) in rows)
    subprocess.run(["sfdisk", "-q", str(disk)], input=table, text=True, check=True)
    return disk


def boot_once(disk: Path, console: Path, timeout: float = 300) -> str:
    """One power-on: U-Boot runs the script; its `reset` ends QEMU (-no-reboot), so every
    write the script made is complete when this returns. The console text of this boot."""
    console.unlink(missing_ok=True)
    try:
        subprocess.run(["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-m", "256",
                        "-no-reboot", "-bios", UBOOT_QEMU, "-drive",
                        f"if=none,file={disk},format=raw,id=hd0",
                        "-device", "virtio-blk-pci,drive=hd0", "-display", "none",
                        "-monitor", "none", "-nodefaults", "-serial", f"file:{console}"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
                       check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError("U-Boot did not reset within the bound; console:\n"
                             + console.read_text(errors="replace")[-3000:]) from None
    return console.read_text(errors="replace")


def read_state(disk: Path) -> dict[str, str]:
    fat_offset = MIB
    data = subprocess.run(["mtype", "-i", f"{disk}@@{fat_offset}", f"::/{abboot.STATE_FILE}"],
                          capture_output=True, check=True).stdout
    assert zlib.crc32(data[4:]) == int.from_bytes(data[:4], "little"), "CRC broken"
    return dict(x.split("=", 1) for x in data[4:].split(b"\0\0")[0].decode().split("\0"))


def test_slots_are_tried_in_order_and_each_boot_uses_a_try(tmp_path: Path) -> None:
    """B first (as RAUC leaves it after an install); neither slot has a kernel that boots
    here, so each boot spends the slot it picked, and the next boot takes the other."""
    disk = make_disk(tmp_path, {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"},
                     kernel_in="B")
    console = tmp_path / "console.log"
    first = boot_once(disk, console)
    assert "edgebake: booting slot B (tries left: A 3, B 2)" in first
    assert "Bad Linux ARM64 Image magic" in first  # booti refused B's kernel...
    assert "edgebake: slot B has no kernel that boots; it gets no more tries" in first
    assert read_state(disk) == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "0"}
    second = boot_once(disk, console)  # ...so the next power-on falls back to A
    assert "edgebake: booting slot A (tries left: A 2, B 0)" in second
    assert read_state(disk)["BOOT_A_LEFT"] == "0"
    third = boot_once(disk, console)  # nothing left: both get their tries back
    assert "edgebake: no slot has tries left; both get 3 again" in third
    assert read_state(disk) == {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}


def test_a_slot_out_of_tries_is_passed_over(tmp_path: Path) -> None:
    disk = make_disk(tmp_path, {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "2"})
    text = boot_once(disk, tmp_path / "console.log")
    assert "edgebake: booting slot B (tries left: A 0, B 1)" in text
    assert "booting slot A" not in text


def test_a_corrupt_state_file_boots_slot_a(tmp_path: Path) -> None:
    """A cut during U-Boot's own write of the file (its CRC no longer matches): the
    defaults, slot A with 3 tries, as on a new card."""
    disk = make_disk(tmp_path, {"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"})
    subprocess.run(["mcopy", "-o", "-i", f"{disk}@@{MIB}", "-", f"::/{abboot.STATE_FILE}"],
                   input=b"\xff" * 0x4000, check=True)
    text = boot_once(disk, tmp_path / "console.log")
    assert "edgebake: booting slot A (tries left: A 2, B 0)" in text
