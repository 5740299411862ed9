"""An MLflow tracking and registry server on the host's loopback, with SQLite and a local
artifact folder: what `invoke registry-serve` runs for people trying the loop, and what the
tests talk to (a real server, not a mock)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from ..convert.toolchain import python_for
from ..errors import BuildError
from ..hostcmd import die_with_parent
from ..validate.qemu import free_port
from .client import check_answers

START_TIMEOUT_SEC = 180.0


class RegistryServer:
    def __init__(self, proc: subprocess.Popen[bytes], uri: str, log: Path) -> None:
        self.proc = proc
        self.uri = uri
        self.log = log

    @classmethod
    def start(cls, folder: Path, port: int = 0, say: Any = print) -> RegistryServer:
        """Serve `folder`/mlflow.db and `folder`/artifacts on 127.0.0.1, once it answers."""
        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        python = python_for("mlflow", say)
        port = port or free_port()
        log = folder / "server.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(python), "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", str(folder / "artifacts")],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent)  # nothing left serving if we are killed
        server = cls(proc, f"http://127.0.0.1:{port}", log)
        server._wait_until_it_answers()
        return server

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SEC
        while True:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise BuildError(f"the MLflow server exited ({self.proc.returncode}): "
                                 f"{tail[0][:300] if tail else 'no output'} (see {self.log})")
            try:
                check_answers(self.uri, timeout=2)
                return
            except BuildError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BuildError(f"the MLflow server did not answer in "
                                     f"{START_TIMEOUT_SEC:.0f} s (see {self.log})") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """The server and its workers (one process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> RegistryServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
