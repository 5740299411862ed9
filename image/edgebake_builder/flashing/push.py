"""`invoke push-model`: a technician's laptop sends a signed bundle to one unit over SSH.

The bundle is copied to /data/incoming under a temporary name and renamed when complete, so
a dropped connection never leaves a half bundle that looks whole; then the unit's own
`edgebake-update apply` checks and installs it. Nothing is trusted on the laptop's side.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from ..errors import BuildError

INCOMING = "/data/incoming"
SSH_TIMEOUT_SEC = 600


def ssh_options(port: int, identity: str) -> list[str]:
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=10",
               "-o", "ServerAliveCountMax=3"]
    if identity:
        options += ["-i", identity]
    return options


def connection(host: str, bundle: Path, port: int, user: str, identity: str,
               extra_options: list[str] | None) -> tuple[list[str], str]:
    """SSH options and user@host for sending `bundle`, which must exist."""
    if not bundle.is_file():
        raise BuildError(f"{bundle}: bundle not found")
    return [*ssh_options(port, identity), *(extra_options or [])], f"{user}@{host}"


def push_bundle(host: str, bundle: Path, port: int = 22, user: str = "root",
                identity: str = "", allow_rollback: bool = False,
                extra_options: list[str] | None = None) -> str:
    """Copy, then apply on the unit; returns the unit's one-line answer."""
    options, target = connection(host, bundle, port, user, identity, extra_options)
    # a fixed name on the unit: the bundle's own file name never reaches a remote shell
    final = f"{INCOMING}/pushed.ebundle"
    partial = f"{final}.part"
    made = subprocess.run(["ssh", "-p", str(port), *options, target,
                           # what an earlier push left when its connection or power was cut
                           f"mkdir -p {INCOMING} && chmod 700 {INCOMING} && "
                           f"rm -f {INCOMING}/*.ebundle {INCOMING}/*.part"],
                          capture_output=True, text=True, check=False, timeout=120)
    if made.returncode != 0:
        raise BuildError(f"{host}: cannot reach the unit over SSH or create {INCOMING}: "
                         f"{made.stderr.strip()[-300:]}")
    copy = subprocess.run(["scp", "-q", "-s", "-P", str(port), *options, str(bundle),
                           f"{target}:{partial}"], capture_output=True, text=True,
                          check=False, timeout=SSH_TIMEOUT_SEC)
    if copy.returncode != 0:
        raise BuildError(f"{host}: copying {bundle.name} failed: {copy.stderr.strip()[-300:]}")
    flag = " --allow-rollback" if allow_rollback else ""
    command = (f"mv {shlex.quote(partial)} {shlex.quote(final)} && "
               f"edgebake-update apply {shlex.quote(final)}{flag}; code=$?; "
               f"rm -f {shlex.quote(final)}; exit $code")
    result = subprocess.run(["ssh", "-p", str(port), *options, target, command],
                            capture_output=True, text=True, check=False,
                            timeout=SSH_TIMEOUT_SEC)
    answer = (result.stdout.strip() or result.stderr.strip()).splitlines()
    line = answer[-1] if answer else f"no answer (ssh exited {result.returncode})"
    if result.returncode != 0:
        raise BuildError(f"{host}: {line}")
    return f"{host}: {line}"

