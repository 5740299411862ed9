"""Inference workers as processes fed through shared memory: results, kill -9, a hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from edgebake_runtime.app import App
from edgebake_runtime.journal import read_lines
from runtime_helpers import ASTRONAUT_BOX, RunningApp, make_config, replay_folder, wait_for


def replay_app(tmp_path: Path, model: Path, workers: int = 1, stall_sec: float = 15.0) -> App:
    folder = replay_folder(tmp_path)
    return App(make_config(tmp_path, model,
                           [{"name": "cam", "kind": "replay", "path": str(folder), "fps": 20}],
                           inference={"workers": workers, "processes": True},
                           watchdog={"stall_sec": stall_sec}))


def test_a_frame_goes_in_and_a_result_comes_out(tmp_path: Path, default_model: Path) -> None:
    app = replay_app(tmp_path, default_model, workers=2)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 20, 30, "20 results")
        health = running.health()
        procs = health["inference"]["processes"]
        assert len(procs) == 2 and all(p["alive"] for p in procs)
        assert {p["pid"] for p in procs}.isdisjoint({0, os.getpid()})
        assert all(p["processed"] > 0 for p in procs), procs
    faces = [r for r in read_lines(tmp_path / "results") if r["detections"]]
    assert faces, "the astronaut's face was not found by the worker processes"
    box = faces[0]["detections"][0]["box"]
    assert all(abs(a - b) < 0.05 for a, b in zip(box, ASTRONAUT_BOX, strict=True)), box


def test_a_killed_worker_is_replaced_and_counted(tmp_path: Path, default_model: Path) -> None:
    app = replay_app(tmp_path, default_model)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        worker = running.app.workers[0]
        old_pid = worker.stats()["pid"]
        os.kill(old_pid, signal.SIGKILL)
        # the gone process never passes as healthy
        wait_for(lambda: not running.app.evaluate(time.monotonic())[0], 10,
                 "the unit to be unhealthy while the worker is gone")
        wait_for(lambda: worker.stats()["restarts"] == 1 and worker.alive(), 60,
                 "a new worker process")
        assert worker.stats()["pid"] not in (0, old_pid)
        count = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results > count + 5, 30, "results again")
        wait_for(lambda: running.health()["healthy"], 30, "healthy again")
        metrics = running.get("/metrics")[1].decode()
        assert "edgebake_worker_restarts_total 1" in metrics, metrics[-800:]


def test_a_hung_worker_stops_the_watchdog_pings(tmp_path: Path, default_model: Path) -> None:
    app = replay_app(tmp_path, default_model, stall_sec=2.0)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        pid = running.app.workers[0].stats()["pid"]
        os.kill(pid, signal.SIGSTOP)
        try:
            healthy, restart_helps, status = wait_for(
                lambda: (v := running.app.evaluate(time.monotonic()))[1]
                and "worker 0 stuck" in v[2] and v, 15, "the hung worker to count as stuck")
            assert not healthy and restart_helps, status
            assert running.app.workers[0].alive(), "hung is not dead: no replacement expected"
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: not running.app.evaluate(time.monotonic())[1], 15,
                 "the worker to recover after SIGCONT")
