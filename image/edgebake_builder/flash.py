"""`invoke flash`: write an image with bmaptool, add the unit's seed, and read both back."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from edgebake_runtime.config import ConfigError, read_yaml_mapping
from edgebake_runtime.firstboot import SeedError, check_seed

from .errors import BuildError
from .validate import diskimage
from .validate.seed import SEED_NAME, put_seed_in_fat


def validate_seed_file(seed: Path) -> str:
    """Check a seed on the host with the same rules the unit applies at first boot."""
    try:
        check_seed(read_yaml_mapping(seed), str(seed), Path("/nonexistent/app.yaml"))
    except (SeedError, ConfigError) as exc:
        raise BuildError(str(exc)) from None
    return seed.read_text()


def flash(image: Path, device: Path, seed: Path | None) -> str:
    bmap = image.with_name(image.name + ".bmap")
    if not image.is_file():
        raise BuildError(f"{image}: image not found")
    if not bmap.is_file():
        raise BuildError(f"{bmap}: block map not found (it is made next to the image)")
    seed_text = validate_seed_file(seed) if seed is not None else None
    if device.is_block_device() and _is_mounted(device):
        raise BuildError(f"{device}: is mounted; unmount its partitions first")
    result = subprocess.run(["bmaptool", "copy", "--bmap", str(bmap), str(image), str(device)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"bmaptool copy failed: {result.stderr.strip()[-400:]}")
    if seed is None or seed_text is None:
        return f"wrote {image.name} to {device} (verified by bmaptool); no seed"
    boot = diskimage.boot_partition(device)
    put_seed_in_fat(device, seed_text, offset=boot.start)
    os.sync()
    back = diskimage.read_fat_file(device, boot, SEED_NAME).decode()
    if back != seed_text:
        raise BuildError(f"{device}: the seed read back differs from {seed}; the card may be bad")
    return (f"wrote {image.name} to {device} (verified by bmaptool) with seed {seed.name} "
            "(read back)")


def _is_mounted(device: Path) -> bool:
    real = str(device.resolve())
    with open("/proc/mounts") as mounts:
        return any(line.split()[0].startswith(real) for line in mounts)
