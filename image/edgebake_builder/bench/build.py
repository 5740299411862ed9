"""`invoke bench-build`: a cold build (no cache) against a warm rebuild after an app change."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ..build import BuildOptions, build_image
from ..progress import Progress
from ..recipe import load_recipe
from ..sizes import largest
from ..steps import basephases
from ..steps.bootstrap import base_tarball

# Raspberry Pi OS Lite (bookworm, arm64) unpacks to about 2.8 GB: boot 512 MiB + root
VENDOR_ROOT_MIB = 2150


def bench_build(target: str, cold: bool, progress: Progress, vendor: bool = False
                ) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgebake-bench-build-") as tmp:
        out = Path(tmp) / "out"
        first_steps: dict[str, float] = {}
        started = time.monotonic()
        first = build_image(BuildOptions(target=target, out_dir=out, no_cache=cold),
                            first_steps)
        first_seconds = time.monotonic() - started
        # change only the app's configuration: the base rootfs must come from the cache
        recipe = Path(tmp) / "app-change.yaml"
        recipe.write_text("app:\n  inference:\n    num_threads: 1\n")
        warm_steps: dict[str, float] = {}
        started = time.monotonic()
        warm = build_image(BuildOptions(target=target, out_dir=out, recipe_file=recipe),
                           warm_steps)
        warm_seconds = time.monotonic() - started
        customised = _vendor_case(Path(tmp), target, progress) if vendor else None
    label = "cold build (--no-cache)" if cold else "first build (cache as found)"
    _steps(progress, label, first_steps)
    tarball = base_tarball(load_recipe(target))
    phases = basephases.load(tarball) if first.get("base_key") else {}
    if phases:
        progress.say(f"  base rootfs (mmdebstrap) phases, when it was made: "
                     f"{basephases.describe(phases)}")
        progress.say("  slowest package configurations under qemu-user: "
                     f"{basephases.describe(basephases.load(tarball, 'slowest_packages'))}")
    _steps(progress, "warm rebuild", warm_steps)
    base_seconds = first_steps.get(_BASE_STEP, 0.0)
    progress.say(f"{'cold' if cold else 'first'} build: {first_seconds:.0f} s "
                 f"(base {base_seconds:.0f} s), rebuild: {warm_seconds:.0f} s, image: "
                 f"{warm['image_compressed_bytes'] / 1e6:.0f} MB compressed, root: "
                 f"{warm['rootfs_bytes'] / 2**20:.0f} MiB")
    progress.say(f"{label}: {first_seconds:.0f} s")
    progress.say(f"warm rebuild after an app-only change: {warm_seconds:.0f} s")
    progress.say(f"rebuild ratio warm/first: {warm_seconds / first_seconds:.2f}")
    progress.say(f"{warm['image_compressed']}: {warm['image_compressed_bytes'] / 2**20:.0f} "
                 f"MiB, rootfs: "
                 f"{warm['rootfs_bytes'] / 2**20:.0f} MiB, .img: "
                 f"{warm['image_bytes'] / 2**20:.0f} MiB")
    progress.say("largest parts of the root:")
    for name, size in largest(warm["sizes"]):
        progress.say(f"  {size / 2**20:7.1f} MiB  {name}")
    if customised is not None:
        base_mb, seconds, image = customised
        progress.say(f"customising a {base_mb / 1000:.1f} GB Raspberry Pi OS look-alike into a "
                     f"{target} image: {seconds:.0f} s, .img {image['image_bytes'] / 2**20:.0f} "
                     f"MiB, compressed {image['image_compressed_bytes'] / 2**20:.0f} MiB")
        progress.say(f"vendor base against our own base: {seconds / first_seconds:.2f} of the "
                     f"{label.split(' (')[0]}, {seconds / warm_seconds:.2f} of the warm rebuild")
    return {"first_seconds": first_seconds, "warm_seconds": warm_seconds, "manifest": warm}


_BASE_STEP = "base rootfs"


def _steps(progress: Progress, label: str, seconds: dict[str, float]) -> None:
    progress.say(f"{label}, by step: " + ", ".join(f"{name} {value:.0f}s"
                                                   for name, value in seconds.items()))


def _vendor_case(tmp: Path, target: str, progress: Progress
                 ) -> tuple[float, float, dict[str, Any]]:
    """(base size in MB, seconds, manifest) of `build-image --base` on a look-alike image."""
    from ..cache import sha256_file
    from ..recipe import load_recipe
    from ..steps.bootstrap import bootstrap_base
    from ..validate.lookalike import make_raspios_lookalike

    base = make_raspios_lookalike(bootstrap_base(load_recipe("pi4"), progress),
                                  tmp / "raspios-lookalike.img", progress,
                                  root_mib=VENDOR_ROOT_MIB)
    digest = sha256_file(base)
    started = time.monotonic()
    image = build_image(BuildOptions(target=target, out_dir=tmp / "vendor-out",
                                     base_image=base, base_sha256=digest))
    return base.stat().st_size / 1e6, time.monotonic() - started, image
