"""Every camera in its own process: results, kill -9, a hang, a model switch, the threads
that follow the cores, and the camera process's own decoding and batching."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_runtime.journal import read_lines
from edgebake_runtime.service import Service
from runtime_helpers import ASTRONAUT_BOX, RunningApp, make_config, replay_folder, wait_for


def replay_app(tmp_path: Path, model: Path, cameras: int = 1, stall_sec: float = 15.0
               ) -> Service:
    folder = replay_folder(tmp_path)
    return Service(make_config(tmp_path, model,
                               [{"name": f"cam{i}", "kind": "replay", "path": str(folder),
                                 "fps": 20} for i in range(cameras)],
                               watchdog={"stall_sec": stall_sec}))


def test_a_frame_goes_in_and_a_result_comes_out(tmp_path: Path, default_model: Path) -> None:
    app = replay_app(tmp_path, default_model, cameras=2)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 20, 30, "20 results")
        health = running.health()
        procs = health["inference"]["processes"]
        assert len(procs) == 2 and all(p["alive"] for p in procs)
        assert {p["pid"] for p in procs}.isdisjoint({0, os.getpid()})
        assert len({p["pid"] for p in procs}) == 2
        wait_for(lambda: all(p["processed"] > 0 for p in
                             running.health()["inference"]["processes"]), 10,
                 "every process to have inferred frames")
        sources = running.health()["sources"]  # each camera's state from its own process
        assert all(s["state"] == "up" and s["frames"] > 0 for s in sources.values()), sources
        assert all(s["last_frame_age_sec"] < 5 for s in sources.values()), sources
    records = list(read_lines(tmp_path / "results"))
    faces = [r for r in records if r["detections"]]
    assert faces, "the astronaut's face was not found by the worker processes"
    box = faces[0]["detections"][0]["box"]
    assert all(abs(a - b) < 0.05 for a, b in zip(box, ASTRONAUT_BOX, strict=True)), box
    assert len({r["id"] for r in records}) == len(records), "record ids repeat"
    assert {r["source"] for r in records} == {"cam0", "cam1"}


def test_a_killed_camera_process_is_replaced_and_counted(tmp_path: Path, default_model: Path
                                                         ) -> None:
    app = replay_app(tmp_path, default_model)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        old_pid = running.health()["inference"]["processes"][0]["pid"]
        os.kill(old_pid, signal.SIGKILL)
        # the gone process never passes as healthy
        wait_for(lambda: not running.app.evaluate(time.monotonic())[0], 10,
                 "the unit to be unhealthy while the worker is gone")
        wait_for(lambda: (p := running.health()["inference"]["processes"][0])["restarts"] == 1
                 and p["alive"], 60, "a new worker process")
        assert running.health()["inference"]["processes"][0]["pid"] not in (0, old_pid)
        count = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results > count + 5, 30, "results again")
        wait_for(lambda: running.health()["healthy"], 30, "healthy again")
        metrics = running.get("/metrics")[1].decode()
        assert "edgebake_worker_restarts_total 1" in metrics, metrics[-800:]


def test_a_hung_camera_process_stops_the_watchdog_pings(tmp_path: Path, default_model: Path
                                                        ) -> None:
    app = replay_app(tmp_path, default_model, stall_sec=2.0)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 30, "first results")
        pid = running.health()["inference"]["processes"][0]["pid"]
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


def test_a_journal_line_is_the_record_as_json_with_an_id_of_its_own() -> None:
    """A camera process builds each line as text around its encoded result; it must parse
    back to exactly the record's fields, escape what JSON needs, and never repeat an id."""
    from edgebake_runtime.frames import Frame
    from edgebake_runtime.records import journal_line

    frame = Frame(source="cam-ä", seq=7, captured_at=time.monotonic(), wall_time=1234.56789,
                  image=None)  # type: ignore[arg-type]
    result = {"task": "blazeface", "detections": [{"label": "face", "score": 0.9,
                                                    "box": [0.1, 0.2, 0.3, 0.4]}]}
    line = journal_line('v"2\\n', frame, json.dumps(result), 0.00123, 0.0456, 1)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    record = json.loads(line)
    assert record == {**result, "id": record["id"], "ts": 1234.568, "source": "cam-ä",
                      "seq": 7, "model": 'v"2\\n', "worker": 1, "inference_ms": 1.23,
                      "latency_ms": 45.6}
    again = json.loads(journal_line("1", frame, "{}", 0.001, 0.001, 0))
    assert again["seq"] == 7 and again["id"] != record["id"]


def test_a_model_switch_reaches_every_camera_or_none(tmp_path: Path, default_model: Path
                                                    ) -> None:
    """Every camera process loads the new model beside the running one; one that cannot
    load it makes the switch fail, and the cameras go on with the model they had."""
    import shutil

    from edgebake_runtime.card import load_card
    from edgebake_runtime.modelload import StartupError

    card_path = default_model.with_name("face_detection_short_range.card.json")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(default_model, bad / "m.tflite")
    data = json.loads(card_path.read_text())
    data["inputs"][0]["shape"] = [1, 96, 96, 3]  # the interpreter refuses the card's shape
    (bad / "m.card.json").write_text(json.dumps(data))
    app = replay_app(tmp_path, default_model, cameras=2)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 10, 30, "first results")
        pids = {c.pid for c in running.app.cameras.processes}
        before = running.app.card.version
        with pytest.raises(StartupError, match="does not match the card"):
            running.app.cameras.switch(bad / "m.tflite", load_card(bad / "m.card.json"))
        assert running.app.card.version == before
        newer = load_card(card_path)
        newer.data["version"] = "9.9"
        running.app.cameras.switch(default_model, newer)
        wait_for(lambda: {p["model"] for p in running.health()["inference"]["processes"]}
                 == {"9.9"}, 10, "every camera process to report 9.9")
        assert {c.pid for c in running.app.cameras.processes} == pids, "switched in place"
        served = running.app.metrics.results
        wait_for(lambda: running.app.metrics.results > served + 10, 30, "results from 9.9")
    versions = {r["model"] for r in read_lines(tmp_path / "results")}
    assert versions == {before, "9.9"}, versions


@pytest.mark.parametrize("kept", [3, 60])  # the plain-Python path and the array path
def test_a_zero_area_detection_ends_the_grouping(default_model: Path, kept: int) -> None:
    """A box of no area overlaps nothing, not even itself; it must still form its own group
    (before, such a box was never removed and the loop emitted NaN detections)."""
    import numpy as np
    from edgebake_runtime.card import load_card
    from edgebake_runtime.postprocess import blazeface
    from edgebake_runtime.preprocess import Placement

    card = load_card(default_model.with_name("face_detection_short_range.card.json"))
    regs = np.zeros((1, 896, 16), np.float32)  # every box has zero width and height
    scores = np.full((1, 896, 1), -10.0, np.float32)
    scores[0, 3:3 + kept] = 5.0
    result = blazeface(card, [regs, scores], Placement(), None, 100)
    boxes = [d["box"] for d in result["detections"]]
    assert len(boxes) == kept, boxes
    assert all(v == v for box in boxes for v in box), "NaN in a box"


def test_decoding_and_interpreter_threads_follow_the_cores_per_camera(
        tmp_path: Path, default_model: Path) -> None:
    """Preparing and decoding get threads of their own only while a core is free for them,
    and the cameras' interpreter threads together never outnumber the cores. Either way a
    frame gives the same result (prepared by the source thread into a tensor of its own, or
    by the main thread straight into the interpreter's input)."""
    cores = len(os.sched_getaffinity(0))
    found: dict[int, set[str]] = {}
    for cameras in (1, cores):
        folder = tmp_path / f"c{cameras}"
        folder.mkdir()
        app = replay_app(folder, default_model, cameras=cameras)
        configured = app.config.inference.num_threads
        with RunningApp(app) as running:
            wait_for(lambda: running.app.metrics.results >= 10, 30, "results")
            processes = running.health()["inference"]["processes"]
        modes = {p["decoding"] for p in processes}
        assert modes == {"beside inference" if cameras < cores else "inline"}, (cameras, modes)
        threads = [p["threads"] for p in processes]
        assert sum(threads) <= max(cores, cameras) and min(threads) >= 1, (cameras, threads)
        if cameras == 1:
            assert threads == [min(configured, cores)], threads
        records = [json.loads(line) for path in sorted((folder / "results").glob("*.jsonl"))
                   for line in path.read_text().splitlines()]
        found[cameras] = {json.dumps(r["detections"], sort_keys=True) for r in records}
    assert len(found[1]) == 2, found[1]  # the astronaut's face, and no face in china.jpg
    assert found[1] == found[cores], found


def test_lines_from_a_camera_process_parse_back_and_bad_ones_are_refused() -> None:
    from edgebake_runtime.camera import wire

    meta = [(1.0, 1000.5, 0.002), (2.0, 1001.5, 0.003)]
    lines = [b'{"a":1}\n', b'{"b":2}\n']
    assert wire.parse_lines(wire.lines(meta, lines, 7)) == (meta, b"".join(lines), 7)
    assert wire.parse_lines(wire.lines([], [], 3)) == ([], b"", 3)
    message = wire.lines(meta, lines, 0)
    with pytest.raises(ValueError, match="announces 2 lines"):
        wire.parse_lines(message[:-1])  # the last newline cut off
    with pytest.raises(ValueError, match="shorter than its header"):
        wire.parse_lines(wire.LINES + b"\x01")


def test_a_recording_waits_for_room_instead_of_dropping_frames(tmp_path: Path,
                                                               default_model: Path) -> None:
    """A camera process reads a recording ahead and its source thread sleeps while the
    queue is full: every frame is inferred, in order, none dropped."""
    import threading

    from edgebake_runtime.frames import Frame

    camera, ours, theirs = _camera_here(tmp_path, default_model, beside=False)
    assert camera.source.can_wait, "a replay is a recording"
    picture = np.zeros((48, 64, 3), np.uint8)

    def reader() -> None:  # what the source thread does with each frame it reads
        for seq in range(40):
            camera.on_frame(Frame("cam0", seq, time.monotonic(), time.time(), picture))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    got = []
    while len(got) < 40:
        frame = camera.queue.wait_take(timeout=5)
        assert frame is not None, "the reader stopped feeding"
        got.append(frame.seq)
        time.sleep(0.002)
    thread.join(5)
    ours.close()
    theirs.close()
    assert got == list(range(40)), "a recording never drops a frame"
    assert camera.queue.dropped == 0


def test_the_few_anchor_decoder_matches_the_array_decoder(default_model: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Frames with a few faces take a plain-Python path; it must give what numpy gives."""
    import numpy as np
    from edgebake_runtime import postprocess
    from edgebake_runtime.card import load_card
    from edgebake_runtime.interp import load_interpreter
    from edgebake_runtime.preprocess import Preprocessor
    from PIL import Image
    from runtime_helpers import astronaut_path, china_image

    card = load_card(default_model.with_name("face_detection_short_range.card.json"))
    interpreter = load_interpreter(default_model)
    preprocess = Preprocessor(card)
    face = np.asarray(Image.open(astronaut_path()).convert("RGB"))
    pictures = [face, china_image(), np.concatenate([face, face[:, ::-1]], axis=1),
                np.random.default_rng(3).integers(0, 255, (480, 640, 3), dtype=np.uint8)]
    compared = 0
    for picture in pictures:
        tensor, placement = preprocess(picture)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
        interpreter.invoke()
        outputs = [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]
        for threshold in (None, 0.3, 0.1):
            few = postprocess.blazeface(card, outputs, placement, threshold, 3)
            monkeypatch.setattr(postprocess, "FEW_ANCHORS", -1)
            array = postprocess.blazeface(card, outputs, placement, threshold, 3)
            monkeypatch.setattr(postprocess, "FEW_ANCHORS", 48)
            assert few == array, (threshold, few, array)
            compared += bool(few["detections"])
    assert compared >= 4, "too few pictures with faces to compare anything"


def test_a_decoder_thread_that_falls_behind_leaves_the_decoding_to_the_main_thread(
        tmp_path: Path, default_model: Path) -> None:
    """Inferred frames waiting for the decoder thread are bounded: beyond the bound the main
    thread decodes them itself, so a stalled decoder costs speed, not memory."""
    import contextlib

    import numpy as np
    from edgebake_runtime.camera import child, wire
    from edgebake_runtime.frames import Frame
    from PIL import Image
    from runtime_helpers import astronaut_path

    camera, ours, theirs = _camera_here(tmp_path, default_model, beside=True)
    model = camera.model
    for seq in range(child.MAX_PENDING_BATCHES + 3):  # the decoder thread never runs
        frame = Frame("cam0", seq, time.monotonic(), time.time(),
                      np.asarray(Image.open(astronaut_path()).convert("RGB")))
        model.fill_input(frame)
        model.interpreter.invoke()
        outputs = [model.interpreter.get_tensor(i) for i in model.outputs]
        camera._hand_over([(frame, model, outputs, 0.001, "")], idle=False)
    assert len(camera.pending) == child.MAX_PENDING_BATCHES
    camera.batch.send_if_due(camera.send, now=True)
    ours.setblocking(False)
    records, errors = [], 0
    with contextlib.suppress(BlockingIOError):
        while True:
            _, block, counted = wire.parse_lines(ours.recv(wire.MAX_MESSAGE))
            records += [json.loads(line) for line in block.splitlines()]
            errors += counted
    bound = child.MAX_PENDING_BATCHES
    assert errors == 0 and [r["seq"] for r in records] == [bound, bound + 1, bound + 2]
    assert all(r["detections"] for r in records), "the astronaut's face"
    ours.close()
    theirs.close()


def test_a_slow_models_results_are_not_held_back_to_fill_a_decoding_batch(
        tmp_path: Path, default_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Frames are decoded in batches while they keep coming, but no frame waits while an
    invoke would take it past FLUSH_SEC: with a model that takes 30 ms a frame, each result
    goes out before the next frame's invoke, not after DECODE_BATCH frames (in QEMU, a model
    of 3 s a frame held back for 8 frames looked stuck to the watchdog)."""
    import contextlib
    import threading

    import numpy as np
    from edgebake_runtime.camera import child, model, wire
    from edgebake_runtime.frames import Frame
    from PIL import Image
    from runtime_helpers import astronaut_path

    class SlowInterpreter:
        """The real interpreter, 30 ms slower per invoke (a larger model on a small board)."""

        def __init__(self, real: Any) -> None:
            self.real = real

        def invoke(self) -> None:
            time.sleep(0.03)
            self.real.invoke()

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    real_load = model.load_interpreter
    monkeypatch.setattr(model, "load_interpreter",
                        lambda *args, **kwargs: SlowInterpreter(real_load(*args, **kwargs)))
    camera, ours, theirs = _camera_here(tmp_path, default_model, beside=False)
    picture = np.asarray(Image.open(astronaut_path()).convert("RGB"))
    count = child.DECODE_BATCH
    for seq in range(count):
        camera.queue.put(Frame("cam0", seq, time.monotonic(), time.time(), picture))
    runner = threading.Thread(target=camera.infer_loop, daemon=True)
    runner.start()
    try:
        wait_for(lambda: camera.processed == count, 10, "every frame inferred")
        messages = []
        ours.settimeout(2)
        with contextlib.suppress(TimeoutError):
            while sum(len(m) for m in messages) < count:
                messages.append(wire.parse_lines(ours.recv(wire.MAX_MESSAGE))[0])
    finally:
        camera.stop.set()
        runner.join(5)
        ours.close()
        theirs.close()
    assert sum(len(m) for m in messages) == count, messages
    assert len(messages[0]) == 1, [len(m) for m in messages]


def _camera_here(tmp_path: Path, model: Path, beside: bool) -> tuple[Any, Any, Any]:
    """A camera process's `Camera`, in this process: its frames, threads and socket at hand.
    Returns it with the service's end of its socket and its own."""
    import dataclasses
    import socket

    from edgebake_runtime.camera import child

    config = replay_app(tmp_path, model).config
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    camera = child.Camera(theirs, {
        "index": 0, "source": dataclasses.asdict(config.sources[0]), "model": str(model),
        "card": str(model.with_name("face_detection_short_range.card.json")),
        "version": "v1", "threads": 1, "threshold": None, "top_k": 3, "depth": 2,
        "decode_beside": beside})
    return camera, ours, theirs


def test_a_long_invoke_is_not_a_hang_until_the_stall_limit(tmp_path: Path, default_model: Path
                                                          ) -> None:
    """A slow model on a loaded unit spends seconds in one invoke: a model switch then waits
    for it instead of killing the process. Only an invoke (or a silence) past the health
    verdict's own limit, watchdog.stall_sec, counts as a hang."""
    app = replay_app(tmp_path, default_model, stall_sec=20.0)
    with RunningApp(app) as running:
        wait_for(lambda: running.app.metrics.results >= 3, 30, "first results")
        camera = running.app.cameras.processes[0]
        assert camera.hung() == "", "a process at work"
    # stopped: its reader no longer updates what it heard, so the figures below stay as set
    assert camera.hung_after == 20.0
    now = time.monotonic()
    camera._heard = now
    camera._busy_reported = now - 5.0  # five seconds into one invoke: slow, not hung
    assert camera.hung() == ""
    camera._busy_reported = now - 25.0
    assert camera.hung().startswith("in one invoke for 2"), camera.hung()
    camera._busy_reported = 0.0
    camera._heard = now - 25.0
    assert camera.hung().startswith("silent for 2"), camera.hung()
