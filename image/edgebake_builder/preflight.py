"""Checks the host before any work starts, so a build never fails halfway for a missing tool."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import BuildError

# host command -> Debian package that provides it
BUILD_TOOLS: dict[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "genimage": "genimage",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkdosfs": "dosfstools",
    "mcopy": "mtools",
    "bmaptool": "bmap-tools",
    "xz": "xz-utils",
    "tar": "tar",
    "systemctl": "systemd",
    "systemd-sysusers": "systemd",
    "dpkg-query": "dpkg",
    "sfdisk": "fdisk",
    "chroot": "coreutils",
    "faketime": "faketime",
    "zstd": "zstd",
    "aarch64-linux-gnu-strip": "binutils-aarch64-linux-gnu",
    # recipe refuse_libraries: reading symbols, making the libraries that refuse
    "aarch64-linux-gnu-readelf": "binutils-aarch64-linux-gnu",
    "aarch64-linux-gnu-as": "binutils-aarch64-linux-gnu",
    "aarch64-linux-gnu-ld": "binutils-aarch64-linux-gnu",
}
# what an A/B image adds: the boot script, and the system bundle
AB_TOOLS: dict[str, str] = {"mkimage": "u-boot-tools", "rauc": "rauc",
                            "mksquashfs": "squashfs-tools", "openssl": "openssl"}
# what checking the unit's page and the fleet page in a real browser needs
BROWSER_TOOLS: dict[str, str] = {"chromium": "chromium", "chromedriver": "chromium-driver"}

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_FIX = ("apt-get install qemu-user-static binfmt-support && "
              "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; "
              "update-binfmts --enable qemu-aarch64")


def missing_tools(tools: dict[str, str]) -> dict[str, str]:
    return {cmd: pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None}


def require_tools(tools: dict[str, str] = BUILD_TOOLS) -> None:
    missing = missing_tools(tools)
    if missing:
        packages = " ".join(sorted(set(missing.values())))
        raise BuildError(f"missing host tools: {', '.join(sorted(missing))}; "
                         f"install them with: apt-get install {packages}")


def require_root() -> None:
    if os.geteuid() != 0:
        raise BuildError("building an image needs root (mmdebstrap's root mode, file ownership "
                         "in the rootfs); run it as root, e.g. in a container")


def require_binfmt(arch: str = "aarch64") -> None:
    """The target's maintainer scripts run under qemu-user; the kernel must know to use it."""
    entry = BINFMT_DIR / f"qemu-{arch}"
    if not (BINFMT_DIR / "status").exists():
        raise BuildError(f"binfmt_misc is not mounted, so {arch} programs cannot run; fix: "
                         + BINFMT_FIX)
    try:
        state = entry.read_text()
    except FileNotFoundError:
        raise BuildError(f"binfmt_misc has no qemu-{arch} entry; fix: {BINFMT_FIX}") from None
    if not state.startswith("enabled"):
        raise BuildError(f"binfmt_misc entry qemu-{arch} is disabled; fix: "
                         f"update-binfmts --enable qemu-{arch}")
    if "flags:" in state and "F" not in state.split("flags:")[1].split("\n")[0]:
        raise BuildError(f"binfmt_misc entry qemu-{arch} lacks the F (fix-binary) flag, so it "
                         "fails inside a chroot; install qemu-user-static (not qemu-user)")


def require_disk_space(path: Path, needed_bytes: int) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise BuildError(f"not enough free disk space at {probe}: {free / 2**30:.1f} GiB free, "
                         f"{needed_bytes / 2**30:.1f} GiB needed; free some space or pass "
                         f"--out/--workdir on a larger disk")
