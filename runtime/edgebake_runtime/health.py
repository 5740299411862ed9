"""The health verdict: what is wrong with the unit, as a list of problems in plain words.

A problem is "stuck" when something inside the service is stuck or dead (a camera process,
a supervised thread, the journal, frames that arrive but give no results): a restart helps,
so the watchdog pings stop. It is "degraded" when the world is at fault (a camera gone, a
broker down, a full disk): the service keeps running and recovers by itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .camera.host import CameraProcess
from .journal import Journal
from .supervise import Supervised


@dataclass
class Verdict:
    stuck: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.stuck and not self.degraded

    @property
    def restart_helps(self) -> bool:
        return bool(self.stuck)

    def status(self) -> str:
        kind = "stuck" if self.stuck else "degraded"
        return f"{kind}: " + "; ".join(self.stuck + self.degraded)


@dataclass
class Observed:
    """What the verdict is judged from, read at one moment."""

    now: float
    started: float  # when the service started
    stall_sec: float
    switching: bool  # the cameras are switching models: stalls are not judged meanwhile
    last_result_at: float  # the newest result, or the last switch if later
    cameras: list[CameraProcess]
    threads: Iterable[Supervised]
    journal: Journal
    mqtt: Any  # MqttPublisher or None
    http_alive: bool | None  # None: no HTTP server


def judge(seen: Observed) -> Verdict:
    verdict = Verdict()
    fresh = _judge_sources(seen, verdict)
    if not seen.cameras:
        verdict.degraded.append("no camera found; waiting for one")
    for thread in seen.threads:
        if not thread.alive():
            verdict.stuck.append(f"{thread.name} has died")
    _judge_cameras(seen, verdict)
    if fresh and seen.now - seen.last_result_at > seen.stall_sec and not seen.switching:
        verdict.stuck.append(f"frames arrive but no result for "
                             f"{seen.now - seen.last_result_at:.0f}s")
    _judge_sinks(seen, verdict)
    return verdict


def _judge_sources(seen: Observed, verdict: Verdict) -> int:
    """Each camera's source: fresh, stale, down or never seen; returns how many are fresh."""
    fresh = 0
    for camera in seen.cameras:
        st, name = camera.stats, camera.name
        age = st.frame_age(seen.now)
        limit = camera.config.max_age_sec
        if st.state == "finished":
            continue
        if age is None:
            if seen.now - seen.started > limit:
                error = st.last_error
                verdict.degraded.append(f"{name} has delivered no frame ({st.state}"
                                        f"{': ' + error if error else ''})")
        elif age > limit:
            verdict.degraded.append(f"{name} stale for {age:.0f}s ({st.state})")
        elif st.state == "down":
            verdict.degraded.append(f"{name} is down, reconnecting ({st.last_error})")
        else:
            fresh += 1
    return fresh


def _judge_cameras(seen: Observed, verdict: Verdict) -> None:
    """Camera processes: dead, stuck in an invoke, or holding frames they do not infer."""
    now, stall = seen.now, seen.stall_sec
    for camera in seen.cameras:
        if not camera.alive():
            why = camera.last_error
            verdict.stuck.append(f"worker {camera.index} has died" + (f" ({why})" if why else ""))
        elif camera.busy_since and now - camera.busy_since > stall and not seen.switching:
            verdict.stuck.append(f"worker {camera.index} stuck in inference for "
                                 f"{now - camera.busy_since:.0f}s")
    pending = any(len(c.queue) for c in seen.cameras)
    newest_done = max((c.last_done for c in seen.cameras), default=now)
    if pending and now - newest_done > stall and not seen.switching:
        verdict.stuck.append(f"no inference for {now - newest_done:.0f}s with frames waiting")


def _judge_sinks(seen: Observed, verdict: Verdict) -> None:
    journal, mqtt = seen.journal, seen.mqtt
    if journal.failed:
        verdict.stuck.append(f"journal cannot write: {journal.failed}")
    if mqtt is not None:
        if not mqtt.sender.alive():
            verdict.stuck.append("MQTT sender has died")
        elif not mqtt.connected.is_set():
            verdict.degraded.append(f"MQTT not connected ({mqtt.last_error or 'connecting'})")
    if journal.dropped_undelivered:
        verdict.degraded.append(f"{journal.dropped_undelivered} results deleted before "
                                "delivery (disk full)")
    if seen.http_alive is False:
        verdict.stuck.append("HTTP health server has died")
