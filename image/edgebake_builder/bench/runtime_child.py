"""One benchmark measurement in its own process, so peak RSS belongs to that measurement only.

Usage: python -m edgebake_builder.bench.runtime_child raw|pipeline MODEL SECONDS THREADS
       SOURCES REPLAY_DIR RESULTS_DIR
Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def raw_loop(model: Path, seconds: float, threads: int, replay: Path) -> dict[str, Any]:
    from edgebake_runtime.card import card_path_for, load_card
    from edgebake_runtime.interp import load_interpreter
    from edgebake_runtime.preprocess import Preprocessor

    card = load_card(card_path_for(model))
    interpreter = load_interpreter(model, num_threads=threads)
    index = interpreter.get_input_details()[0]["index"]
    frame = np.asarray(Image.open(sorted(replay.iterdir())[0]).convert("RGB"))
    tensor, _ = Preprocessor(card)(frame)
    for _ in range(20):
        interpreter.set_tensor(index, tensor)
        interpreter.invoke()
    count = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        interpreter.set_tensor(index, tensor)
        interpreter.invoke()
        count += 1
    elapsed = time.monotonic() - started
    return {"fps": count / elapsed}


def raw_pair(model: Path, seconds: float, threads: int, replay: Path) -> dict[str, Any]:
    """Two bare loops in two processes at once: what two cores can do with no pipeline."""
    import json
    import os
    import subprocess

    args = [sys.executable, "-m", "edgebake_builder.bench.runtime_child", "raw", str(model),
            str(seconds), str(threads), "1", str(replay), "-"]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
             for _ in range(2)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return {"fps": sum(float(o["fps"]) for o in outs)}


VIEWER_TOKEN = "bench-viewer-token-0123456789"


def run_app(model: Path, seconds: float, threads: int, sources: list[dict[str, Any]],
            results: Path, viewer: bool = False) -> dict[str, Any]:
    """The service on the replay; with `viewer`, someone watches the first camera's live
    stream on the unit's page for the whole measurement."""
    from edgebake_runtime.config import validate
    from edgebake_runtime.service import Service

    http = {"enabled": True, "bind": "127.0.0.1", "port": 0, "token": VIEWER_TOKEN,
            "token_file": str(results / "token")} if viewer else {"enabled": False}
    config = validate({
        "model": {"path": str(model), "card": ""},
        "inference": {"num_threads": threads},
        "sources": sources,
        "journal": {"dir": str(results), "fsync_interval_sec": 1.0},
        "http": http,
    }, "bench")
    app = Service(config)
    runner = threading.Thread(target=app.run, daemon=True)
    app.start()
    runner.start()
    while app.metrics.results < 20:
        time.sleep(0.05)
    pids = [c.pid for c in app.cameras.processes if c.pid]
    watching = _watch(app.http.port, sources[0]["name"]) if viewer and app.http else None
    start_count = app.metrics.results
    cpu_service, cpu_workers = _cpu_seconds([0]), _cpu_seconds(pids)
    started = time.monotonic()
    time.sleep(seconds)
    count = app.metrics.results - start_count
    cpu_service = _cpu_seconds([0]) - cpu_service
    cpu_workers = _cpu_seconds(pids) - cpu_workers
    elapsed = time.monotonic() - started
    memory = {"service": _memory(0), "workers": [_memory(pid) for pid in pids]}
    snap = app.snapshot()
    pictures = watching() if watching is not None else 0
    app.request_stop()
    runner.join(5)
    app.stop()
    return {"fps": count / elapsed, "viewer_pictures_per_sec": pictures / elapsed,
            "p50_ms": snap["inference"]["end_to_end_p50_ms"],
            "p99_ms": snap["inference"]["end_to_end_p99_ms"],
            "invoke_p50_ms": snap["inference"]["p50_ms"],
            "drops": sum(s["drops"] for s in snap["sources"].values()),
            "service_cpu_ms": cpu_service / max(count, 1) * 1000,
            "worker_cpu_ms": cpu_workers / max(count, 1) * 1000,
            "per_source_fps": {n: s["fps"] for n, s in snap["sources"].items()},
            "memory": memory}


def _watch(port: int, camera: str) -> Any:
    """A viewer on the camera's live stream, reading every picture; the returned function
    ends it and says how many pictures it saw."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", f"/camera/{camera}.mjpeg",
                 headers={"Authorization": f"Bearer {VIEWER_TOKEN}"})
    answer = conn.getresponse()
    seen = [0]
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            line = answer.readline()
            if not line:
                return
            if line.startswith(b"--"):
                seen[0] += 1

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def stop() -> int:
        done.set()
        answer.close()
        conn.close()
        return seen[0]
    return stop


def _memory(pid: int) -> dict[str, float]:
    """A running process's memory in MB: RSS, what only it uses (private), and its
    proportional share (PSS) of pages it shares with others (libraries, the frame memfd)."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid or os.getpid()}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[name] = int(rest.split()[0]) / 1024
    private = values.get("Private_Clean", 0.0) + values.get("Private_Dirty", 0.0)
    return {"rss": values.get("Rss", 0.0), "private": private, "pss": values.get("Pss", 0.0)}


def _cpu_seconds(pids: list[int]) -> float:
    """User+system CPU time of processes (0: this one, all its threads) from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def pipeline(model: Path, seconds: float, threads: int, sources: int, replay: Path,
             results: Path, viewer: bool = False) -> dict[str, Any]:
    from edgebake_runtime.config import MAX_REPLAY_FPS

    # as fast as inference takes the frames: a pace of its own would cap the pipeline
    return run_app(model, seconds, threads,
                   [{"name": f"replay{i}", "kind": "replay", "path": str(replay),
                     "fps": MAX_REPLAY_FPS}
                    for i in range(sources)], results, viewer)


def rtsp(model: Path, seconds: float, threads: int, replay: Path, results: Path
         ) -> dict[str, Any]:
    """An H.264 stream (640x480, 25 fps) served on 127.0.0.1 by the bench itself."""
    import av
    from edgebake_runtime.card import card_path_for, load_card
    from edgebake_runtime.preprocess import Preprocessor

    from edgebake_builder.validate.rtsp import RtspServer, make_h264

    picture = np.asarray(Image.open(sorted(replay.iterdir())[0]).convert("RGB"))
    fps = 25
    clip = make_h264(results.parent / "bench.h264", seconds=8, fps=fps, picture=picture)
    size = Preprocessor(load_card(card_path_for(model))).native_size(640, 480)
    frames, began = 0, time.perf_counter()
    with av.open(str(clip)) as container:  # what the source pays per frame
        for frame in container.decode(video=0):
            frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
            frames += 1
    decode_ms = (time.perf_counter() - began) / frames * 1000
    with RtspServer(clip, fps) as server:
        report = run_app(model, seconds, threads,
                         [{"name": "rtsp", "kind": "rtsp", "url": server.url(), "fps": fps}],
                         results)
    report["decode_ms"] = decode_ms
    report["stream_fps"] = fps
    return report


def main() -> int:
    mode, model, seconds, threads, sources, replay, results = sys.argv[1:8]
    if mode == "raw":
        report = raw_loop(Path(model), float(seconds), int(threads), Path(replay))
    elif mode == "rtsp":
        report = rtsp(Path(model), float(seconds), int(threads), Path(replay), Path(results))
    elif mode == "raw-pair":
        report = raw_pair(Path(model), float(seconds), int(threads), Path(replay))
    else:  # pipeline, or pipeline-viewer: the same with a live stream open
        report = pipeline(Path(model), float(seconds), int(threads), int(sources),
                          Path(replay), Path(results), mode == "pipeline-viewer")
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # the largest peak among the worker processes (they have ended by now)
    report["worker_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
