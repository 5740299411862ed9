"""`edgebake-usb-update DEV`: model bundles from a USB stick, for a technician with no network.

udev starts `edgebake-usb-update@DEV.service` (root, its own mount namespace) when a USB
partition with a filesystem appears. This mounts it read-only (nosuid, nodev, noexec), copies
each `edgebake/*.ebundle` to /data (so pulling the stick mid-check changes nothing), runs the
checks of `edgebake-update apply` on each, oldest version first, and unmounts. The service
itself stays unprivileged: it sees only the new slot, as after any other update. Results go to
/data/models/audit.log (with `"via": "usb"`) and the journal. Exit 0 unless the stick could
not be read at all.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from .atomic import write_atomic
from .bundle import MAX_BUNDLE_BYTES, BundleError, version_key
from .config import ConfigError
from .interp import ModelError
from .update import UnitUpdates

DEVICE = re.compile(r"sd[a-z]{1,2}[0-9]{0,3}")
MAX_BUNDLES = 16
STICK_FILESYSTEMS = "vfat,exfat"
FOLDER = "edgebake"


def _version_of(name: str) -> tuple[int, ...]:
    """Order bundles by a version in their name when they have one (model-2.1.ebundle)."""
    found = re.findall(r"[0-9]+(?:\.[0-9]+)*", name)
    try:
        return version_key(found[-1]) if found else (0,)
    except BundleError:
        return (0,)


def copy_from_stick(source: Path, folder: Path) -> Path:
    """A regular file on the stick (a link is not followed), at most MAX_BUNDLE_BYTES, copied
    into `folder`, which only root can write: nothing the service owns is written by root."""
    info = os.lstat(source)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{source.name}: not a regular file")
    if info.st_size > MAX_BUNDLE_BYTES:
        raise ValueError(f"{source.name}: {info.st_size} bytes (limit {MAX_BUNDLE_BYTES})")
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_BUNDLE_BYTES + 1)
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"{source.name}: more than {MAX_BUNDLE_BYTES} bytes")
    local = Path(tempfile.mkstemp(suffix=".ebundle", dir=folder)[1])
    write_atomic(local, data, 0o600)
    return local


def apply_from(mounted: Path, updates: UnitUpdates) -> list[str]:
    """Every bundle on the stick through the full checks; one line per bundle."""
    store = updates.store
    folder = mounted / FOLDER
    bundles = sorted(folder.glob("*.ebundle"),
                     key=lambda p: (_version_of(p.name), p.name))[:MAX_BUNDLES]
    if not bundles:
        store.audit("usb: nothing to do", via="usb", looked_in=str(folder))
        return [f"no {FOLDER}/*.ebundle on the stick"]
    lines = []
    with tempfile.TemporaryDirectory(prefix="edgebake-usb-copy-") as private:
        for bundle in bundles:
            try:
                line = updates.apply(copy_from_stick(bundle, Path(private)))
            except (BundleError, ModelError, OSError, ValueError) as exc:
                store.audit("refused", via="usb", bundle=bundle.name, reason=str(exc))
                line = f"refused: {exc}"
            lines.append(f"{bundle.name}: {line}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not DEVICE.fullmatch(args[0]):
        print("usage: edgebake-usb-update sdXN (a USB block device name)", file=sys.stderr)
        return 2
    device = f"/dev/{args[0]}"
    try:
        updates = UnitUpdates.load(Path("/etc/edgebake/app.yaml"),
                                   Path("/etc/edgebake/seed-overrides.yaml"))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    store = updates.store
    with tempfile.TemporaryDirectory(prefix="edgebake-usb-") as mount_point:
        # only the filesystems a stick needs: the kernel parses nothing else a stick offers
        mounted = subprocess.run(["mount", "-t", STICK_FILESYSTEMS, "-o",
                                  "ro,nosuid,nodev,noexec", device, mount_point],
                                 capture_output=True, text=True, check=False)
        if mounted.returncode != 0:
            store.audit("usb: cannot mount", via="usb", device=device,
                        reason=mounted.stderr.strip()[-200:])
            print(f"{device}: cannot mount: {mounted.stderr.strip()}", file=sys.stderr)
            return 1
        store.audit("usb: stick mounted", via="usb", device=device)
        try:
            for line in apply_from(Path(mount_point), updates):
                print(f"{device}: {line}", flush=True)
        finally:
            subprocess.run(["umount", mount_point], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
