"""Step (vendor bases only): the recipe's Debian packages that the vendor image lacks.

apt runs inside the extracted tree under qemu-user (binfmt), with the base's own sources, so
packages come from the vendor's archive at the versions it pins. Services are not started
(policy-rc.d). Nothing is installed when the base already has every package, so a build from a
complete base needs no network.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..errors import BuildError
from ..progress import Progress
from ..recipe import Recipe
from .rootfs import inside, run_in_target

# packages that only a bootstrapped Debian base wants (the vendor ships its own kernel)
NOT_FOR_VENDOR_BASES = {"linux-image-arm64", "raspi-firmware", "initramfs-tools"}


@contextlib.contextmanager
def _no_service_starts(rootfs: Path) -> Iterator[None]:
    policy = inside(rootfs, "/usr/sbin/policy-rc.d")
    resolv = inside(rootfs, "/etc/resolv.conf")
    saved = resolv.with_name(".resolv.conf.edgebake")
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    had_resolv = resolv.exists() or resolv.is_symlink()
    if had_resolv:
        resolv.rename(saved)
    shutil.copy("/etc/resolv.conf", resolv)
    try:
        yield
    finally:
        policy.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if had_resolv:
            saved.rename(resolv)


def add_missing(recipe: Recipe, rootfs: Path, base_packages: list[str],
                progress: Progress) -> list[str]:
    """Install what the recipe lists and the base lacks; returns the names installed."""
    have = set(base_packages)
    wanted = [p for p in recipe["packages"] if p not in have and p not in NOT_FOR_VENDOR_BASES]
    if not wanted:
        progress.say("      the base has every package the recipe lists")
        return []
    progress.say(f"      adding {len(wanted)} package(s) to the base with apt under qemu-user: "
                 + ", ".join(wanted))
    env_args = ["env", "DEBIAN_FRONTEND=noninteractive"]
    with _no_service_starts(rootfs):
        for argv, what in (
                ([*env_args, "apt-get", "update"], "apt-get update (in the base)"),
                ([*env_args, "apt-get", "install", "-y", "--no-install-recommends", *wanted],
                 "apt-get install (in the base)")):
            result = run_in_target(rootfs, argv, progress, what)
            if result.returncode != 0:
                tail = (result.stdout + result.stderr).strip().splitlines()[-8:]
                raise BuildError(f"{what} failed with exit code {result.returncode}:\n"
                                 + "\n".join(tail) + f"\n(full log: {progress.log_path})")
        run_in_target(rootfs, ["apt-get", "clean"], progress, "apt-get clean")
    return wanted
