"""Per-unit seed files on the boot partition, written with mtools (no mounts, no loop devices)."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..errors import BuildError
from .diskimage import Partition, extract

SEED_NAME = "edgebake-seed.yaml"
CHUNK = 64 * 1024


def render_seed(hostname: str, keys: list[str], app: dict[str, Any] | None = None,
                device_id: str = "", update_keys: list[str] | None = None,
                mqtt_ca: str = "") -> str:
    data: dict[str, Any] = {"hostname": hostname, "ssh_authorized_keys": keys}
    if mqtt_ca:
        data["mqtt_ca"] = mqtt_ca
    if device_id:
        data["device_id"] = device_id
    if update_keys:
        data["update_public_keys"] = update_keys
    if app:
        data["app"] = app
    return "# edgebake per-unit seed, applied once at first boot\n" + yaml.safe_dump(
        data, sort_keys=False)


def put_seed_in_fat(fat_image: Path, seed_text: str | bytes, offset: int = 0) -> None:
    """Copy the seed onto the FAT; bytes go as they are (a test seed may be UTF-16)."""
    put_file_in_fat(fat_image, SEED_NAME,
                    seed_text if isinstance(seed_text, bytes) else seed_text.encode(), offset)


def put_file_in_fat(fat_image: Path, name: str, data: bytes, offset: int = 0) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.write_bytes(data)
        result = subprocess.run(["mcopy", "-o", "-D", "o", "-i", f"{fat_image}@@{offset}",
                                 str(source), f"::/{name}"], capture_output=True, text=True,
                                check=False)
    if result.returncode != 0:
        raise BuildError(f"cannot write {name} with mcopy: {result.stderr.strip()}")


def changed_chunks(before: Path, after: Path) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) where two equally sized files differ, in 64 KiB chunks."""
    ranges: list[tuple[int, int]] = []
    with before.open("rb") as a, after.open("rb") as b:
        offset = 0
        while True:
            x, y = a.read(CHUNK), b.read(CHUNK)
            if not x and not y:
                break
            if x != y:
                if ranges and ranges[-1][0] + ranges[-1][1] == offset:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + len(y))
                else:
                    ranges.append((offset, len(y)))
            offset += len(y)
    return ranges


def seed_overlay(image: Path, overlay: Path, boot: Partition, seed_text: str | bytes | None,
                 also: dict[str, bytes] | None = None) -> int:
    """Write the seed (and the files in `also`) into the qcow2 overlay's boot partition;
    the image is only read. Every call writes the whole set, over what an earlier one wrote.

    mtools edits a raw copy of the boot partition; only the changed 64 KiB chunks are written
    into the overlay with qemu-io. Returns the number of bytes written.
    """
    with tempfile.TemporaryDirectory(prefix="edgebake-seed-") as tmp:
        original = extract(image, boot, Path(tmp) / "boot.orig")
        edited = extract(image, boot, Path(tmp) / "boot.vfat")
        if seed_text is not None:
            put_seed_in_fat(edited, seed_text)
        for name, data in (also or {}).items():
            put_file_in_fat(edited, name, data)
        commands: list[str] = []
        total = 0
        with edited.open("rb") as src:
            for offset, length in changed_chunks(original, edited):
                piece = Path(tmp) / f"chunk-{offset}"
                src.seek(offset)
                piece.write_bytes(src.read(length))
                commands += ["-c", f"write -s {piece} {boot.start + offset} {length}"]
                total += length
        if commands:
            result = subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(overlay)],
                                    capture_output=True, text=True, check=False)
            if result.returncode != 0 or "error" in result.stdout.lower():
                raise BuildError(f"qemu-io could not write the seed into {overlay}: "
                                 f"{(result.stderr or result.stdout).strip()[-300:]}")
    return total
