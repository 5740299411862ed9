"""What `edgebake-os` keeps in /data/os: the update in flight, the audit lines, the last
refusal and the status `/health` shows (the service only reads that)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .atomic import write_atomic

STATE_DIR = Path("/data/os")
# refusals kept for /health: a later one (a stick read again during a trial, say) must not
# hide why the one before it was refused; the audit log keeps them all
REFUSALS_KEPT = 5


class OsUpdateError(Exception):
    """One line for the caller; nothing was changed."""


class OsState:
    """What /data/os holds: the update in flight (`update.json`), the audit lines, and the
    status that `/health` shows (`status.json`)."""

    def __init__(self, root: Path = STATE_DIR) -> None:
        self.root = root

    def update(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / "update.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def set_update(self, **fields: Any) -> dict[str, Any]:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        data = {**fields, "at": round(time.time(), 1)}
        write_atomic(self.root / "update.json", json.dumps(data, indent=1).encode())
        return data

    def audit(self, step: str, **fields: Any) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        line = json.dumps({"ts": round(time.time(), 3), "step": step, **fields},
                          sort_keys=True) + "\n"
        with (self.root / "audit.jsonl").open("a") as out:
            out.write(line)
            out.flush()
            os.fsync(out.fileno())

    def audit_tail(self, lines: int = 5) -> list[dict[str, Any]]:
        try:
            text = (self.root / "audit.jsonl").read_text().splitlines()[-lines:]
        except OSError:
            return []
        return [json.loads(x) for x in text if x.startswith("{")]

    def refuse(self, reason: str, **fields: Any) -> OsUpdateError:
        """Audit a refusal and keep it, with the few before it, for `/health`
        (`system.refused`, `system.refusals`); the error to raise."""
        self.audit("os-refused", reason=reason, **fields)
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        kept = [*self.refusals(), {**fields, "reason": reason, "at": round(time.time(), 1)}]
        write_atomic(self.root / "refused.json",
                     json.dumps(kept[-REFUSALS_KEPT:]).encode(), 0o644)
        return OsUpdateError(f"refused: {reason}")

    def refusals(self) -> list[dict[str, Any]]:
        """The last REFUSALS_KEPT refusals, oldest first (a file from before the list held
        one refusal)."""
        data: Any = None
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((self.root / "refused.json").read_text())
        kept = data if isinstance(data, list) else [data]
        return [x for x in kept if isinstance(x, dict)][-REFUSALS_KEPT:]

    def publish_status(self, status: dict[str, Any]) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_atomic(self.root / "status.json", json.dumps(status, indent=1).encode(), 0o644)
