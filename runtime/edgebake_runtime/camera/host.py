"""The service's side of a camera process (`camera.child`): one source and its interpreter.

To the service it is both a source and a worker: `stats` mirrors the source's state as the
process reports it, `queue` its latest-frame queue, and `alive()`/`busy_since` say what a
worker's say. Lines the process sends go straight into the journal, one write per message.

Failures: a process that exits or is killed is replaced (with backoff) and counted; until its
replacement is ready it is not alive, so the unit is not healthy, and its source shows as
down with the reason. A process that hangs in invoke reports `busy_since`; a process that
stops reporting at all (SIGSTOP, a hang that holds the GIL) counts as busy from its last
status on. Either way the watchdog check turns it into "stuck" and the pings stop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..card import Card
from ..config import SourceConfig
from ..metrics import Metrics
from ..sources.base import SourceStats
from . import wire
from .link import ChildLink, WorkerStartError

log = logging.getLogger("edgebake.camera")

# The process reports every 0.25 s; silent for this long, it counts as busy since it last spoke.
SILENT_SEC = 2.0
# Loading a model takes seconds; a process that has not switched after this long is hung.
MODEL_TIMEOUT_SEC = 30.0


class QueueMirror:
    """What /health shows of a camera process's queue: its depth and drops, as reported."""

    def __init__(self) -> None:
        self.depth = 0
        self.dropped = 0
        self._dropped_before = 0  # drops of processes that are gone

    def __len__(self) -> int:
        return self.depth

    def report(self, depth: int, drops: int) -> None:
        """What the running process says of its queue (its drops count from its start)."""
        self.depth = depth
        self.dropped = self._dropped_before + drops

    def process_gone(self) -> None:
        """Its frames went with it; the drops it had counted stay counted."""
        self._dropped_before = self.dropped
        self.depth = 0


class CameraProcess(ChildLink):
    what = "camera process"

    def __init__(self, index: int, config: SourceConfig, model: Path, card: Card,
                 num_threads: int, depth: int, threshold: float | None, top_k: int,
                 write_lines: Callable[[bytes, int, float], None], metrics: Metrics) -> None:
        super().__init__()
        self.label = f"camera {config.name}"
        self.index = index
        self.config = config
        self.name = config.name
        self.model = model
        self.card = card
        self.num_threads = num_threads
        self.depth = depth
        self.threshold = threshold
        self.top_k = top_k
        self.write_lines = write_lines
        self.metrics = metrics
        self.decode_beside = False  # the service sets it: True while a core is free for it
        self.samples_spec: dict[str, Any] | None = None  # the service sets it when samples are on
        # busy in one invoke or silent for longer than this, it is hung (the service sets the
        # health verdict's own limit, watchdog.stall_sec: a slow model on a loaded unit is not)
        self.hung_after = 15.0
        self.samples: dict[str, Any] = {}  # the sample keepers' counters, over every process
        self.stats = SourceStats()
        self.queue = QueueMirror()
        self.last_done = time.monotonic()
        self.processed = 0
        self.lost_frames = 0
        self.serving = ""  # the model version the process reports it runs
        self._busy_reported = 0.0
        self._heard = 0.0
        self._seen: dict[str, int] = {}  # the running process's counters, as last reported
        self._reconnects = 0  # of the sources of every process so far
        self._answer: dict[str, Any] | None = None
        self._answered = threading.Event()
        self._order_lock = threading.Lock()
        self.preview = b""  # the newest preview JPEG the process sent
        self.preview_at = 0.0  # when it came (time.monotonic()); 0: none yet
        self._preview_arrived = threading.Condition()
        self._preview_asked = (0.0, 0.0)  # (when, fps) of the last WANT_PREVIEW sent

    # --- the process ----------------------------------------------------------------
    def spawn(self) -> None:
        """Start the process and wait until it has loaded the model (or says why not)."""
        self.launch()
        self.await_ready()

    def launch(self) -> None:
        """Start the process; `await_ready` then waits for it (several load side by side)."""
        spec = {"index": self.index, "source": dataclasses.asdict(self.config),
                "model": str(self.model), "card": str(self.card.path),
                "version": self.card.version, "threads": self.num_threads,
                "threshold": self.threshold, "top_k": self.top_k, "depth": self.depth,
                "decode_beside": self.decode_beside, "samples": self.samples_spec}
        self._launch("edgebake_runtime.camera.child", [json.dumps(spec)])

    def await_ready(self) -> None:
        self._await_ready()
        self._seen = {}
        self._heard = time.monotonic()

    @property
    def busy_since(self) -> float:
        """When the process began the invoke it is still in, or since when it is silent."""
        if self._ready and time.monotonic() - self._heard > SILENT_SEC:
            return self._heard
        return self._busy_reported

    # --- the reader thread -------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if not self._ready:
            self.spawn()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to stop (its last lines still arrive), then make sure it has."""
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(wire.STOP)
        if self._thread is not None:
            self._thread.join(timeout)
        self._kill()
        self.stats.state = "stopped"

    def _run(self) -> None:
        self._keep_running(self._serve)

    def _start_failed(self, error: str) -> None:
        self.stats.last_error = f"camera process: {error}"[:300]

    def _lost(self) -> None:
        self.lost_frames += self.queue.depth + (1 if self._busy_reported else 0)
        self.stats.state = "down"
        self.stats.last_error = f"camera process: {self.last_error}; restarting"
        self._busy_reported = 0.0
        self.queue.process_gone()

    def _serve(self) -> None:
        """Take the process's messages until it ends; raises when it is gone unasked."""
        sock = self._sock
        assert sock is not None
        while True:
            if not select.select([sock], [], [], SILENT_SEC)[0]:
                if self._proc is not None and self._proc.poll() is not None:
                    raise EOFError("camera process exited")
                continue
            message = sock.recv(wire.MAX_MESSAGE)
            if not message:
                if self._stop.is_set():
                    return
                raise EOFError("camera process closed its socket")
            self._heard = time.monotonic()
            kind = message[:1]
            if kind == wire.LINES:
                self._take_lines(message)
            elif kind == wire.STATUS:
                self._take_status(wire.CameraStatus.decode(message))
            elif kind == wire.PREVIEW:
                with self._preview_arrived:
                    self.preview, self.preview_at = message[len(wire.PREVIEW):], self._heard
                    self._preview_arrived.notify_all()
            elif kind == wire.MODEL_DONE:
                self._answer = json.loads(message[1:])
                self._answered.set()
            else:
                raise ValueError(f"unknown message {message[:8]!r} from the camera process")

    def _take_lines(self, message: bytes) -> None:
        meta, block, errors = wire.parse_lines(message)
        self.metrics.inference_errors += self._grown("errors", errors)
        if not meta:
            return
        self.write_lines(block, len(meta), meta[-1][1])
        now = time.monotonic()
        for captured_at, _, seconds in meta:
            self.metrics.inference.add(seconds)
            self.metrics.end_to_end.add(now - captured_at)
        self.metrics.count_results(len(meta))
        self.last_done = now

    def _grown(self, key: str, value: int) -> int:
        """How much a counter of the running process grew since it was last reported."""
        delta = max(0, value - self._seen.get(key, 0))
        self._seen[key] = value
        return delta

    def _take_status(self, status: wire.CameraStatus) -> None:
        st = self.stats
        st.state = status.state
        st.fps = status.fps
        if status.last_frame:
            st.last_frame_monotonic = status.last_frame
        st.last_error = status.source_error
        st.frame_size = status.size
        st.frames += self._grown("frames", status.frames)
        st.corrupt_frames += self._grown("corrupt", status.corrupt)
        self._reconnects += self._grown("reconnects", status.reconnects)
        st.reconnects = self._reconnects + self.restarts
        self.processed += self._grown("processed", status.processed)
        self.queue.report(status.depth, status.drops)
        self._busy_reported = status.busy_since
        self.serving = status.version
        self.metrics.switch_drops += self._grown("switch_drops", status.switch_drops)
        for key, value in status.samples.items():
            if isinstance(value, int):
                self.samples[key] = self.samples.get(key, 0) + self._grown(f"samples.{key}",
                                                                           value)
            else:
                self.samples[key] = value
        self.metrics.inference_errors += self._grown("errors", status.errors)
        if status.last_error:
            self.last_error = status.last_error

    # --- model switch ------------------------------------------------------------------
    def switch(self, model: Path, card: Card, threads: int | None = None,
               timeout: float = MODEL_TIMEOUT_SEC) -> None:
        """Have the process load `model` (with `threads` interpreter threads, or as many as
        now) beside the running one and switch to it; raises WorkerStartError (the old model
        still running) when the model does not load.

        A process that is hung (silent, or stuck in an invoke) cannot switch, and a model
        rolled back is often the reason it hangs: it is replaced by a process that starts
        with the new model."""
        with self._order_lock:
            old_threads = self.num_threads
            self.num_threads = threads or self.num_threads  # also for a replacement process
            sock = self._sock
            hung = self.hung()
            if sock is None or not self._ready or hung:
                self._replace(model, card, f"{hung or 'gone'} at a model switch")
                return
            self._answered.clear()
            order = {"model": str(model), "card": str(card.path), "version": card.version,
                     "threads": self.num_threads}
            try:
                sock.send(wire.MODEL + json.dumps(order).encode())
            except OSError:
                self._replace(model, card, "gone at a model switch")
                return
            # the answer comes once the invoke under way ends (within hung_after) and the
            # model has loaded (within timeout)
            if not self._answered.wait(timeout + self.hung_after):
                self._replace(model, card, "no answer to a model switch in "
                              f"{timeout + self.hung_after:.0f}s")
                return
            answer = self._answer or {}
            if answer.get("error"):
                self.num_threads = old_threads
                raise WorkerStartError(f"camera {self.name}: {answer['error']}")
            self.model, self.card = model, card

    def hung(self) -> str:
        """Why the process counts as hung ("" when it does not): silent, or in one invoke,
        for longer than `hung_after`. A long invoke of a slow model on a loaded unit is not
        a hang: the process answers a switch once the invoke ends."""
        now = time.monotonic()
        busy = self._busy_reported
        if now - self._heard > self.hung_after:
            return f"silent for {now - self._heard:.0f}s"
        if busy and now - busy > self.hung_after:
            return f"in one invoke for {now - busy:.0f}s"
        return ""

    def _replace(self, model: Path, card: Card, why: str) -> None:
        """End the process; the reader thread starts the next one, with `model`."""
        self.model, self.card = model, card
        log.warning("camera %s: process %d %s; replacing it", self.name, self.pid, why)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def set_decode_beside(self, beside: bool) -> None:
        """Decode in a thread of its own (a core is free for it) or inline; kept for the
        process that replaces this one."""
        if beside == self.decode_beside:
            return
        self.decode_beside = beside
        sock = self._sock
        if sock is not None and self._ready:
            with contextlib.suppress(OSError):  # a broken pipe is the reader's to handle
                sock.send(wire.DECODE_BESIDE + (b"1" if beside else b"0"))

    def request_samples(self, count: int) -> None:
        """Keep the next `count` frames of this camera as samples."""
        sock = self._sock
        if sock is not None and self._ready:
            with contextlib.suppress(OSError):
                sock.send(wire.SAMPLES + str(count).encode())

    def want_preview(self, fps: float) -> None:
        """Ask the process for previews (`fps` a second at most) for a while longer; asked
        again at most once a second, or at once for a higher rate."""
        now = time.monotonic()
        asked_at, asked_fps = self._preview_asked
        sock = self._sock
        if sock is None or not self._ready or (now - asked_at < 1.0 and fps <= asked_fps):
            return
        self._preview_asked = (now, fps)
        with contextlib.suppress(OSError):  # a process too busy to read misses one ask
            sock.send(wire.WANT_PREVIEW + f"{fps:g}".encode(), socket.MSG_DONTWAIT)

    def newer_preview(self, than: float, fps: float, timeout: float) -> tuple[bytes, float]:
        """A preview that came after `than` (time.monotonic()), waiting up to `timeout`
        for one: (jpeg, when), or (b"", 0.0) when none came."""
        deadline = time.monotonic() + timeout
        with self._preview_arrived:
            while self.preview_at <= than:
                self.want_preview(fps)
                left = deadline - time.monotonic()
                if left <= 0:
                    return b"", 0.0
                self._preview_arrived.wait(min(left, 1.0))
            return self.preview, self.preview_at

    def process_stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "alive": self.alive(), "restarts": self.restarts,
                "processed": self.processed, "lost_frames": self.lost_frames,
                "last_error": self.last_error, "source": self.name, "model": self.serving,
                "decoding": "beside inference" if self.decode_beside else "inline",
                "threads": self.num_threads}
