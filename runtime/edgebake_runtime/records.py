"""Journal lines: one result record as a line of JSON, with an id unique across runs.

Why text and not a dict: a camera process encodes its decoded result once, and the line is
built around that text, so no process decodes or re-encodes a result on its way to disk.
"""

from __future__ import annotations

import itertools
import json
import secrets
from functools import lru_cache

from .frames import Frame

# Record ids: unique across restarts and reboots without persisted state, so MQTT receivers
# can drop the duplicates that at-least-once delivery allows.
RUN_ID = secrets.token_hex(6)
RECORD_NUMBERS = itertools.count(1)


def journal_line(version: str, frame: Frame, result_json: str, invoke_seconds: float,
                 latency_seconds: float, camera: int) -> bytes:
    """The record of one inferred frame, keys sorted, around a result already in JSON."""
    fields = result_json[1:-1]
    return (f'{{"id":"{RUN_ID}-{next(RECORD_NUMBERS)}",'
            f'"inference_ms":{round(invoke_seconds * 1000, 2)!r},'
            f'"latency_ms":{round(latency_seconds * 1000, 2)!r},'
            f'"model":{_json_text(version)},"seq":{frame.seq},'
            f'"source":{_json_text(frame.source)},"ts":{round(frame.wall_time, 3)!r},'
            f'"worker":{camera}{"," if fields else ""}{fields}}}\n').encode()


@lru_cache(maxsize=256)
def _json_text(value: str) -> str:
    return json.dumps(value)
