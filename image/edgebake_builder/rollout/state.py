"""A rollout's state, kept in a file beside the operator so that `--resume` goes on after
their laptop slept, `--status` prints it, and `--abort` knows whom to roll back. Written
atomically after every change."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgebake_runtime.atomic import write_atomic

from ..errors import BuildError

STATE_FORMAT = 1
# A unit's outcome: waiting (not ordered yet), ordered, trial (took it, in its health window),
# then confirmed or failed; `rolled-back` after an abort.
UNDECIDED = ("ordered", "trial")


@dataclass
class UnitRecord:
    device: str
    stage: int  # index into RolloutState.ends
    outcome: str = "waiting"
    reason: str = ""
    seq: int = 0  # the order's number, which the unit's answers carry
    ordered_at: float = 0.0
    decided_at: float = 0.0


@dataclass
class RolloutState:
    bundle_sha256: str
    bundle_path: str
    version: str
    target: str
    stages: list[str]
    ends: list[int]
    max_failures: int
    window_sec: float
    deadline_sec: float
    units: list[UnitRecord]
    phase: str = "running"  # running, stopped (too many failures), done, aborted
    started: float = field(default_factory=time.time)
    note: str = ""

    def count(self, *outcomes: str) -> int:
        return sum(u.outcome in outcomes for u in self.units)

    def in_stage(self, index: int) -> list[UnitRecord]:
        return [u for u in self.units if u.stage == index]

    def save(self, path: Path) -> None:
        data = {"format": STATE_FORMAT, **asdict(self)}
        write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def load_state(path: Path) -> RolloutState:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        if data.pop("format", None) != STATE_FORMAT:
            raise ValueError(f"expected format {STATE_FORMAT}")
        units = [UnitRecord(**u) for u in data.pop("units")]
        return RolloutState(units=units, **data)
    except FileNotFoundError:
        raise BuildError(f"{path}: no rollout state here (start one without --resume)") \
            from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BuildError(f"{path}: not a rollout state file: {exc}") from None


def default_state_path(bundle: Path) -> Path:
    return bundle.with_name(bundle.name + ".rollout.json")


def table(state: RolloutState) -> str:
    now = time.time()
    rows = [("stage", "unit", "outcome", "when", "reason")]
    for unit in state.units:
        stamp = unit.decided_at or unit.ordered_at
        when = f"{(now - stamp) / 60:.0f} min ago" if stamp else "-"
        rows.append((f"{unit.stage + 1}/{len(state.ends)}", unit.device, unit.outcome, when,
                     unit.reason[:100]))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"rollout of {state.version} ({state.bundle_path}): {state.phase}; "
             f"{state.count('confirmed')} confirmed, {state.count('failed')} failed "
             f"(at most {state.max_failures}), {state.count(*UNDECIDED)} waiting for a "
             f"verdict, {state.count('waiting')} not ordered, "
             f"{state.count('rolled-back')} rolled back"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4]
              for r in rows]
    if state.note:
        lines.append(state.note)
    return "\n".join(lines)
