"""The messages between the service and a camera process, both sides' one definition.

They travel over an AF_UNIX SOCK_SEQPACKET pair: one send() is one message, so there is no
framing and no pickling. Results go as finished journal lines, many per message; the
camera's state goes as one typed `CameraStatus`.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass
from typing import Any

STOP = b"stop"  # service -> camera: finish what is inferred and end
READY = b"R"  # camera -> service at start, followed by its pid as text
FAILED = b"E"  # camera -> service at start, followed by why it cannot run, as text
# A message must fit one recv(); the camera keeps each well inside it.
MAX_MESSAGE = 65536
# Finished journal lines, many per message: LINES, a header (how many lines, the process's
# inference errors so far), then per line (captured_at, wall_time, invoke seconds), then the
# lines themselves, each ending in a newline.
LINES = b"L"
LINES_HEADER = struct.Struct("<IQ")
LINE_META = struct.Struct("<ddd")
STATUS = b"S"  # camera -> service: a CameraStatus as JSON
MODEL = b"M"  # service -> camera: load this model (JSON: model, card, version) and switch
DECODE_BESIDE = b"D"  # service -> camera: b"D1" decode in a thread of its own, b"D0" inline
MODEL_DONE = b"m"  # camera -> service: JSON {"error": "" or why the model was refused}
SAMPLES = b"P"  # service -> camera: keep the next N frames as samples (N as text)
# service -> camera: send previews, at most N a second (N as text), for PREVIEW_HOLD_SEC;
# the service repeats it while someone looks at the unit's page
WANT_PREVIEW = b"W"
PREVIEW_HOLD_SEC = 3.0
PREVIEW = b"V"  # camera -> service: a JPEG of the newest decoded frame, results drawn on it


@dataclass(frozen=True)
class CameraStatus:
    """What a camera process says of itself every STATUS_SEC: its source, queue and model.
    Counters count from the process's start; the service turns them into totals."""

    state: str
    frames: int
    fps: float
    last_frame: float  # time.monotonic() of the newest frame, 0 before the first
    corrupt: int
    reconnects: int
    source_error: str
    size: tuple[int, int] | None
    depth: int
    drops: int
    busy_since: float  # when the invoke it is in began, 0 when not in one
    processed: int
    errors: int
    last_error: str
    switch_drops: int
    version: str
    samples: dict[str, Any]  # the sample keeper's counters; empty when samples are off

    def encode(self) -> bytes:
        return STATUS + json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def decode(cls, message: bytes) -> CameraStatus:
        """The status in a STATUS message; ValueError when it is not one."""
        try:
            data: dict[str, Any] = json.loads(message[len(STATUS):])
            size = data["size"]
            return cls(**{**data, "size": (int(size[0]), int(size[1])) if size else None})
        except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed camera status: {exc}") from None


def lines(meta: list[tuple[float, float, float]], text: list[bytes], errors: int) -> bytes:
    return b"".join([LINES, LINES_HEADER.pack(len(meta), errors),
                     *(LINE_META.pack(*m) for m in meta), *text])


def parse_lines(message: bytes) -> tuple[list[tuple[float, float, float]], bytes, int]:
    """(per-line meta, the lines as one block, errors so far); ValueError when malformed."""
    head = len(LINES)
    if len(message) < head + LINES_HEADER.size:
        raise ValueError(f"lines message of {len(message)} bytes is shorter than its header")
    count, errors = LINES_HEADER.unpack_from(message, head)
    start = head + LINES_HEADER.size
    end = start + count * LINE_META.size
    if len(message) < end:
        raise ValueError(f"lines message announces {count} lines but is {len(message)} bytes")
    meta = [LINE_META.unpack_from(message, start + i * LINE_META.size) for i in range(count)]
    block = message[end:]
    found = block.count(b"\n")
    if found != count or (count and not block.endswith(b"\n")):
        raise ValueError(f"lines message announces {count} lines, its text has {found}")
    return meta, block, errors
