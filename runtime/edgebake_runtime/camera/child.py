"""A camera in its own process: capture, preprocessing, inference and decoding of one source.

Why: N cameras on N cores should approach N times one camera. With the camera in the service
and only the interpreter in a worker process, every frame still cost the service's one GIL
(capture, preprocessing, the hand-over, the reply), and two cameras on two cores reached 1.3
times one. Here a frame's whole path stays in its camera's process; the service only
appends the finished journal lines, many per message (`wire.LINES`).

Threads, each with one job:
- the source thread (the same `Source` classes the service uses, reconnecting with backoff)
  puts each frame into a latest-frame-wins queue, counting drops;
- the main thread puts the newest frame into the input tensor and invokes the model;
- the decoder thread decodes the outputs, builds the journal lines and sends them at most
  every FLUSH_SEC;
- the control thread takes orders (stop, switch model) and sends a status every STATUS_SEC,
  which is how the service sees the source's state and a model stuck in invoke.

Where a frame is prepared (scaled and normalised into the model's input layout) and decoded
follows the cores. While a core is free for this camera's helpers ("beside", fewer cameras
than cores), the source thread prepares and the decoder thread decodes beside the running
invoke (`invoke()` releases the GIL); they sleep on timers rather than being woken by the
main thread and start work only inside an invoke (`invokeclock` says why). With every core
inferring, a helper running beside an invoke only preempts another camera's invoke (a
context switch inside XNNPACK's kernels costs both) and its hand-overs cost wake-ups: the
main thread then prepares each frame straight into the interpreter's input buffer and
decodes between invokes, one thread doing one frame's work after the other.
A thread that dies ends the process, and the service starts a new one.

A recording waits instead of dropping: it is read READ_AHEAD frames ahead, and refilled once
half of them are taken (one wake-up of the source thread per READ_AHEAD // 2 frames).

Usage (started by `CameraProcess`): python3 -m edgebake_runtime.camera.child SOCK_FD SPEC
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import socket
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SampleSettings, SourceConfig
from ..frames import Frame, LatestFrameQueue
from ..invokeclock import SMOOTHING, InvokeClock
from ..records import journal_line
from ..samples import SampleKeeper
from ..sources import make_source
from ..supervise import essential
from . import wire
from .batch import FLUSH_SEC, LineBatch
from .model import READ_AHEAD, LoadedModel
from .preview import PreviewMaker

# While frames keep coming, inferred frames are decoded this many at a time: right after an
# invoke the decoding code is out of the CPU's caches (a frame's decoding in place takes
# twice what it takes in a loop), and a batch pays that about once; 8 decoded 1.5 % more
# frames per second than 4 with every core inferring. No frame waits in a batch while an
# invoke would take it past FLUSH_SEC (a slow model's frames go one by one: in QEMU a model
# of 3 s a frame held back for 8 frames looked stuck to the watchdog), and a frame that
# finds no other waiting is decoded at once, so a camera's pace sees no delay.
DECODE_BATCH = 8
# Inferred batches waiting for the decoder thread beyond this many (it fell behind) are
# decoded by the main thread: what waits stays bounded, in memory and in latency.
MAX_PENDING_BATCHES = 8
STATUS_SEC = 0.25
WAIT_SEC = 0.5


# (frame, model, outputs, invoke seconds, error): an inferred frame for decoding
Done = tuple[Frame, LoadedModel, list[np.ndarray[Any, Any]], float, str]


class Camera:
    def __init__(self, sock: socket.socket, spec: dict[str, Any]) -> None:
        self.sock = sock
        self.index = int(spec["index"])
        self.threads = int(spec["threads"])
        self.threshold: float | None = spec["threshold"]
        self.top_k = int(spec["top_k"])
        self.model = LoadedModel.load(Path(spec["model"]), Path(spec["card"]), spec["version"],
                                      self.threads, 1)
        self.source = make_source(SourceConfig(**spec["source"]))
        self.source.size_for = self.model.preprocessor.native_size
        depth = int(spec["depth"])
        self.queue = LatestFrameQueue(max(depth, READ_AHEAD), READ_AHEAD // 2) \
            if self.source.can_wait else LatestFrameQueue(depth)
        # bounded in fact: the main thread hands over a batch at most per DECODE_BATCH frames
        self.pending: collections.deque[list[Done]] = collections.deque()
        self.decoder_wanted = threading.Event()  # set only when the main thread is idle
        self.decoding_ends = threading.Event()
        self.decoder_dozing = False  # asleep until woken: the next batch wakes it
        self.clock = InvokeClock(self.model.first_invoke_sec)
        self.prepare_sec = 0.0  # how long a frame's preprocessing takes, smoothed
        self.decode_sec = 0.0  # how long a frame's decoding takes, smoothed
        self.stop = threading.Event()
        self.busy_since = 0.0
        self.last_done = 0.0
        self.processed = 0
        self.last_error = ""
        self.switch_drops = 0
        self._send_lock = threading.Lock()
        self._encode = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
        self.batch = LineBatch()
        # Prepare and decode beside the running invoke only while a core is free for it
        self.beside = bool(spec["decode_beside"])
        self.samples = _sample_keeper(spec.get("samples"), self.source.config.name)
        self.preview = PreviewMaker(self.send)

    def send(self, message: bytes) -> None:
        with self._send_lock:  # a status and a batch of lines never interleave mid-call
            try:
                self.sock.send(message)
            except OSError:
                os._exit(0)  # the service is gone: nobody to report to

    # --- the source thread ------------------------------------------------------------
    def on_frame(self, frame: Frame) -> None:
        if self.samples is not None or self.preview.active():
            frame.captured = frame.image  # preparing replaces it with the model's input
        if self.source.can_wait:
            self._await_room()
        if not self.beside:  # the main thread prepares it
            self.queue.put(frame)
            return
        self.clock.await_window(self.prepare_sec)
        began = time.monotonic()
        self.model.prepare(frame)
        self.queue.put(frame)
        self.prepare_sec += (time.monotonic() - began - self.prepare_sec) * SMOOTHING

    def _await_room(self) -> None:
        """A recording waits until a frame can be queued without a drop: asleep for about
        as long as the main thread needs to take the frames ahead, not woken by it. After
        WAIT_SEC * 2 (a model switch, an invoke that hangs) the frame goes in and one drops."""
        waiting = self.queue
        deadline = time.monotonic() + 2 * WAIT_SEC
        while (ahead := len(waiting)) >= waiting.depth and not self.stop.is_set():
            now = time.monotonic()
            if now >= deadline:
                return
            time.sleep(min(max(ahead - waiting.refill_at, 1) * self.clock.period, deadline - now))

    # --- the main thread --------------------------------------------------------------
    def infer_loop(self) -> None:
        """Invoke the model on the newest frames; hand what is inferred to decoding."""
        inferred: list[Done] = []  # not yet decoded nor handed over
        first_inferred = 0.0  # when the oldest of them was
        while not self.stop.is_set():
            if inferred and not len(self.queue):
                self._hand_over(inferred, idle=True)  # nothing waits: decode now
                inferred = []
            frame = self.queue.wait_take(WAIT_SEC)
            if frame is None:
                continue
            model = self.model
            if frame.placement is not None and frame.generation != model.generation:
                self.switch_drops += 1  # prepared for the model switched away
                continue
            outputs: list[np.ndarray[Any, Any]] = []
            error = ""
            began = time.monotonic()
            self.busy_since = began
            try:
                model.fill_input(frame)
                if len(inferred) >= DECODE_BATCH or (
                        inferred and began + self.clock.typical - first_inferred >= FLUSH_SEC):
                    # handed over once this frame is in place, decoded while it is inferred
                    self._hand_over(inferred, idle=False)
                    inferred = []
                began = time.monotonic()
                self.clock.enter(began)
                model.interpreter.invoke()
                ended = time.monotonic()
                self.clock.leave(ended)
                seconds = ended - began
                outputs = [model.interpreter.get_tensor(i) for i in model.outputs]
            except Exception as exc:  # one bad frame is an error, not the end of the camera
                ended = time.monotonic()
                self.clock.leave(ended)
                seconds = ended - began
                error = f"{type(exc).__name__}: {exc}"[:300]
            self.busy_since = 0.0
            self.last_done = ended
            self.processed += 1
            if not inferred:
                first_inferred = ended
            inferred.append((frame, model, outputs, seconds, error))
        if inferred:
            self.pending.append(inferred)  # the decoder writes them before it ends

    def _hand_over(self, inferred: list[Done], idle: bool) -> None:
        """To the decoder thread when a core is free for it, else decoded here and now.
        Only an idle main thread wakes the decoder; while frames flow it finds the batch
        at its next look."""
        if self.beside and len(self.pending) < MAX_PENDING_BATCHES:
            self.pending.append(inferred)
            if idle or self.decoder_dozing:
                self.decoder_wanted.set()
            return
        for item in inferred:
            self.decode(item)
        self.batch.send_if_due(self.send, now=idle)

    # --- decoding: in the decoder thread, or inline when no core is free for it ------
    def decode(self, item: Done) -> None:
        """Decode one inferred frame into a journal line, or count why it could not be."""
        frame, model, outputs, seconds, error = item
        if not error:
            try:
                decoded = model.decode(model.card, outputs, frame.placement, self.threshold,
                                       self.top_k)
                if self.samples is not None:
                    self.samples.offer(frame, decoded, model.card.version)
                if self.preview.until:
                    self.preview.offer(frame.captured, decoded)
                result = self._encode(decoded)
                line = journal_line(model.card.version, frame, result, seconds,
                                    time.monotonic() - frame.captured_at, self.index)
                error = self.batch.add((frame.captured_at, frame.wall_time, seconds), line)
            except Exception as exc:  # a decoding bug costs this frame only
                error = f"decoding: {type(exc).__name__}: {exc}"[:300]
        if error:
            self.batch.count_error()
            self.last_error = f"{frame.source}#{frame.seq}: {error}"

    def decode_loop(self) -> None:
        """Decode what the main thread hands over; lines go out at most every FLUSH_SEC."""
        while True:
            ending = self.decoding_ends.is_set()
            while self.pending:
                for item in self.pending.popleft():
                    if self.beside:
                        self.clock.await_window(self.decode_sec)
                    began = time.monotonic()
                    self.decode(item)
                    self.decode_sec += (time.monotonic() - began - self.decode_sec) * SMOOTHING
                self.batch.send_if_due(self.send)
            if ending:
                break
            self.batch.send_if_due(self.send)
            look = self._next_look()
            self.decoder_dozing = look >= WAIT_SEC
            self.decoder_wanted.wait(look)
            self.decoder_wanted.clear()
            self.decoder_dozing = False
        self.batch.send_if_due(self.send, now=True)

    def _next_look(self) -> float:
        """How long the decoder sleeps: inline (the main thread decodes and sends) until
        asked; beside a busy main thread, about one batch's time (FLUSH_SEC at most), so
        that it finds each batch soon after it is handed over; at most until waiting lines
        are due."""
        if not self.beside:
            return WAIT_SEC
        look = min(DECODE_BATCH * self.clock.period, FLUSH_SEC) if self.clock.busy() \
            else WAIT_SEC
        due = self.batch.wait_sec()
        return look if due is None else min(look, due)

    # --- the control thread -----------------------------------------------------------
    def control_loop(self) -> None:
        last_status = 0.0
        while not self.stop.is_set():
            readable = select.select([self.sock], [], [], STATUS_SEC)[0]
            if readable:
                try:
                    message = self.sock.recv(wire.MAX_MESSAGE)
                except OSError:
                    message = b""
                if not message:
                    os._exit(0)  # the service is gone: nobody to report to
                if message == wire.STOP:
                    self.stop.set()
                    return
                if message.startswith(wire.MODEL):
                    # loaded in a thread of its own: the statuses keep coming meanwhile, so
                    # a slow load is not taken for a hung process
                    order = json.loads(message[len(wire.MODEL):])
                    threading.Thread(target=essential(partial(self.switch_model, order)),
                                     name="model-load", daemon=True).start()
                elif message.startswith(wire.DECODE_BESIDE):
                    self.beside = message[len(wire.DECODE_BESIDE):] == b"1"
                elif message.startswith(wire.SAMPLES) and self.samples is not None:
                    self.samples.request(int(message[len(wire.SAMPLES):] or b"0"))
                elif message.startswith(wire.WANT_PREVIEW):
                    self.preview.want(float(message[len(wire.WANT_PREVIEW):] or b"1"))
            now = time.monotonic()
            if now - last_status >= STATUS_SEC:
                last_status = now
                self.send(self.status().encode())

    def switch_model(self, order: dict[str, Any]) -> None:
        """Load the new model beside the running one, then switch frames over to it."""
        threads = int(order.get("threads") or self.threads)
        try:
            new = LoadedModel.load(Path(order["model"]), Path(order["card"]), order["version"],
                                   threads, self.model.generation + 1)
        except Exception as exc:  # the old model keeps running; the service decides
            self.send(wire.MODEL_DONE + json.dumps(
                {"error": f"{type(exc).__name__}: {exc}"[:2000]}).encode())
            return
        self.source.size_for = new.preprocessor.native_size
        self.clock.typical = new.first_invoke_sec  # it learns the new model's from there
        self.model = new  # frames prepared from now on are for the new model
        self.threads = threads
        self.send(wire.MODEL_DONE + json.dumps({"error": ""}).encode())

    def status(self) -> wire.CameraStatus:
        st = self.source.stats
        return wire.CameraStatus(
            state=st.state, frames=st.frames, fps=st.fps, last_frame=st.last_frame_monotonic,
            corrupt=st.corrupt_frames, reconnects=st.reconnects, source_error=st.last_error,
            size=st.frame_size, depth=len(self.queue), drops=self.queue.dropped,
            busy_since=self.busy_since, processed=self.processed, errors=self.batch.errors,
            last_error=self.last_error, switch_drops=self.switch_drops,
            version=self.model.card.version,
            samples=self.samples.stats() if self.samples is not None else {})


def _sample_keeper(spec: dict[str, Any] | None, camera: str) -> SampleKeeper | None:
    """The camera's sample keeper, its writer thread started (None when samples are off)."""
    if not spec:
        return None
    keeper = SampleKeeper(SampleSettings(**spec["settings"]), camera, spec["device"])
    threading.Thread(target=essential(keeper.writer_loop), name="samples",
                     daemon=True).start()
    return keeper


def main(argv: list[str]) -> int:
    sock_fd, spec_text = argv
    sock = socket.socket(fileno=int(sock_fd))
    try:
        camera = Camera(sock, json.loads(spec_text))
    except Exception as exc:  # reported to the service, which refuses to start this camera
        sock.send(wire.FAILED + f"{type(exc).__name__}: {exc}".encode()[:4000])
        return 1
    decoder = threading.Thread(target=essential(camera.decode_loop), name="decode", daemon=True)
    control = threading.Thread(target=essential(camera.control_loop), name="control",
                               daemon=True)
    decoder.start()
    threading.Thread(target=essential(camera.preview.loop), name="preview", daemon=True).start()
    camera.source.start(camera.on_frame)
    sock.send(wire.READY + str(os.getpid()).encode())
    control.start()
    try:
        camera.infer_loop()
    finally:
        camera.source.stop()
        camera.decoding_ends.set()
        camera.decoder_wanted.set()
        decoder.join(5.0)
        with contextlib.suppress(OSError):
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
