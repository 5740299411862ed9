"""Inference workers as processes fed through shared memory: results, kill -9, a hang."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
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


def test_records_from_worker_processes_match_the_thread_path(tmp_path: Path,
                                                              default_model: Path) -> None:
    """A worker process's result goes into the journal line as it came (JSON text); the line
    must hold exactly the fields and values a record built in the service holds."""
    from edgebake_runtime.card import load_card
    from edgebake_runtime.frames import Frame
    from edgebake_runtime.metrics import Metrics
    from edgebake_runtime.worker import deliver, deliver_encoded

    card = load_card(default_model.with_name("face_detection_short_range.card.json"))
    card.data["version"] = 'v"2\\n'  # a version that needs escaping in JSON
    frame = Frame(source="cam-ä", seq=7, captured_at=time.monotonic(), wall_time=1234.56789,
                  image=None)  # type: ignore[arg-type]
    result = {"task": "blazeface", "detections": [{"label": "face", "score": 0.9,
                                                    "box": [0.1, 0.2, 0.3, 0.4]}]}
    records: list[dict[str, Any]] = []
    lines: list[tuple[bytes, float]] = []
    deliver(card, frame, result, 0.00123, 1, records.append, Metrics())
    deliver_encoded(card, frame, json.dumps(result), 0.00123, 1,
                    lambda line, ts: lines.append((line, ts)), Metrics())
    line, stamp = lines[0]
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    encoded = json.loads(line)
    expected = records[0]
    assert set(encoded) == set(expected)
    for key in ("ts", "source", "seq", "model", "worker", "inference_ms", "task", "detections"):
        assert encoded[key] == expected[key], key
    assert encoded["id"] != expected["id"], "every record gets its own id"
    assert stamp == frame.wall_time
    empty: list[bytes] = []
    deliver_encoded(card, frame, "{}", 0.001, 0, lambda line, ts: empty.append(line), Metrics())
    assert json.loads(empty[0])["seq"] == 7


def test_wire_refuses_what_does_not_fit_or_parse() -> None:
    from edgebake_runtime import wire

    big = wire.reply(1, 2, 0.5, "", "x" * wire.MAX_MESSAGE)
    slot, token, seconds, error, result = wire.parse_reply(big)
    assert (slot, token, seconds, result) == (1, 2, 0.5, "") and "more than" in error
    assert len(big) <= wire.MAX_MESSAGE
    ok = wire.parse_reply(wire.reply(0, 9, 0.25, "", '{"task":"raw"}'))
    assert ok == (0, 9, 0.25, "", '{"task":"raw"}')
    with pytest.raises(ValueError, match="shorter than its header"):
        wire.parse_reply(b"\x00" * 3)


def test_a_zero_area_detection_ends_the_grouping(default_model: Path) -> None:
    """A box of no area overlaps nothing, not even itself; it must still form its own group
    (before, such a box was never removed and the loop emitted NaN detections)."""
    import numpy as np
    from edgebake_runtime.card import load_card
    from edgebake_runtime.postprocess import blazeface
    from edgebake_runtime.preprocess import Placement

    card = load_card(default_model.with_name("face_detection_short_range.card.json"))
    regs = np.zeros((1, 896, 16), np.float32)  # every box has zero width and height
    scores = np.full((1, 896, 1), -10.0, np.float32)
    scores[0, [3, 4, 5]] = 5.0
    result = blazeface(card, [regs, scores], Placement(), None, 5)
    boxes = [d["box"] for d in result["detections"]]
    assert len(boxes) == 3, boxes
    assert all(v == v for box in boxes for v in box), "NaN in a box"
