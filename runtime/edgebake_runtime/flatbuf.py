"""Bounds check of a TFLite flatbuffer's top level, so a cut-off copy is named as such.

The TFLite runtimes report a truncated file in whatever words their verifier happens to reach
("No subgraph in the model", a crash, ...). Walking the Model table's vectors and each
buffer's bytes finds the usual damage (a short download, a full disk) in one clear line.
"""

from __future__ import annotations

import mmap
import struct

Data = bytes | mmap.mmap

# Field numbers of the Model table in TFLite's schema.
MODEL_VECTORS = {1: "operator codes", 2: "subgraphs", 4: "buffers"}
BUFFERS_FIELD = 4
# Buffer table: data (vector of ubyte), then offset and size (u64) for data stored after the
# flatbuffer in models over 2 GB.
BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2


class Truncated(Exception):
    """Something the file points at lies past its end."""


def _u32(data: Data, at: int, what: str) -> int:
    if at < 0 or at + 4 > len(data):
        raise Truncated(what)
    return int(struct.unpack_from("<I", data, at)[0])


def _field(data: Data, table: int, field: int, what: str) -> int | None:
    """Absolute position of a table's field, or None when the field is absent."""
    vtable = table - struct.unpack_from("<i", data, table)[0] if table + 4 <= len(data) else -1
    if vtable < 0 or vtable + 4 > len(data):
        raise Truncated(what)
    vtable_bytes = struct.unpack_from("<H", data, vtable)[0]
    slot = 4 + 2 * field
    if slot + 2 > vtable_bytes:
        return None
    if vtable + slot + 2 > len(data):
        raise Truncated(what)
    offset = struct.unpack_from("<H", data, vtable + slot)[0]
    return table + offset if offset else None


def _vector(data: Data, at: int, width: int, what: str) -> tuple[int, int]:
    """(first element position, count) of the vector the offset at `at` points to."""
    start = at + _u32(data, at, what)
    count = _u32(data, start, what)
    if start + 4 + count * width > len(data):
        raise Truncated(what)
    return start + 4, count


def _check_buffer(data: Data, table: int, index: int) -> None:
    what = f"buffer {index}"
    at = _field(data, table, BUFFER_DATA, what)
    if at is not None:
        _vector(data, at, 1, what)
    offset_at = _field(data, table, BUFFER_OFFSET, what)
    size_at = _field(data, table, BUFFER_SIZE, what)
    if offset_at is not None and size_at is not None:
        if size_at + 8 > len(data) or offset_at + 8 > len(data):
            raise Truncated(what)
        offset, = struct.unpack_from("<Q", data, offset_at)
        size, = struct.unpack_from("<Q", data, size_at)
        if offset + size > len(data):
            raise Truncated(what)


def truncation(data: Data) -> str | None:
    """What of the model lies past the end of `data`, or None when the top level is whole."""
    try:
        root = _u32(data, 0, "the model table")
        for field, what in MODEL_VECTORS.items():
            at = _field(data, root, field, what)
            if at is None:
                continue
            first, count = _vector(data, at, 4, what)
            for index in range(count):
                element = first + 4 * index
                target = element + _u32(data, element, what)
                if target >= len(data):
                    raise Truncated(f"{what} entry {index}")
                if field == BUFFERS_FIELD:
                    _check_buffer(data, target, index)
    except Truncated as exc:
        return str(exc)
    return None
