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
