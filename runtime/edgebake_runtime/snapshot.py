"""The /health payload (also sent to the MQTT health topic): every figure a technician or
the fleet needs to see what a unit is doing, as plain JSON."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from .camera.host import CameraProcess
from .card import Card
from .metrics import Metrics

SYSTEM_STATUS = Path("/data/os/status.json")
VERSION_FILE = Path("/etc/edgebake/version")


def _ms(value: float | None) -> float | None:
    return round(value * 1000, 3) if value is not None else None


def sources(cameras: list[CameraProcess], now: float) -> dict[str, Any]:
    result = {}
    for camera in cameras:
        st = camera.stats
        age = st.frame_age(now)
        result[camera.name] = {
            "kind": camera.config.kind, "state": st.state, "device": camera.config.device,
            "fps": round(st.fps, 2), "frames": st.frames,
            "last_frame_age_sec": round(age, 3) if age is not None else None,
            "queue_depth": len(camera.queue), "drops": camera.queue.dropped,
            "corrupt_frames": st.corrupt_frames, "reconnects": st.reconnects,
            "frame_size": list(st.frame_size) if st.frame_size else None,
            "last_error": st.last_error}
    return result


def inference(cameras: list[CameraProcess], metrics: Metrics) -> dict[str, Any]:
    timing, end_to_end = metrics.inference, metrics.end_to_end
    return {"workers": len(cameras), "results": metrics.results,
            "errors": metrics.inference_errors,
            "switch_drops": metrics.switch_drops,
            "p50_ms": _ms(timing.percentile(50)), "p99_ms": _ms(timing.percentile(99)),
            "end_to_end_p50_ms": _ms(end_to_end.percentile(50)),
            "end_to_end_p99_ms": _ms(end_to_end.percentile(99)),
            "worker_restarts": sum(c.restarts for c in cameras),
            "processes": [c.process_stats() for c in cameras]}


def model(card: Card, path: str, swaps: int, trial: Any, last_switch_sec: float | None,
          runtime: tuple[str, str]) -> dict[str, Any]:
    return {"version": card.version, "sha256": card.sha256, "task": card.task, "path": path,
            "registry": card.data.get("registry"),
            "swaps": swaps, "trial": trial, "last_switch_sec": last_switch_sec,
            "runtime": runtime[0], "runtime_version": runtime[1]}


def system(status_file: Path = SYSTEM_STATUS, version_file: Path = VERSION_FILE,
           cmdline: Path = Path("/proc/cmdline"),
           sbom_file: Path = Path("/usr/share/edgebake/sbom.sha256")) -> dict[str, Any]:
    """The system's version and, on an A/B unit, the booted slot, both slots' versions and
    the system update in flight and the last bundles refused (edgebake-os keeps that file;
    the service only reads it)."""
    data: Any = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(status_file.read_text())
    if not isinstance(data, dict):
        data = {}
    version = "unknown"
    with contextlib.suppress(OSError):
        version = version_file.read_text().strip()
    booted = None
    with contextlib.suppress(OSError):
        found = re.search(r"\brauc\.slot=([AB])\b", cmdline.read_text())
        booted = found.group(1) if found else None
    sbom = None
    with contextlib.suppress(OSError):
        sbom = sbom_file.read_text().strip() or None
    return {"version": version, "layout": "ab" if booted else "single", "booted": booted,
            "slots": data.get("slots", {}), "update": data.get("update") or None,
            "refused": data.get("refused") or None, "refusals": data.get("refusals") or [],
            "sbom_sha256": sbom}
