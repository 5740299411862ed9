"""Write one card: bmaptool, the unit's seed on the boot partition, and a read-back that
comes from the card, not from the page cache."""

from __future__ import annotations

import fcntl
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from edgebake_runtime.config import ConfigError, read_yaml_mapping
from edgebake_runtime.seedcheck import SeedError, check_seed
from edgebake_runtime.yamlfile import TextFileError, decode_text

from ..errors import BuildError
from ..validate import diskimage
from ..validate.seed import SEED_NAME, put_seed_in_fat
from .guard import check_device

BLKFLSBUF = 0x1261  # <linux/fs.h>: write back and drop the device's cached blocks


def validate_seed_file(seed: Path) -> str:
    """Check a seed on the host with the same rules the unit applies at first boot; returns
    its text, read in any encoding first boot reads (it goes onto the card as UTF-8)."""
    try:
        check_seed(read_yaml_mapping(seed), str(seed), Path("/nonexistent/app.yaml"))
        return decode_text(seed.read_bytes(), seed)
    except (SeedError, ConfigError, TextFileError) as exc:
        raise BuildError(str(exc)) from None


def drop_cache(device: Path) -> None:
    """After this, reads of a block device come from the device itself."""
    if not device.is_block_device():
        os.sync()
        return
    fd = os.open(device, os.O_RDONLY)
    try:
        os.fsync(fd)
        fcntl.ioctl(fd, BLKFLSBUF, 0)
    finally:
        os.close(fd)


Confirm = Callable[[str], bool]


def flash(image: Path, device: Path, seed: Path | None, *, seed_text: str | None = None,
          force: bool = False, confirm: Confirm | None = None) -> str:
    """Write `image` (and a seed) to `device`; `confirm` is asked before a disk is touched."""
    # the block map of edgebake-pi4.img serves its .zst and .xz copies too (bmaptool unpacks)
    bmap = image.with_name(image.name.removesuffix(".zst").removesuffix(".xz") + ".bmap")
    if not image.is_file():
        raise BuildError(f"{image}: image not found")
    if not bmap.is_file():
        raise BuildError(f"{bmap}: block map not found (it is made next to the image)")
    if seed is not None and seed_text is None:
        seed_text = validate_seed_file(seed)
    if device.is_block_device():
        disk = check_device(device, force)
        if confirm is not None and not confirm(f"write {image.name} "
                                               f"({image.stat().st_size / 1e9:.1f} GB) to "
                                               f"{disk.describe()}?"):
            raise BuildError(f"{device}: not written (not confirmed)")
    elif str(device).startswith("/dev/"):
        # bmaptool would write a regular file into /dev and the log would say "flashed"
        raise BuildError(f"{device}: no such block device; is the card inserted?")
    elif device.exists() and not device.is_file():
        raise BuildError(f"{device}: neither a block device nor an image file")
    result = subprocess.run(["bmaptool", "copy", "--bmap", str(bmap), str(image), str(device)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"bmaptool copy failed: {result.stderr.strip()[-400:]}")
    if seed_text is None:
        return f"wrote {image.name} to {device} (verified by bmaptool); no seed"
    boot = diskimage.boot_partition(device)
    put_seed_in_fat(device, seed_text, offset=boot.start)
    drop_cache(device)
    back = diskimage.read_fat_file(device, boot, SEED_NAME).decode()
    if back != seed_text:
        raise BuildError(f"{device}: the seed read back differs from what was written; the "
                         "card may be bad")
    return (f"wrote {image.name} to {device} (verified by bmaptool) with seed "
            f"{seed.name if seed else 'from the units file'} (read back from the device)")
