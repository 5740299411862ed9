"""Helpers for tests that run the project's tools as a user does: paths and invoke tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INVOKE = [sys.executable, "-m", "invoke"]


def invoke(*args: str) -> subprocess.CompletedProcess[str]:
    """An invoke task as a user runs it, from the repository root, output captured."""
    return subprocess.run([*INVOKE, *args], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def partition_table(image: Path) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "-J", str(image)], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out)["partitiontable"])


def broker_args(broker: Any) -> list[str]:
    """A TLS LocalBroker's address and login as the broker tasks take them."""
    assert broker.tls is not None
    return ["--broker", "127.0.0.1", "--port", str(broker.port), "--username",
            broker.tls.username, "--password", broker.tls.password, "--ca-file",
            str(broker.tls.ca_file)]
