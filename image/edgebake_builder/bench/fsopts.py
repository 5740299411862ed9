"""`invoke bench-fsopts`: what the data partition's mount options cost, measured.

The unit's write pattern runs unchanged on a fresh ext4 made like the image's data partition
(the results journal appending records and fsyncing once a second, plus a durable cursor
file replaced once a second, as the MQTT sender does), once per set of mount options. The
kernel's own count of sectors written to the block device gives the write amplification, the
number that wears an SD card; fsync latencies are timed around each sync.

It needs a loop device (root on a host, not in every container): it is a bench, not a step of
the build.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgebake_runtime.atomic import write_atomic
from edgebake_runtime.journal import Journal

from ..errors import BuildError

# name: (mount options, the journal's fsync interval in seconds)
CASES = {"data=ordered, fsync 1 s": ("noatime,data=ordered,commit=5", 1.0),
         "data=journal, fsync 1 s": ("noatime,data=journal,commit=5", 1.0),
         "data=journal, fsync 5 s": ("noatime,data=journal,commit=5", 5.0)}
FS_MIB = 256
MKFS = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-i", "16384", "-m", "1"]


@dataclass
class Measured:
    options: str
    logical_bytes: int
    device_bytes: int
    fsync_ms: list[float]

    @property
    def amplification(self) -> float:
        return self.device_bytes / max(self.logical_bytes, 1)


def _written_sectors(device: str) -> int:
    fields = Path(f"/sys/block/{Path(device).name}/stat").read_text().split()
    return int(fields[6])


@contextlib.contextmanager
def _mounted(folder: Path, options: str) -> Iterator[tuple[Path, str]]:
    backing = folder / "data.ext4"
    with backing.open("wb") as f:
        f.truncate(FS_MIB << 20)
    subprocess.run([*MKFS, str(backing)], check=True)
    attached = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                              text=True, check=False)
    if attached.returncode != 0:
        raise BuildError(f"bench-fsopts needs a loop device: {attached.stderr.strip()}")
    device = attached.stdout.strip()
    mount_point = folder / "mnt"
    mount_point.mkdir()
    try:
        subprocess.run(["mount", "-o", options, device, str(mount_point)], check=True)
        try:
            yield mount_point, device
        finally:
            subprocess.run(["umount", str(mount_point)], check=False)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def measure(options: str, fsync_sec: float, seconds: float, rate: float) -> Measured:
    """Feed `rate` records a second for `seconds`, the way the service writes them."""
    with tempfile.TemporaryDirectory(prefix="edgebake-fsopts-") as tmp, \
            _mounted(Path(tmp), options) as (mount_point, device):
        subprocess.run(["sync"], check=True)
        before = _written_sectors(device)
        journal = Journal(mount_point / "results", fsync_interval_sec=fsync_sec)
        journal.open()
        cursor = mount_point / "results" / ".mqtt-cursor"
        fsync_ms: list[float] = []
        started = time.monotonic()
        sent = 0
        next_second = started + 1.0
        while (now := time.monotonic()) - started < seconds:
            due = int((now - started) * rate)
            for _ in range(due - sent):
                journal.append({"seq": sent, "ts": time.time(), "source": "cam0",
                                "model": "default", "detections": [
                                    {"label": "face", "score": 0.91,
                                     "box": [0.12, 0.2, 0.31, 0.44]}]})
                sent += 1
            if now >= next_second:  # the service's once-a-second housekeeping
                began = time.monotonic()
                journal.sync_if_due()
                write_atomic(cursor, f'{{"file": "x", "offset": {sent}}}\n'.encode())
                fsync_ms.append((time.monotonic() - began) * 1000)
                next_second += fsync_sec
            time.sleep(0.002)
        journal.close()
        logical = journal.bytes_written + len(fsync_ms) * 40
        subprocess.run(["sync"], check=True)
        time.sleep(6)  # past commit=5, so the last transaction is on the device
        device_bytes = (_written_sectors(device) - before) * 512
    return Measured(options, logical, device_bytes, fsync_ms)


def run_bench(seconds: float, rate: float) -> list[Measured]:
    return [measure(options, fsync_sec, seconds, rate) for options, fsync_sec in CASES.values()]


def report(results: list[Measured]) -> list[str]:
    lines = []
    for name, measured in zip(CASES, results, strict=True):
        ms = sorted(measured.fsync_ms)
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
        lines.append(f"{name}: {measured.logical_bytes / 1e6:.2f} MB of records -> "
                     f"{measured.device_bytes / 1e6:.2f} MB to the device (amplification "
                     f"{measured.amplification:.2f}), sync+cursor p50 "
                     f"{statistics.median(ms):.2f} ms p99 {p99:.2f} ms")
    ordered, journalled, slower = results
    lines.append(f"device writes ratio data=journal/data=ordered: "
                 f"{journalled.device_bytes / max(ordered.device_bytes, 1):.2f}")
    lines.append(f"device writes ratio fsync 5 s/fsync 1 s: "
                 f"{slower.device_bytes / max(journalled.device_bytes, 1):.2f}")
    return lines
