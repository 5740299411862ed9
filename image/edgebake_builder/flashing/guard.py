"""Which block devices may be overwritten: never the system's own disk, never one in use.

A wrong /dev/sdX wipes a laptop. A prefix match against /proc/mounts misses LVM, md, LUKS
and ZFS members, so the whole device tree from lsblk is checked instead.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError

IN_USE_FSTYPES = {"LVM2_member": "an LVM physical volume", "linux_raid_member": "an md RAID member",
                  "crypto_LUKS": "a LUKS container", "zfs_member": "a ZFS pool member",
                  "swap": "swap space"}


@dataclass(frozen=True)
class Disk:
    path: str
    model: str
    size: int
    removable: bool

    def describe(self) -> str:
        return (f"{self.path}: {self.model or 'unknown model'}, {self.size / 1e9:.1f} GB, "
                f"{'removable' if self.removable else 'NOT removable'}")


def _lsblk(*args: str) -> dict[str, Any]:
    result = subprocess.run(["lsblk", "-J", "-b", "-o",
                             "NAME,PATH,TYPE,RM,HOTPLUG,SIZE,MODEL,MOUNTPOINTS,FSTYPE,PKNAME",
                             *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"lsblk {' '.join(args)}: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("children", []) for n in _walk(child))]


def system_disks() -> set[str]:
    """The disks under / (through LVM, md or LUKS): lsblk's inverse tree of /'s source."""
    source = subprocess.run(["findmnt", "-nvo", "SOURCE", "/"], capture_output=True, text=True,
                            check=False).stdout.strip()
    if not source.startswith("/dev/"):
        return set()
    tree = _lsblk("-s", source)
    return {n["path"] for d in tree["blockdevices"] for n in _walk(d) if n["type"] == "disk"}


def check_device(device: Path, force: bool) -> Disk:
    """Refuse the system disk, mounted or member devices, and (without force) fixed disks."""
    path = str(device.resolve())
    top = _lsblk(path)["blockdevices"][0]
    if top["type"] not in ("disk", "loop"):
        raise BuildError(f"{device}: is a {top['type']}, not a whole disk; give the disk "
                         f"(like /dev/sdb, not /dev/sdb1)")
    if path in system_disks():
        raise BuildError(f"{device}: holds this machine's root filesystem; refusing")
    for node in _walk(top):
        mounts = [m for m in node.get("mountpoints") or [] if m]
        if mounts:
            raise BuildError(f"{device}: {node['path']} is mounted on {', '.join(mounts)}; "
                             "unmount it first")
        role = IN_USE_FSTYPES.get(node.get("fstype") or "")
        if role:
            raise BuildError(f"{device}: {node['path']} is {role}; refusing")
    # removable media only: a hot-pluggable USB hard disk is not removable, and is refused
    # without --force like any fixed disk
    disk = Disk(path, str(top.get("model") or "").strip(), int(top["size"]), bool(top.get("rm")))
    if not disk.removable and not force:
        raise BuildError(f"{disk.describe()}; an SD card reader is removable. Use --force "
                         "if this really is the card")
    return disk
