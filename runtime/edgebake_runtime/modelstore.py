"""Model slots on /data: the models a unit received after it was flashed, and which one runs.

    /data/models/slots/<version>/   model.tflite, its card and golden file, the signed
                                    manifest and its signature, written whole
    /data/models/state.json         {"current", "previous", "trial": {...} or null, "floor",
                                     "revoked": [key ids], "order_seq"}
    /data/models/audit.log          one JSON line per step, fsynced

No slot (or state) means the model baked into the image runs. A new slot is written into a
temp folder, fsynced and renamed, and only then named in state.json (itself replaced
atomically), so a power cut leaves either the old model or the new one. A model on trial
records when and in which boot its health window started; the service confirms it when the
window passes healthy, and rolls back to `previous` when it does not, when inference errors
rise, or when the unit rebooted inside the window.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import fsync_dir, write_atomic
from .bundle import VERSION, Bundle, BundleError, version_key

log = logging.getLogger("edgebake.update")
KEEP_SLOTS = 3
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,120}")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class Slot:
    version: str
    model: Path
    card: Path


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots = root / "slots"
        self.state_path = root / "state.json"
        self.audit_path = root / "audit.log"
        # state.json is read, changed and replaced by several threads (trial, orders, pull)
        self.changing = threading.RLock()

    # --- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"current": None, "previous": None, "trial": None}
        return data if isinstance(data, dict) else {"current": None, "previous": None,
                                                    "trial": None}

    def _write_state(self, state: dict[str, Any]) -> None:
        write_atomic(self.state_path, json.dumps(state, indent=1, sort_keys=True).encode())
        self._own(self.state_path)

    def _own(self, *paths: Path) -> None:
        """Files written by root (edgebake-update over SSH) go to the folder's owner, the
        service account, which must be able to confirm, roll back and audit later."""
        if os.geteuid() != 0 or not self.root.is_dir():
            return
        owner = self.root.stat()
        for path in paths:
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
            # never into a linked folder: a link the service planted must not make root
            # hand it files elsewhere
            for folder, dirs, files in os.walk(path, followlinks=False):
                for name in (*dirs, *files):
                    os.chown(os.path.join(folder, name), owner.st_uid, owner.st_gid,
                             follow_symlinks=False)

    def audit(self, step: str, **fields: Any) -> None:
        """One fsynced line; a failure to log is reported, never fatal to the caller."""
        line = json.dumps({"ts": round(time.time(), 3), "step": step, **fields},
                          sort_keys=True) + "\n"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.audit_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                         | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._own(self.audit_path)
        except OSError as exc:
            log.error("model audit log %s: %s (step %s)", self.audit_path, exc, step)

    def slot(self, version: str | None) -> Slot | None:
        if not version:
            return None
        folder = self.slots / version
        cards = sorted(folder.glob("*.card.json"))
        models = sorted(folder.glob("*.tflite"))
        if len(cards) != 1 or len(models) != 1:
            return None
        return Slot(version, models[0], cards[0])

    def current(self) -> Slot | None:
        return self.slot(self.state().get("current"))

    # --- changes ---------------------------------------------------------------------------
    def write_slot(self, bundle: Bundle) -> Slot:
        """The bundle's members in slots/<version>/, whole or not at all."""
        version = bundle.version
        version_key(version)
        card = json.loads(bundle.members["model.card.json"])
        golden = str((card.get("golden") or {}).get("file", "model.golden.npz"))
        if not SAFE_NAME.fullmatch(golden):
            raise ValueError(f"card golden.file {golden!r}: expected a plain file name")
        names = {"model.tflite": "model.tflite", "model.card.json": "model.card.json",
                 "model.golden.npz": golden, "manifest.json": "manifest.json",
                 "manifest.sig": "manifest.sig"}
        self.slots.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".incoming",
                                     dir=self.slots))
        for member, name in names.items():
            write_atomic(temp / name, bundle.members[member])
        fsync_dir(temp)
        final = self.slots / version
        if final.is_symlink() or final.is_file():
            final.unlink()
        elif final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        fsync_dir(self.slots)
        self._own(self.slots)
        slot = self.slot(version)
        assert slot is not None
        return slot

    def start_trial(self, version: str, window_sec: float, order_seq: int = 0) -> None:
        with self.changing:
            state = self.state()
            self._write_state({**state, "current": version, "previous": state.get("current"),
                               "trial": {"version": version, "started": time.time(),
                                         "boot_id": boot_id(), "window_sec": window_sec,
                                         "order": order_seq}})

    def confirm(self) -> None:
        """The model on trial passed its window; its version becomes the floor no update may
        go below (unless a rollback is asked for)."""
        with self.changing:
            state = self.state()
            trial = state.get("trial")
            if trial:
                self._write_state({**state, "trial": None,
                                   "floor": _newer(state.get("floor"), trial.get("version"))})
                self.prune()

    def remember(self, **fields: Any) -> None:
        """Fields kept across every later change: revoked keys, the last order's number."""
        with self.changing:
            self._write_state({**self.state(), **fields})

    def rollback(self) -> str | None:
        """Go back to the previous model (None: the image's own); returns what now runs."""
        with self.changing:
            state = self.state()
            previous = state.get("previous")
            self._write_state({**state, "current": previous, "previous": None, "trial": None})
            return previous if isinstance(previous, str) else None

    def prune(self) -> None:
        """Keep the current, the previous and the newest others, up to KEEP_SLOTS."""
        state = self.state()
        keep = {state.get("current"), state.get("previous")}
        found = sorted((p.name for p in self.slots.glob("*") if p.is_dir()
                        and not p.name.startswith(".")), key=_sort_key, reverse=True)
        for name in found:
            if name in keep:
                continue
            if len(keep - {None}) < KEEP_SLOTS:
                keep.add(name)
                continue
            shutil.rmtree(self.slots / name, ignore_errors=True)


def _sort_key(name: str) -> tuple[int, ...]:
    try:
        return version_key(name)
    except BundleError:
        return (-1,)


def _newer(floor: Any, version: Any) -> str | None:
    """The newer of two versions (either may be missing or malformed: it is left out)."""
    found = [v for v in (floor, version) if isinstance(v, str) and VERSION.fullmatch(v)]
    return max(found, key=version_key) if found else None

