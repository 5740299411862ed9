"""The service's link to a camera process: its start, its socket, its end and its restarts.

Starting one with its end of an AF_UNIX SOCK_SEQPACKET pair, waiting for it to say it is
ready (`wire.READY`, or why not), replacing it with backoff when it dies, and ending it so
that no zombie and no socket stays behind.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from ..supervise import Backoff
from . import wire

log = logging.getLogger("edgebake.camera")

START_TIMEOUT_SEC = 120.0
BACKOFF_START_SEC = 1.0
BACKOFF_MAX_SEC = 30.0
# A process that ran this long before it died is restarted at once: it did not crash-loop.
RAN_WELL_SEC = 2 * BACKOFF_MAX_SEC


class WorkerStartError(Exception):
    """The process could not load the model; the message says why."""


class ChildLink:
    """The process, the service's end of its socket, and whether it said it is ready."""

    what = "camera process"  # for messages

    def __init__(self) -> None:
        self.label = self.what  # in the log: "camera front"
        self.restarts = 0
        self.last_error = ""
        self._stop = threading.Event()
        self.pid = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._thread: threading.Thread | None = None  # the service's thread for it

    def _launch(self, module: str, args: list[str]) -> None:
        """Start `python -m module`; its end of the socket is the first argument."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", module, str(theirs.fileno()), *args],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._sock = ours

    def _await_ready(self) -> None:
        """Wait until the process has loaded its model; WorkerStartError says why not."""
        ours, proc = self._sock, self._proc
        assert ours is not None and proc is not None, "launch first"
        if not select.select([ours], [], [], START_TIMEOUT_SEC)[0]:
            self._kill()
            raise WorkerStartError(f"{self.what} gave no sign in {START_TIMEOUT_SEC:.0f}s")
        try:
            message = ours.recv(wire.MAX_MESSAGE)
        except OSError:
            message = b""
        if not message:
            code = proc.wait()
            self._kill()
            raise WorkerStartError(f"{self.what} exited with {code} while loading")
        if not message.startswith(wire.READY):
            self._kill()
            raise WorkerStartError(message[len(wire.FAILED):].decode(errors="replace"))
        self.pid = int(message[len(wire.READY):])
        self._ready = True

    def _kill(self) -> None:
        self._ready = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def alive(self) -> bool:
        proc = self._proc
        return (self._thread is not None and self._thread.is_alive() and self._ready
                and proc is not None and proc.poll() is None)

    # --- supervision ---------------------------------------------------------------------
    def spawn(self) -> None:
        raise NotImplementedError

    def _start_failed(self, error: str) -> None:
        """A process could not be started (it is retried after a backoff)."""

    def _lost(self) -> None:
        """A running process is gone (it is replaced): account for what it had."""

    def _keep_running(self, serve: Callable[[], None]) -> None:
        """Serve the process until stopped; one that dies or breaks its socket is replaced,
        with backoff when it keeps dying, and counted in `restarts` with the reason."""
        backoff = Backoff(BACKOFF_START_SEC, BACKOFF_MAX_SEC)
        while not self._stop.is_set():
            if not self._ready:
                try:
                    self.spawn()
                    log.info("%s: process %d ready (restart %d)", self.label, self.pid,
                             self.restarts)
                except (WorkerStartError, OSError) as exc:
                    self.last_error = str(exc)
                    self._start_failed(str(exc))
                    log.error("%s: %s; retrying in %.0fs", self.label, exc, backoff.delay)
                    backoff.pause(self._stop)
                    continue
            started = time.monotonic()
            try:
                serve()
            except (EOFError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                code = self._proc.poll() if self._proc is not None else None
                self.restarts += 1
                self.last_error = (f"process {self.pid} exited ({code})" if code is not None
                                   else f"pipe to process {self.pid} failed: {exc}")
                self._lost()
                log.error("%s: %s; starting a new one", self.label, self.last_error)
                self._kill()
                ran_for = time.monotonic() - started
                if ran_for > RAN_WELL_SEC:
                    backoff.reset()  # it did not crash-loop: at once
                elif self.restarts > 1:
                    backoff.pause(self._stop, ran_for)
