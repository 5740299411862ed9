"""Every V4L2 capture device present, by a name that stays the same across reboots and replugs.

udev links each video node under /dev/v4l/by-id (USB cameras, by vendor, model and serial)
and /dev/v4l/by-path (by port). A camera is named after its by-id link when it has one, else
its by-path link, else its /dev/videoN node; the source opens the link, so a camera that
comes back under another /dev/videoN is still the same source. Nodes that cannot capture
video (metadata, output, radio, touch) are left out.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

V4L_DIR = Path("/dev/v4l")
CAP_VIDEO_CAPTURE = 0x00000001
CAP_DEVICE_CAPS = 0x80000000
CAPABILITY_SIZE = 104
VIDIOC_QUERYCAP = (2 << 30) | (CAPABILITY_SIZE << 16) | (ord("V") << 8) | 0
NAME_SUFFIX = re.compile(r"-video-index\d+$")


@dataclass(frozen=True)
class Camera:
    name: str  # stable, safe in file names, metric labels and topics
    device: str  # the link (or node) the source opens
    node: str  # /dev/videoN it points at now


def can_capture(node: str) -> bool:
    """True for a node that captures video (single-planar, what the V4L2 source reads)."""
    try:
        fd = os.open(node, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        buf = bytearray(CAPABILITY_SIZE)
        fcntl.ioctl(fd, VIDIOC_QUERYCAP, buf)
    except OSError:
        return False
    finally:
        os.close(fd)
    capabilities, device_caps = struct.unpack_from("=II", buf, 84)
    caps = device_caps if capabilities & CAP_DEVICE_CAPS else capabilities
    return bool(caps & CAP_VIDEO_CAPTURE)


def safe_name(link: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", NAME_SUFFIX.sub("", link))[:64]


def find_cameras(v4l_dir: Path = V4L_DIR, dev: Path = Path("/dev"),
                 check: Callable[[str], bool] = can_capture) -> list[Camera]:
    """Cameras present now, one per capture node, by-id links first."""
    chosen: dict[str, Camera] = {}
    for kind in ("by-id", "by-path"):
        folder = v4l_dir / kind
        if not folder.is_dir():
            continue
        for link in sorted(folder.iterdir()):
            node = os.path.realpath(link)
            if node in chosen or not NAME_SUFFIX.search(link.name):
                continue
            chosen[node] = Camera(safe_name(link.name), str(link), node)
    for node_path in sorted(dev.glob("video[0-9]*")):
        node = str(node_path)
        chosen.setdefault(node, Camera(node_path.name, node, node))
    return [camera for node, camera in chosen.items() if check(node)]
