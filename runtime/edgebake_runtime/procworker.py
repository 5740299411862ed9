"""An inference worker in its own process, fed from the service through shared memory.

A feeder thread in the service takes the freshest frame (round-robin over sources, as the
thread worker does), copies its input tensor into a free slot and sends the slot number with
the frame's placement. Three slots per worker keep the process busy: the next frame is
already in place when an invoke returns, while the previous one is still being decoded. The
process decodes the outputs itself, beside the next invoke, and replies with the small result
dict, which the feeder turns into a record; the service never decodes.

Failures: a process that exits or is killed is replaced (with backoff) and counted; until
its replacement is ready the worker is not alive, so the unit is not healthy. A process
that hangs keeps `busy_since`, which the watchdog check turns into "stuck": the pings stop
and systemd restarts the service.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import wire
from .card import Card
from .child import ChildLink
from .frames import Frame, FrameSignal, LatestFrameQueue, RoundRobin
from .metrics import Metrics
from .slots import FrameSlots

log = logging.getLogger("edgebake.worker")

SLOTS = 3
WAIT_SEC = 0.5  # with nothing happening, check this often that the process still lives


class ProcessWorker(ChildLink):
    what = "worker process"

    def __init__(self, index: int, model: Path, card: Card, num_threads: int,
                 queues: dict[str, LatestFrameQueue], signal_: FrameSignal, metrics: Metrics,
                 deliver: Callable[[int, Frame, str, float], None],
                 threshold: float | None, top_k: int, generation: int = 0) -> None:
        super().__init__()
        self.label = f"worker {index}"
        self.index = index
        self.model = model
        self.card = card
        self.num_threads = num_threads
        self.queues = queues
        self.signal = signal_
        self.metrics = metrics
        self.deliver = deliver
        self.threshold = threshold
        self.top_k = top_k
        self.generation = generation
        self.slots = FrameSlots.create(card, SLOTS)
        self.busy_since = 0.0  # monotonic: oldest unanswered request, 0 when idle
        self.last_done = time.monotonic()
        self.processed = 0
        self.lost_frames = 0  # frames in flight when a process died
        self._frames = RoundRobin(queues)
        self._token = 0
        # slots and requests, shared by the feeder and the source threads that `offer`
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._flight: dict[int, tuple[Frame, int]] = {}
        self._feeding: socket.socket | None = None  # set while a process takes frames

    # --- the process ----------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process and wait until it has loaded the model (or says why not)."""
        self._launch("edgebake_runtime.inferproc", [
            str(self.slots.fd), str(self.model), str(self.num_threads), str(SLOTS),
            str(self.card.path), "" if self.threshold is None else repr(self.threshold),
            str(self.top_k)], extra_fds=(self.slots.fd,))
        self._await_ready()

    # --- the feeder thread -------------------------------------------------------------
    def start(self) -> None:
        if not self._ready:
            self.spawn()
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.index}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.signal.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(wire.STOP)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self._kill()
        self.slots.close()

    def _run(self) -> None:
        self._keep_running(self._feed)
        self.busy_since = 0.0

    def offer(self) -> None:
        """A source thread just queued a frame: fill a free slot with it now, in that thread.

        Handing the frame over where it was made saves waking the feeder thread for it (on
        a 2-core unit that wake-up costs as much CPU as the rest of the hand-over). With
        every slot busy the frame waits in its latest-frame-wins queue for the next reply.
        """
        with self._lock:
            if self._feeding is None:
                return  # between processes: the next one's feeder starts by filling
            with contextlib.suppress(OSError):  # the feeder sees the same broken socket
                self._fill(self._feeding)

    def _fill(self, sock: socket.socket) -> None:
        """Under the lock: put the freshest frames into free slots and send the requests."""
        while self._free:
            frame = self._frames.take()
            if frame is None:
                return
            if frame.generation != self.generation:
                self.metrics.switch_drops += 1  # prepared for the other model
                continue
            slot = self._free.pop()
            self._token += 1
            self.slots.input(slot)[...] = frame.image
            place = frame.placement
            sock.send(wire.request(slot, self._token, None if place is None else
                                   (place.scale_x, place.scale_y, place.offset_x,
                                    place.offset_y)))
            self._flight[slot] = (frame, self._token)
            if not self.busy_since:
                self.busy_since = time.monotonic()

    def _feed(self) -> None:
        """Keep the slots busy until stopped; raises when the process is gone.

        Source threads fill free slots themselves (`offer`); this thread takes the replies,
        refills the slot a reply frees, and wakes on the frame signal for frames that came
        while every slot was busy, so the process never waits on a poll.
        """
        sock = self._sock
        assert sock is not None
        with self._lock:
            self._free = list(range(SLOTS))
            self._flight = {}
            self._feeding = sock
        wake = self.signal.subscribe()
        try:
            while not self._stop.is_set():
                with self._lock:
                    self._fill(sock)
                readable, _, _ = select.select([sock.fileno(), wake], [], [], WAIT_SEC)
                if wake in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
                if sock.fileno() not in readable:
                    if not readable and self._proc is not None and \
                            self._proc.poll() is not None:
                        raise EOFError("worker process exited")
                    continue
                self._take_reply(sock)
        finally:
            with self._lock:
                self._feeding = None
                in_flight = len(self._flight)
            self.signal.unsubscribe(wake)
            if not self._stop.is_set():
                self.lost_frames += in_flight
            self.busy_since = 0.0

    def _take_reply(self, sock: socket.socket) -> None:
        message = sock.recv(wire.MAX_MESSAGE)
        if not message:
            raise EOFError("worker process closed its socket")
        slot, token, seconds, error, result = wire.parse_reply(message)
        with self._lock:
            if slot not in self._flight:
                raise OSError(f"reply for slot {slot}, which has no frame in flight")
            frame, sent = self._flight.pop(slot)
            self._free.append(slot)
            now = time.monotonic()
            self.busy_since = now if self._flight else 0.0
            if token != sent:
                raise OSError(f"reply for token {token}, expected {sent}")
            self._fill(sock)  # the freed slot takes a waiting frame before the result is written
        if error:
            self.metrics.inference_errors += 1
            log.warning("worker %d: inference failed on %s#%d: %s", self.index,
                        frame.source, frame.seq, error)
            return
        self.last_done = now
        self.processed += 1
        self.metrics.inference.add(seconds)
        self.deliver(self.index, frame, result, seconds)

    def stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive(), "restarts": self.restarts,
                "processed": self.processed, "lost_frames": self.lost_frames,
                "last_error": self.last_error}

