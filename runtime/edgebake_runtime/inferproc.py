"""The inference worker process: it owns one interpreter and runs the model, nothing else.

Frames and outputs never pass through a pipe: the parent gives this process a memfd with
input and output slots (`FrameSlots`), and the pipe carries only (slot, token) requests and
(slot, token, seconds, error) replies. Running in its own process, the interpreter and the
copies around it never wait for the service's GIL, so N workers use N cores.

Usage (started by `ProcessWorker`): python3 -m edgebake_runtime.inferproc FD CONN_FD MODEL
THREADS SLOTS CARD
"""

from __future__ import annotations

import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from .card import load_card
from .interp import load_interpreter
from .slots import FrameSlots


def serve(conn: Connection, slots: FrameSlots, model: Path, threads: int) -> None:
    try:
        interpreter = load_interpreter(model, num_threads=threads)
        details = interpreter.get_input_details()[0]
        slots.check_matches(details, interpreter.get_output_details())
    except Exception as exc:  # reported to the parent, which refuses to start
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    input_view = interpreter.tensor(details["index"])
    outputs = [d["index"] for d in interpreter.get_output_details()]
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the service is gone
        if request is None:
            return
        slot, token = request
        began = time.monotonic()
        error = ""
        try:
            view = input_view()
            np.copyto(view, slots.input(slot))
            del view  # invoke() refuses to run while a view of its buffers is alive
            began = time.monotonic()
            interpreter.invoke()
            seconds = time.monotonic() - began
            for index, dest in zip(outputs, slots.outputs(slot), strict=True):
                np.copyto(dest, interpreter.get_tensor(index))
        except Exception as exc:  # one bad frame is an error, not the end of the worker
            seconds = time.monotonic() - began
            error = f"{type(exc).__name__}: {exc}"[:300]
        conn.send((slot, token, seconds, error))


def main(argv: list[str]) -> int:
    mem_fd, conn_fd, model, threads, count, card = argv
    conn = Connection(int(conn_fd))
    slots = FrameSlots.attach(int(mem_fd), load_card(Path(card)), int(count))
    try:
        serve(conn, slots, Path(model), int(threads))
    finally:
        slots.close()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
