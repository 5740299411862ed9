"""Step: run the model inside the target rootfs with the shipped Python and tflite-runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..progress import Progress
from .install import APP_ROOT
from .rootfs import run_in_target


def verify_on_target(rootfs: Path, model_path: Path, card_path: Path,
                     progress: Progress) -> dict[str, Any]:
    """Fail the build if the model does not load or its golden outputs drift on the target."""
    result = run_in_target(rootfs, [str(APP_ROOT / "bin" / "edgebake-selfcheck"),
                                    "--model", str(model_path), "--card", str(card_path)],
                           progress, what="model self-check")
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise BuildError("model check inside the target rootfs did not run: "
                         + " | ".join(tail))
    report: dict[str, Any] = json.loads(lines[-1])
    if not report.get("ok"):
        raise BuildError(f"model fails on the target runtime ({report.get('runtime')} "
                         f"{report.get('runtime_version')}): {report.get('error')}")
    worst = report.get("max_deviation", {})
    progress.say(f"      target runtime {report['runtime']} {report['runtime_version']}: "
                 f"{report.get('cases')} golden cases match "
                 f"(largest deviation {worst.get('abs', 0):.3g})")
    return report
