"""`invoke bench-build`: a cold build (no cache) against a warm rebuild after an app change."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ..build import BuildOptions, build_image
from ..progress import Progress


def bench_build(target: str, cold: bool, progress: Progress) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgebake-bench-build-") as tmp:
        out = Path(tmp) / "out"
        started = time.monotonic()
        build_image(BuildOptions(target=target, out_dir=out, no_cache=cold))
        first_seconds = time.monotonic() - started
        # change only the app's configuration: the base rootfs must come from the cache
        recipe = Path(tmp) / "app-change.yaml"
        recipe.write_text("app:\n  inference:\n    num_threads: 1\n")
        started = time.monotonic()
        warm = build_image(BuildOptions(target=target, out_dir=out, recipe_file=recipe))
        warm_seconds = time.monotonic() - started
    label = "cold build (--no-cache)" if cold else "first build (cache as found)"
    progress.say(f"{label}: {first_seconds:.0f} s")
    progress.say(f"warm rebuild after an app-only change: {warm_seconds:.0f} s")
    progress.say(f"rebuild ratio warm/first: {warm_seconds / first_seconds:.2f}")
    progress.say(f".img.xz: {warm['image_xz_bytes'] / 2**20:.0f} MiB, rootfs: "
                 f"{warm['rootfs_bytes'] / 2**20:.0f} MiB, .img: "
                 f"{warm['image_bytes'] / 2**20:.0f} MiB")
    return {"first_seconds": first_seconds, "warm_seconds": warm_seconds, "manifest": warm}
