"""`edgebake-usb-update DEV`: model bundles from a USB stick, for a technician with no network.

udev starts `edgebake-usb-update@DEV.service` (root, its own mount namespace) when a USB
partition with a filesystem appears. This mounts it read-only (nosuid, nodev, noexec), copies
each `edgebake/*.ebundle` to /data (so pulling the stick mid-check changes nothing), runs the
checks of `edgebake-update apply` on each, oldest version first, and unmounts. The service
itself stays unprivileged: it sees only the new slot, as after any other update. Results go to
/data/models/audit.log (with `"via": "usb"`) and the journal. Exit 0 unless the stick could
not be read at all.

On an A/B unit a stick's `edgebake/*.raucb` (the newest by the version in its name) is
copied into /data/os/inbox, where root's system updater takes it as from the other ways in
(osinbox): checked by RAUC, installed, rebooted into, on trial.
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
from .config import ConfigError, load_config
from .interp import ModelError
from .osinbox import INBOX, MAX_OS_BUNDLE_BYTES, SUFFIX, hand_over
from .osstate import OsState
from .pull import room_left, save_bundle
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


def copy_system_bundle(source: Path, inbox: Path, keep_free_percent: float) -> str:
    """A stick's system bundle into the inbox: a regular file (no link followed), at most
    MAX_OS_BUNDLE_BYTES, never eating into the journal's free space; then handed over."""
    fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{source.name}: not a regular file")
        if info.st_size > room_left(inbox, keep_free_percent):
            raise ValueError(f"{source.name}: /data has no room for {info.st_size / 2**20:.0f}"
                             f" MiB beside the {keep_free_percent:g} % kept free")
        part = inbox / f".usb-{os.getpid()}.part"
        save_bundle(handle, part, source.name, MAX_OS_BUNDLE_BYTES, keep_free_percent)
    try:
        return hand_over(part, "usb", inbox=inbox, name=source.name)
    finally:
        part.unlink(missing_ok=True)


def system_from(mounted: Path, inbox: Path, keep_free_percent: float, audit: OsState
                ) -> list[str]:
    """The newest `edgebake/*.raucb` on the stick to the system updater; one line."""
    bundles = sorted((mounted / FOLDER).glob(f"*{SUFFIX}"),
                     key=lambda p: (_version_of(p.name), p.name))
    if not bundles:
        return []
    if not inbox.is_dir():
        return [f"{bundles[-1].name}: this unit takes no system updates (not an A/B system)"]
    try:
        line = copy_system_bundle(bundles[-1], inbox, keep_free_percent)
    except (OSError, ValueError) as exc:
        audit.refuse(str(exc), via="usb", bundle=bundles[-1].name)
        line = f"refused: {exc}"
    return [f"{bundles[-1].name}: {line}"]


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
        config = load_config(Path("/etc/edgebake/app.yaml"),
                             Path("/etc/edgebake/seed-overrides.yaml"))
        updates = UnitUpdates.of(config)
        journal_reserve = config.journal.min_free_percent
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
            lines = apply_from(Path(mount_point), updates)
            lines += system_from(Path(mount_point), INBOX, journal_reserve, OsState())
            for line in lines:
                print(f"{device}: {line}", flush=True)
        finally:
            subprocess.run(["umount", mount_point], capture_output=True, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
