"""Grow the data partition and its ext4 filesystem to fill the card (MBR, last partition).

Runs at every boot as root before the service: when the partition already ends at the end of
the disk it does nothing, so an interrupted run simply finishes on the next boot. The MBR
entry is one sector, written in one go by sfdisk; ext4 grows online with its own journal.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DATA = "/data"
ALIGN_SECTORS = 2048  # 1 MiB: what is left at the end of a card is not worth a resize
SETTLE_SEC = 60  # udev's events for the changed partition are waited for this long at most
LOCK_WAIT_SEC = 60  # a disk udev keeps busy this long is left as it is until the next boot


@dataclass(frozen=True)
class Plan:
    disk: str
    number: int
    device: str
    start: int
    size: int
    disk_sectors: int

    @property
    def spare(self) -> int:
        return self.disk_sectors - (self.start + self.size)


def _run(cmd: list[str], stdin: str | None = None) -> str:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                          check=True).stdout.strip()


def plan(mount_point: str = DATA) -> Plan:
    """The partition that is mounted on /data (fstab finds it by this image's own PARTUUID,
    never by a label that a stick could carry too)."""
    device = _run(["findmnt", "-nvo", "SOURCE", mount_point])
    disk = "/dev/" + _run(["lsblk", "-ndo", "PKNAME", device])
    number = int(Path(f"/sys/class/block/{Path(device).name}/partition").read_text())
    table = json.loads(_run(["sfdisk", "-J", disk]))["partitiontable"]
    entry = next(p for p in table["partitions"] if p["node"] == device)
    sectors = int(Path(f"/sys/class/block/{Path(disk).name}/size").read_text())
    if table.get("label") != "dos":
        raise RuntimeError(f"{disk}: expected an MBR (dos) partition table")
    last = max(int(p["start"]) + int(p["size"]) for p in table["partitions"])
    if last != int(entry["start"]) + int(entry["size"]):
        raise RuntimeError(f"{device} is not the last partition on {disk}")
    return Plan(disk, number, device, int(entry["start"]), int(entry["size"]), sectors)


class DiskBusy(RuntimeError):
    """Something held the card longer than LOCK_WAIT_SEC: growing waits for the next boot."""


@contextmanager
def whole_disk_locked(disk: str) -> Iterator[None]:
    """Keep udev off the card while its table and /data's superblock change. udev takes a
    shared BSD lock on the whole disk before it probes the disk or a partition, and puts the
    event back while someone holds an exclusive one (systemd's block device locking). Without
    it, a probe raised by sfdisk's or resize2fs's close read the superblock while resize2fs
    rewrote it, lost the partition's PARTUUID for a moment, and systemd then stopped /data
    and everything that needs it (seen at a QEMU unit's first boot on a loaded host)."""
    fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + LOCK_WAIT_SEC
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DiskBusy(f"{disk} stayed locked for {LOCK_WAIT_SEC} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # the lock goes with the descriptor; udev then probes what changed


def settle() -> None:
    """Wait for the probes udev put off while the disk was locked, so that the service
    starts with /data's links in place."""
    subprocess.run(["udevadm", "settle", f"--timeout={SETTLE_SEC}"], capture_output=True,
                   check=False)  # a slow udev is waited for this long, then the boot goes on


def grow(p: Plan) -> str:
    with whole_disk_locked(p.disk):
        if p.spare >= ALIGN_SECTORS:
            # ", +" keeps the start and takes all free space after it
            _run(["sfdisk", "--no-reread", "--no-tell-kernel", "-N", str(p.number), p.disk],
                 stdin=", +\n")
            _run(["partx", "-u", "--nr", str(p.number), p.disk])
        _run(["resize2fs", p.device])
    settle()
    return (f"{p.device}: {p.size * 512 / 2**20:.0f} MiB -> "
            f"{(p.disk_sectors - p.start) * 512 / 2**20:.0f} MiB")


def main() -> int:
    try:
        current = plan()
        if current.spare < ALIGN_SECTORS:
            print(f"{current.device} already fills {current.disk}", flush=True)
            grow(current)  # finishes a run cut short after sfdisk (resize2fs only)
            return 0
        print("data partition grown: " + grow(current), flush=True)
    except (subprocess.CalledProcessError, RuntimeError, OSError, StopIteration,
            ValueError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        print(f"data partition not grown: {str(detail).strip()[:300]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
