"""The inference worker process: it owns one interpreter, runs the model and decodes its outputs.

Frames never pass through a pipe: the parent gives this process a memfd with input slots
(`FrameSlots`), and the pipe carries only (slot, token, placement) requests and (slot, token,
seconds, error, result) replies, where the result is the small decoded dict. Running in its
own process, the interpreter never waits for the service's GIL, so N workers use N cores.

Decoding runs in a second thread here: `invoke()` releases the GIL, so the outputs of one
frame are decoded while the next frame is inferred, and the service does no per-frame numpy
work beyond preprocessing.

Usage (started by `ProcessWorker`): python3 -m edgebake_runtime.inferproc FD CONN_FD MODEL
THREADS SLOTS CARD THRESHOLD TOP_K
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from .card import Card, load_card
from .interp import load_interpreter
from .postprocess import decoder_for
from .preprocess import Placement
from .slots import FrameSlots

# (slot, token, seconds, outputs, placement, error) for the decoder, None to end. Only the
# decoder thread writes to the pipe, so replies never interleave.
Pending = tuple[int, int, float, list[np.ndarray[Any, Any]], Placement, str] | None
EXIT_DECODER_FAILED = 70


def _decode_loop(conn: Connection, card: Card, pending: queue.Queue[Pending],
                 threshold: float | None, top_k: int) -> None:
    """Decode finished frames and reply; a reply frees the slot for the next frame."""
    decode = decoder_for(card)
    while True:
        item = pending.get()
        if item is None:
            return
        slot, token, seconds, outputs, placement, error = item
        result: dict[str, Any] | None = None
        if not error:
            try:
                result = decode(card, outputs, placement, threshold, top_k)
            except Exception as exc:  # a decoding bug costs this frame, not the worker
                error = f"decoding: {type(exc).__name__}: {exc}"[:300]
        try:
            conn.send((slot, token, seconds, error, result))
        except (OSError, ValueError):
            return  # the service is gone


def _run_decoder(conn: Connection, card: Card, pending: queue.Queue[Pending],
                 threshold: float | None, top_k: int) -> None:
    try:
        _decode_loop(conn, card, pending, threshold, top_k)
    except BaseException:  # a decoder that is gone makes the whole process go: replaced
        os._exit(EXIT_DECODER_FAILED)


def serve(conn: Connection, slots: FrameSlots, model: Path, card: Card, threads: int,
          threshold: float | None, top_k: int) -> None:
    try:
        interpreter = load_interpreter(model, num_threads=threads)
        details = interpreter.get_input_details()[0]
        slots.check_matches(details, interpreter.get_output_details())
    except Exception as exc:  # reported to the parent, which refuses to start
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    input_view = interpreter.tensor(details["index"])
    outputs = [d["index"] for d in interpreter.get_output_details()]
    pending: queue.Queue[Pending] = queue.Queue(maxsize=slots.count)
    decoder = threading.Thread(target=_run_decoder, name="decode", daemon=True,
                               args=(conn, card, pending, threshold, top_k))
    decoder.start()
    conn.send(("ready", os.getpid()))
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return  # the service is gone
            if request is None:
                return
            slot, token, place = request
            began = time.monotonic()
            results: list[np.ndarray[Any, Any]] = []
            error = ""
            try:
                view = input_view()
                np.copyto(view, slots.input(slot))
                del view  # invoke() refuses to run while a view of its buffers is alive
                began = time.monotonic()
                interpreter.invoke()
                seconds = time.monotonic() - began
                results = [interpreter.get_tensor(index) for index in outputs]  # copies
            except Exception as exc:  # one bad frame is an error, not the end of the worker
                seconds = time.monotonic() - began
                error = f"{type(exc).__name__}: {exc}"[:300]
            placement = Placement(*place) if place else Placement()
            pending.put((slot, token, seconds, results, placement, error))
    finally:
        pending.put(None)
        decoder.join(5.0)


def main(argv: list[str]) -> int:
    mem_fd, conn_fd, model, threads, count, card_path, threshold, top_k = argv
    conn = Connection(int(conn_fd))
    card = load_card(Path(card_path))
    slots = FrameSlots.attach(int(mem_fd), card, int(count))
    try:
        serve(conn, slots, Path(model), card, int(threads),
              float(threshold) if threshold else None, int(top_k))
    finally:
        slots.close()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
