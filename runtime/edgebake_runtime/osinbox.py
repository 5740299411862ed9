"""The hand-over of a system bundle from whoever fetched it to root, who installs it.

The service (not root) pulls bundles over HTTP and takes MQTT orders; the USB helper reads
sticks. None of them installs: each puts the whole bundle into /data/os/inbox under a temp
name, writes a small note beside it (how it came, the order's number, the trial window), and
renames it to `*.raucb`. A systemd path unit then starts `edgebake-os take` (root), which moves
the bundle out of the service's reach and runs the one install path `push-os` uses too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic

INBOX = Path("/data/os/inbox")
SUFFIX = ".raucb"
# A bundle is the root filesystem compressed; it never exceeds the slot it goes into.
MAX_OS_BUNDLE_BYTES = 2 * 2**30
MAX_NOTE_BYTES = 4096
WAYS_IN = ("pull", "mqtt", "usb")
MAX_WINDOW_SEC = 86400
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def hand_over(bundle: Path, via: str, window_sec: float | None = None, seq: int = 0,
              inbox: Path = INBOX, name: str = "") -> str:
    """Move a complete bundle (on /data, so a rename) into the inbox, note first; `name` is
    what the bundle was called where it came from (a stick's file name)."""
    stamp = f"{via}-{time.time_ns()}"
    note: dict[str, Any] = {"via": via, "seq": seq, "size": bundle.stat().st_size,
                            "name": name}
    if window_sec is not None:
        note["window_sec"] = int(window_sec)
    write_atomic(inbox / f"{stamp}.json", json.dumps(note).encode(), 0o644)
    os.replace(bundle, inbox / f"{stamp}{SUFFIX}")
    return (f"system bundle handed to the system updater ({note['size'] / 2**20:.0f} MiB); "
            "it installs, reboots and reports in /health `system.update`")


def read_note(bundle: Path) -> dict[str, Any]:
    """The note beside a bundle, checked field by field (the service wrote it: trust nothing
    in it beyond these values); missing or bad fields take their defaults."""
    note: dict[str, Any] = {"via": "inbox", "seq": 0, "window_sec": None, "name": bundle.name}
    try:  # never a link, a FIFO or a device: only a plain file is read
        fd = os.open(bundle.with_suffix(".json"),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return note
            data = json.loads(handle.read(MAX_NOTE_BYTES))
    except (OSError, ValueError):
        return note
    if not isinstance(data, dict):
        return note
    if data.get("via") in WAYS_IN:
        note["via"] = data["via"]
    seq = data.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0:
        note["seq"] = seq
    if isinstance(data.get("name"), str) and NAME.fullmatch(data["name"]):
        note["name"] = data["name"]
    window = data.get("window_sec")
    if isinstance(window, int) and not isinstance(window, bool) and \
            0 <= window <= MAX_WINDOW_SEC:
        note["window_sec"] = window
    return note


def waiting(inbox: Path = INBOX) -> list[Path]:
    """Bundles in the inbox, oldest first (by the time in their names)."""
    found = []
    for path in inbox.glob(f"*{SUFFIX}"):
        with contextlib.suppress(OSError):  # gone meanwhile; a link is not followed
            found.append((path.lstat().st_mtime, path.name, path))
    return [path for _, _, path in sorted(found)]
