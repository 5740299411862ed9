"""Runs host commands with their output in the build log and a heartbeat on the terminal."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import BuildError
from .progress import Progress

HEARTBEAT_SECONDS = 20.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """For `preexec_fn`: the child gets SIGTERM when the process that started it ends, even
    by SIGKILL, so a test run killed outright leaves no unit or server running behind it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def run(cmd: Sequence[str | Path], progress: Progress, *, env: Mapping[str, str] | None = None,
        cwd: Path | None = None, what: str | None = None,
        on_line: Callable[[str], None] | None = None) -> str:
    """Run `cmd`, log every output line (and hand it to `on_line`), and return its
    stdout+stderr; fail with the log's tail."""
    argv = [str(part) for part in cmd]
    progress.log("$ " + " ".join(argv))
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    began = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd,
                            env=full_env, text=True, errors="replace")
    lines: list[str] = []
    last_line = [""]
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_SECONDS):
            progress.heartbeat(last_line[0] or argv[0], began)

    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            progress.log(line)
            if on_line is not None:
                on_line(line)
            if line.strip():
                last_line[0] = line.strip()
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        done.set()
    output = "".join(lines)
    if code != 0:
        tail = "".join(lines[-15:]).rstrip()
        label = what or argv[0]
        raise BuildError(f"{label} failed with exit code {code}; last output:\n{tail}\n"
                         f"(full log: {progress.log_path})")
    return output


def capture(cmd: Sequence[str | Path], *, cwd: Path | None = None) -> str:
    """Run a quick query command and return stdout; raise BuildError naming it on failure."""
    argv = [str(part) for part in cmd]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed: {result.stderr.strip()[-400:]}")
    return result.stdout
