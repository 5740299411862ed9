"""The few fixed-size messages between the service and a worker process.

They travel over an AF_UNIX SOCK_SEQPACKET pair: one send() is one message, so there is no
framing and no pickling, and a frame costs each side one small send and one recv. The
result itself goes back as JSON text, which the service puts into the journal line as it is.
"""

from __future__ import annotations

import struct

# request: slot, token, whether a placement follows, then scale_x, scale_y, offset_x, offset_y
REQUEST = struct.Struct("<iqBdddd")
# reply header: slot, token, invoke seconds, 0 for a result (JSON follows) or 1 for an error
REPLY = struct.Struct("<iqdB")
STOP = b"stop"
READY = b"R"  # followed by the worker's pid as text
FAILED = b"E"  # followed by why, as text
# A reply must fit one recv(); a result larger than this is an error, not a truncated line.
MAX_MESSAGE = 65536
OK, ERROR = 0, 1


def request(slot: int, token: int, place: tuple[float, float, float, float] | None) -> bytes:
    if place is None:
        return REQUEST.pack(slot, token, 0, 1.0, 1.0, 0.0, 0.0)
    return REQUEST.pack(slot, token, 1, *place)


def reply(slot: int, token: int, seconds: float, error: str, result_json: str) -> bytes:
    if not error:
        body = result_json.encode()
        if len(body) + REPLY.size <= MAX_MESSAGE:
            return REPLY.pack(slot, token, seconds, OK) + body
        error = f"decoded result is {len(body)} bytes, more than {MAX_MESSAGE}"
    return REPLY.pack(slot, token, seconds, ERROR) + error.encode()[:1000]


def parse_reply(message: bytes) -> tuple[int, int, float, str, str]:
    """(slot, token, seconds, error, result_json); raises ValueError on a malformed reply."""
    if len(message) < REPLY.size:
        raise ValueError(f"reply of {len(message)} bytes is shorter than its header")
    slot, token, seconds, kind = REPLY.unpack_from(message)
    text = message[REPLY.size:].decode()
    return (slot, token, seconds, text, "") if kind == ERROR else (slot, token, seconds, "",
                                                                    text)


# --- a camera process (camproc) and the service ----------------------------------------
# Finished journal lines, many per message: LINES, a header (how many lines, the process's
# inference errors so far), then per line (captured_at, wall_time, invoke seconds), then the
# lines themselves, each ending in a newline.
LINES = b"L"
LINES_HEADER = struct.Struct("<IQ")
LINE_META = struct.Struct("<ddd")
STATUS = b"S"  # followed by the source's and the model's state as JSON
MODEL = b"M"  # service -> camera: load this model (JSON: model, card), switch, then answer
DECODE_BESIDE = b"D"  # service -> camera: b"D1" decode in a thread of its own, b"D0" inline
MODEL_DONE = b"m"  # camera -> service: JSON {"error": "" or why the model was refused}


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
