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
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .card import Card
from .frames import Frame, FrameSignal, LatestFrameQueue, RoundRobin
from .metrics import Metrics
from .slots import FrameSlots

log = logging.getLogger("edgebake.worker")

SLOTS = 3
START_TIMEOUT_SEC = 120.0
BACKOFF_START_SEC = 1.0
BACKOFF_MAX_SEC = 30.0
WAIT_SEC = 0.5  # with nothing happening, check this often that the process still lives


class WorkerStartError(Exception):
    """The worker process could not load the model; the message says why."""


class ProcessWorker:
    def __init__(self, index: int, model: Path, card: Card, num_threads: int,
                 queues: dict[str, LatestFrameQueue], signal_: FrameSignal, metrics: Metrics,
                 deliver: Callable[[int, Frame, dict[str, Any], float], None],
                 threshold: float | None, top_k: int, generation: int = 0) -> None:
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
        self.restarts = 0
        self.lost_frames = 0  # frames in flight when a process died
        self.pid = 0
        self.last_error = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames = RoundRobin(queues)
        self._token = 0

    # --- the process ----------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process and wait until it has loaded the model (or says why not)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        args = [sys.executable, "-m", "edgebake_runtime.inferproc", str(self.slots.fd),
                str(theirs.fileno()), str(self.model), str(self.num_threads), str(SLOTS),
                str(self.card.path), "" if self.threshold is None else repr(self.threshold),
                str(self.top_k)]
        try:
            self._proc = subprocess.Popen(args, pass_fds=(self.slots.fd, theirs.fileno()),
                                          env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        if not self._conn.poll(START_TIMEOUT_SEC):
            self._kill()
            raise WorkerStartError(f"worker process gave no sign in {START_TIMEOUT_SEC:.0f}s")
        try:
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            code = self._proc.wait()
            self._kill()
            raise WorkerStartError(f"worker process exited with {code} while loading") from None
        if kind != "ready":
            self._kill()
            raise WorkerStartError(str(detail))
        self.pid = int(detail)
        self._ready = True

    def _kill(self) -> None:
        self._ready = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def alive(self) -> bool:
        proc = self._proc
        return (self._thread is not None and self._thread.is_alive() and self._ready
                and proc is not None and proc.poll() is None)

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
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        self._kill()
        self.slots.close()

    def _run(self) -> None:
        backoff = BACKOFF_START_SEC
        while not self._stop.is_set():
            if not self._ready:
                try:
                    self.spawn()
                    log.info("worker %d: process %d ready (restart %d)", self.index, self.pid,
                             self.restarts)
                except (WorkerStartError, OSError) as exc:
                    self.last_error = str(exc)
                    log.error("worker %d: %s; retrying in %.0fs", self.index, exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_SEC)
                    continue
            started = time.monotonic()
            try:
                self._feed()
            except (EOFError, OSError, BrokenPipeError) as exc:
                code = self._proc.poll() if self._proc is not None else None
                self.restarts += 1
                self.last_error = (f"process {self.pid} exited ({code})" if code is not None
                                   else f"pipe to process {self.pid} failed: {exc}")
                log.error("worker %d: %s; starting a new one", self.index, self.last_error)
                self._kill()
                if time.monotonic() - started > 2 * BACKOFF_MAX_SEC:
                    backoff = BACKOFF_START_SEC
                elif self.restarts > 1:
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX_SEC)
        self.busy_since = 0.0

    def _feed(self) -> None:
        """Keep both slots busy until stopped; raises when the process is gone.

        One select() waits for whichever comes first, a reply or a new frame, so a free
        slot is refilled the moment a frame arrives and the process never waits on a poll.
        """
        conn = self._conn
        assert conn is not None
        free = list(range(SLOTS))
        flight: dict[int, tuple[Frame, int]] = {}
        wake = self.signal.subscribe()
        try:
            while not self._stop.is_set():
                while free:
                    frame = self._frames.take()
                    if frame is None:
                        break
                    if frame.generation != self.generation:
                        self.metrics.switch_drops += 1  # prepared for the other model
                        continue
                    slot = free.pop()
                    self._token += 1
                    self.slots.input(slot)[...] = frame.image
                    place = frame.placement
                    conn.send((slot, self._token, None if place is None else
                               (place.scale_x, place.scale_y, place.offset_x, place.offset_y)))
                    flight[slot] = (frame, self._token)
                    if not self.busy_since:
                        self.busy_since = time.monotonic()
                readable, _, _ = select.select([conn.fileno(), wake], [], [], WAIT_SEC)
                if wake in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
                if conn.fileno() not in readable:
                    if not readable and self._proc is not None and \
                            self._proc.poll() is not None:
                        raise EOFError("worker process exited")
                    continue
                if not flight:
                    raise OSError("the worker process spoke without a request")
                self._take_reply(conn, flight, free)
        finally:
            self.signal.unsubscribe(wake)
            if not self._stop.is_set():
                self.lost_frames += len(flight)
            self.busy_since = 0.0

    def _take_reply(self, conn: Connection, flight: dict[int, tuple[Frame, int]],
                    free: list[int]) -> None:
        slot, token, seconds, error, result = conn.recv()
        frame, sent = flight.pop(slot)
        free.append(slot)
        now = time.monotonic()
        self.busy_since = now if flight else 0.0
        if token != sent:
            raise OSError(f"reply for token {token}, expected {sent}")
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

