"""The timing table `invoke test` prints at its end: each phase's wall time, and the slowest
checks across every pytest run (from their JUnit reports), so that CI's minutes are known
before anyone tries to cut them."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Check:
    name: str
    seconds: float
    outcome: str  # passed, failed, error, skipped


def read_junit(path: Path) -> list[Check]:
    """Every test case of a JUnit report (none when the run wrote no report)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    checks = []
    for case in root.iter("testcase"):
        outcome = next((kind for kind in ("failure", "error", "skipped")
                        if case.find(kind) is not None), "passed")
        checks.append(Check(f"{case.get('classname', '')}::{case.get('name', '')}",
                            float(case.get("time", 0.0)),
                            {"failure": "failed"}.get(outcome, outcome)))
    return checks


def table(phases: list[tuple[str, float, list[Check]]], slowest: int = 10) -> str:
    """Phases as (name, wall seconds, their checks), then the slowest checks overall."""
    lines = ["timing", f"  {'phase':44} {'wall':>8}  checks (passed/failed/skipped)"]
    for name, seconds, checks in phases:
        counts = "/".join(str(sum(c.outcome == kind for c in checks))
                          for kind in ("passed", "failed", "skipped"))
        lines.append(f"  {name:44} {_clock(seconds):>8}  {len(checks)} ({counts})")
    lines.append(f"  {'total':44} {_clock(sum(p[1] for p in phases)):>8}")
    every = sorted((c for _, _, checks in phases for c in checks), key=lambda c: -c.seconds)
    if every:
        lines.append(f"  slowest {min(slowest, len(every))} checks:")
        lines.extend(f"    {_clock(c.seconds):>8}  {c.name}" for c in every[:slowest])
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"
