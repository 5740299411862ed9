"""The inference worker process: it owns one interpreter, runs the model and decodes its outputs.

Frames never pass through a socket: the parent gives this process a memfd with input slots
(`FrameSlots`), and a SOCK_SEQPACKET pair carries only fixed-size requests (slot, token,
placement) and replies (slot, token, seconds, then the decoded result as JSON text; see
`wire`). Running in its own process, the interpreter never waits for the service's GIL, so
N workers use N cores.

Decoding runs in a second thread here, beside the next invoke: `invoke()` releases the GIL.
The finished outputs are handed to the decoder only once the next frame is in the input
tensor (or at once when no request waits), so the decoder's Python never holds the GIL
while this thread needs it between two invokes.

Usage (started by `ProcessWorker`): python3 -m edgebake_runtime.inferproc SOCK_FD FD MODEL
THREADS SLOTS CARD THRESHOLD TOP_K
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import wire
from .card import Card, load_card
from .interp import load_interpreter
from .placement import Placement
from .postprocess import decoder_for
from .slots import FrameSlots

# (slot, token, seconds, outputs, placement, error) for the decoder, None to end. Only the
# decoder thread writes to the socket, so replies never interleave.
Pending = tuple[int, int, float, list[np.ndarray[Any, Any]], Placement, str] | None
EXIT_DECODER_FAILED = 70
# This thread hands over the GIL this often when the decoder wants it (not every 5 ms).
SWITCH_INTERVAL_SEC = 0.0005


def _decode_loop(sock: socket.socket, card: Card, pending: queue.SimpleQueue[Pending],
                 threshold: float | None, top_k: int) -> None:
    """Decode finished frames and reply; a reply frees the slot for the next frame."""
    decode = decoder_for(card)
    encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
    while True:
        item = pending.get()
        if item is None:
            return
        slot, token, seconds, outputs, placement, error = item
        text = ""
        if not error:
            try:
                text = encode(decode(card, outputs, placement, threshold, top_k))
            except Exception as exc:  # a decoding bug costs this frame, not the worker
                error = f"decoding: {type(exc).__name__}: {exc}"[:300]
        try:
            sock.send(wire.reply(slot, token, seconds, error, text))
        except OSError:
            return  # the service is gone


def _run_decoder(sock: socket.socket, card: Card, pending: queue.SimpleQueue[Pending],
                 threshold: float | None, top_k: int) -> None:
    try:
        _decode_loop(sock, card, pending, threshold, top_k)
    except BaseException:  # a decoder that is gone makes the whole process go: replaced
        os._exit(EXIT_DECODER_FAILED)


def serve(sock: socket.socket, slots: FrameSlots, model: Path, card: Card, threads: int,
          threshold: float | None, top_k: int) -> None:
    try:
        interpreter = load_interpreter(model, num_threads=threads)
        details = interpreter.get_input_details()[0]
        slots.check_matches(details, interpreter.get_output_details())
    except Exception as exc:  # reported to the parent, which refuses to start
        sock.send(wire.FAILED + f"{type(exc).__name__}: {exc}".encode()[:4000])
        return
    input_view = interpreter.tensor(details["index"])
    outputs = [d["index"] for d in interpreter.get_output_details()]
    # unbounded in type, bounded in fact: at most one item per slot is ever in it
    pending: queue.SimpleQueue[Pending] = queue.SimpleQueue()
    decoder = threading.Thread(target=_run_decoder, name="decode", daemon=True,
                               args=(sock, card, pending, threshold, top_k))
    decoder.start()
    sock.send(wire.READY + str(os.getpid()).encode())
    done: Pending = None  # inferred, not yet handed to the decoder
    try:
        while True:
            if done is not None and not select.select([sock], [], [], 0)[0]:
                pending.put(done)  # nothing waits: decode it now rather than after a frame
                done = None
            try:
                request = sock.recv(wire.REQUEST.size + 16)
            except OSError:
                return  # the service is gone
            if len(request) != wire.REQUEST.size:
                return  # STOP, or the service closed its end
            slot, token, has_place, *place = wire.REQUEST.unpack(request)
            began = time.monotonic()
            results: list[np.ndarray[Any, Any]] = []
            error = ""
            try:
                view = input_view()
                np.copyto(view, slots.input(slot))
                del view  # invoke() refuses to run while a view of its buffers is alive
                if done is not None:
                    pending.put(done)  # decoded while this frame is inferred
                    done = None
                began = time.monotonic()
                interpreter.invoke()
                seconds = time.monotonic() - began
                results = [interpreter.get_tensor(index) for index in outputs]  # copies
            except Exception as exc:  # one bad frame is an error, not the end of the worker
                seconds = time.monotonic() - began
                error = f"{type(exc).__name__}: {exc}"[:300]
            placement = Placement(*place) if has_place else Placement()
            if done is not None:  # the copy failed before it was handed over
                pending.put(done)
            done = (slot, token, seconds, results, placement, error)
    finally:
        if done is not None:
            pending.put(done)
        pending.put(None)
        decoder.join(5.0)


def main(argv: list[str]) -> int:
    sock_fd, mem_fd, model, threads, count, card_path, threshold, top_k = argv
    sys.setswitchinterval(SWITCH_INTERVAL_SEC)
    sock = socket.socket(fileno=int(sock_fd))
    card = load_card(Path(card_path))
    slots = FrameSlots.attach(int(mem_fd), card, int(count))
    try:
        serve(sock, slots, Path(model), card, int(threads),
              float(threshold) if threshold else None, int(top_k))
    finally:
        slots.close()
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
