"""Reads a disk image in place: its partition table, and files on its FAT and ext4 partitions."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError

SECTOR = 512


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str


def partitions(image: Path) -> list[Partition]:
    """The MBR partitions; a clear error for a path that is not a partitioned disk image."""
    if not image.is_file() and not image.is_block_device():
        raise BuildError(f"{image}: image not found")
    result = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0 or not result.stdout.strip():
        raise BuildError(f"{image}: not a disk image (no partition table)")
    table = json.loads(result.stdout)["partitiontable"]
    parts = [Partition(i + 1, int(p["start"]) * SECTOR, int(p["size"]) * SECTOR,
                       str(p["type"])) for i, p in enumerate(table.get("partitions", []))]
    return parts


def boot_partition(image: Path) -> Partition:
    parts = partitions(image)
    fat = [p for p in parts if p.type.lower() in ("c", "b", "e", "6")]
    if not fat:
        raise BuildError(f"{image}: has no FAT boot partition")
    return fat[0]


def root_partition(image: Path) -> Partition:
    parts = [p for p in partitions(image) if p.type == "83"]
    if not parts:
        raise BuildError(f"{image}: has no Linux root partition")
    return parts[0]


def fat_target(image: Path, part: Partition) -> str:
    """mtools' notation for a FAT filesystem at an offset inside an image file."""
    return f"{image}@@{part.start}"


def read_fat_file(image: Path, part: Partition, name: str) -> bytes:
    result = subprocess.run(["mtype", "-i", fat_target(image, part), f"::/{name}"],
                            capture_output=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{image}: boot partition has no {name}")
    return result.stdout


def has_fat_file(image: Path, part: Partition, name: str) -> bool:
    result = subprocess.run(["mdir", "-b", "-i", fat_target(image, part), f"::/{name}"],
                            capture_output=True, check=False)
    return result.returncode == 0


def copy_fat_file(image: Path, part: Partition, name: str, dest: Path) -> Path:
    result = subprocess.run(["mcopy", "-o", "-i", fat_target(image, part), f"::/{name}",
                             str(dest)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{image}: cannot read {name} from the boot partition: "
                         f"{result.stderr.strip()}")
    return dest


def extract(image: Path, part: Partition, dest: Path) -> Path:
    """Copy one partition out of the image (sparse-friendly chunked copy)."""
    with image.open("rb") as src, dest.open("wb") as dst:
        src.seek(part.start)
        remaining = part.size
        while remaining:
            chunk = src.read(min(remaining, 1 << 22))
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                dst.seek(len(chunk), 1)
            else:
                dst.write(chunk)
            remaining -= len(chunk)
        dst.truncate(part.size)
    return dest


def kernel_and_initrd_names(image: Path, part: Partition) -> tuple[str, str]:
    """What the Pi firmware boots on a Pi 4, from config.txt: `kernel=` and `initramfs` lines
    (Debian's raspi-firmware), or the 64-bit defaults `kernel8.img` with `initramfs8` under
    `auto_initramfs=1` (Raspberry Pi OS)."""
    kernel, initrd, auto, applies = "", "", False, True
    for line in read_fat_file(image, part, "config.txt").decode().splitlines():
        line = line.strip()
        if line.startswith("["):  # only the sections a Pi 4 reads
            applies = line in ("[all]", "[pi4]")
            continue
        if not applies:
            continue
        if line.startswith("kernel="):
            kernel = line.split("=", 1)[1].strip()
        elif line.startswith("initramfs "):
            initrd = line.split()[1]
        elif line.replace(" ", "") == "auto_initramfs=1":
            auto = True
    kernel = kernel or "kernel8.img"
    if not initrd and auto:
        initrd = "initramfs8" if kernel == "kernel8.img" else kernel.replace("kernel", "initramfs")
    if not initrd:
        raise BuildError(f"{image}: config.txt names no initramfs (nor auto_initramfs=1)")
    return kernel, initrd
