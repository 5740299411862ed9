"""`invoke bench-runtime`: the whole pipeline against a bare set_tensor/invoke loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..progress import Progress


def _child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, "-m", "edgebake_builder.bench.runtime_child", *args],
                         env=env, capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _with_card(model: Path, work: Path) -> Path:
    from ..modelcard import write_card

    local = work / model.name
    local.write_bytes(model.read_bytes())
    write_card(local, work / (model.stem + ".card.json"))
    return local


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each case's median fps over the rounds, with the rest of its last round's figures."""
    merged: dict[str, Any] = {}
    for case in rounds[-1]:
        fps = sorted(float(r[case]["fps"]) for r in rounds)
        merged[case] = {**rounds[-1][case], "fps": fps[len(fps) // 2]}
    return merged


def bench_runtime(model: Path, replay: Path, seconds: float, threads: int,
                  heavier: Path | None = None, rounds: int = 3,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Every case once per round, rounds one after another: a slower minute of a shared host
    then touches every case alike, and the medians leave a one-off burst out."""
    results: dict[str, Any] = {"rounds": []}
    with tempfile.TemporaryDirectory(prefix="edgebake-bench-") as tmp:
        work = Path(tmp)
        local = _with_card(model, work)
        common = [str(local), str(seconds), str(threads)]
        for number in range(1, rounds + 1):
            if progress is not None:
                progress.say(f"round {number} of {rounds}: raw loop, two raw loops, pipeline "
                             "with 1 and 2 sources, 1 source with a viewer on its live stream")
            results["rounds"].append({
                "raw": _child(["raw", *common, "1", str(replay), str(work / "r0")]),
                "raw_pair": _child(["raw-pair", *common, "2", str(replay),
                                    str(work / "r0")]),
                "one": _child(["pipeline", *common, "1", str(replay), str(work / "r1")]),
                "two": _child(["pipeline", *common, "2", str(replay), str(work / "r2")]),
                "viewer": _child(["pipeline-viewer", *common, "1", str(replay),
                                  str(work / "r4")])})
        results.update(_median_round(results["rounds"]))
        results["rtsp"] = _child(["rtsp", *common, "1", str(replay), str(work / "r3")])
        big_model = _with_card(heavier, work) if heavier is not None else local
        if heavier is not None:  # where inference, not Python, is most of each frame's cost
            big = [str(big_model), str(seconds), str(threads)]
            results["heavier"] = {
                "name": heavier.stem,
                "raw": _child(["raw", *big, "1", str(replay), str(work / "h0")]),
                "raw_pair": _child(["raw-pair", *big, "2", str(replay), str(work / "h0")]),
                "one": _child(["pipeline", *big, "1", str(replay), str(work / "h1")]),
                "two": _child(["pipeline", *big, "2", str(replay), str(work / "h2")])}
        results["threads"] = _thread_choice(
            {"default": local, **({"heavier": big_model} if heavier is not None else {})},
            work, rounds, progress)
    results["model_mb"] = model.stat().st_size / 2**20
    results["preview_encoders"] = preview_encoders(replay)
    return results


def preview_encoders(replay: Path, rounds: int = 200) -> dict[str, float]:
    """Milliseconds per 640x480 preview JPEG with Pillow and with PyAV's FFmpeg mjpeg
    encoder (from RGB, as the camera process has it): why the page uses Pillow."""
    import io
    import time

    import av
    import numpy as np
    from PIL import Image

    picture = Image.open(sorted(replay.iterdir())[0]).convert("RGB").resize((640, 480))
    rgb = np.asarray(picture)
    encoder: Any = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 640, 480, "yuvj420p"
    encoder.open()

    def pillow() -> None:
        Image.fromarray(rgb).save(io.BytesIO(), "JPEG", quality=75)

    def pyav() -> None:
        encoder.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format="yuvj420p"))

    timings: dict[str, list[float]] = {"pillow": [], "pyav": []}
    for _ in range(2):  # interleaved, each after a warm-up
        for name, encode in (("pillow", pillow), ("pyav", pyav)):
            encode()
            began = time.perf_counter()
            for _ in range(rounds):
                encode()
            timings[name].append((time.perf_counter() - began) / rounds * 1000)
    return {name: min(values) for name, values in timings.items()}


# threads per camera before they were measured on the unit (inference.num_threads: 2)
FIXED_THREADS = 2


def _thread_choice(models: dict[str, Path], work: Path, rounds: int,
                   progress: Progress | None) -> list[dict[str, Any]]:
    """What the unit's own measurement (runtime threadtune) picks for 1 and 2 cameras on
    this host, and its results per second against the fixed 2 threads per camera; medians
    of `rounds` measurements made one after another."""
    import statistics

    from edgebake_runtime.cameras import cores, threads_per_camera
    from edgebake_runtime.threadtune import tune_in_child

    rows = []
    for label, path in models.items():
        for cameras in (1, 2):
            if progress is not None:
                progress.say(f"threads: {label} model, {cameras} camera(s), {rounds} rounds")
            runs = [tune_in_child(path, cameras, cores(), work / f"t{label}{cameras}{n}.json",
                                  False).results_per_sec for n in range(rounds)]
            rates = {n: statistics.median(r[n] for r in runs) for n in runs[0]}
            tuned = max(rates, key=lambda n: (rates[n], -int(n)))
            fixed = str(threads_per_camera(FIXED_THREADS, cameras))
            rows.append({"model": label, "cameras": cameras, "rates": rates, "tuned": tuned,
                         "fixed": fixed, "ratio": rates[tuned] / rates[fixed]})
    return rows


def _report_threads(results: dict[str, Any], progress: Progress) -> None:
    for row in results.get("threads", []):
        rates = ", ".join(f"{n} thread(s) {rate:.0f}" for n, rate in row["rates"].items())
        progress.say(f"threads measured on this host, {row['model']} model, {row['cameras']} "
                     f"camera(s): results/s {rates}; tuned {row['tuned']} against fixed "
                     f"{row['fixed']}: ratio {row['ratio']:.2f}")


def _report_page(results: dict[str, Any], one: dict[str, Any], progress: Progress) -> None:
    encoders = results["preview_encoders"]
    progress.say(f"preview JPEG 640x480: Pillow {encoders['pillow']:.2f} ms, PyAV (FFmpeg "
                 f"mjpeg) {encoders['pyav']:.2f} ms; ratio PyAV/Pillow "
                 f"{encoders['pyav'] / encoders['pillow']:.2f}")
    viewer = results["viewer"]
    progress.say(f"one viewer on the unit's live stream ({viewer['viewer_pictures_per_sec']:.1f} "
                 f"pictures/s): {viewer['fps']:.1f} fps; ratio with viewer/page closed: "
                 f"{viewer['fps'] / one['fps']:.2f}")


def report(results: dict[str, Any], threads: int, progress: Progress) -> None:
    _report_threads(results, progress)
    raw, pair, one, two = results["raw"], results["raw_pair"], results["one"], results["two"]
    for number, r in enumerate(results["rounds"], 1):
        progress.say(f"round {number}: raw {r['raw']['fps']:.1f} fps, two raw "
                     f"{r['raw_pair']['fps']:.1f}, pipeline 1 source {r['one']['fps']:.1f}, "
                     f"2 sources {r['two']['fps']:.1f}: ratio "
                     f"{r['one']['fps'] / r['raw']['fps']:.2f}, scaling "
                     f"{r['two']['fps'] / r['one']['fps']:.2f}")
    progress.say(f"medians of {len(results['rounds'])} rounds:")
    progress.say(f"raw loop (set_tensor+invoke, {threads} thread(s), own process): "
                 f"{raw['fps']:.1f} fps")
    progress.say(f"two raw loops in two processes: {pair['fps']:.1f} fps in total; physical "
                 f"reference 1->2: {pair['fps'] / raw['fps']:.2f}")
    progress.say(f"pipeline, 1 replay source, 1 camera process: {one['fps']:.1f} fps, "
                 f"capture->result p50 {one['p50_ms']:.2f} ms, p99 {one['p99_ms']:.2f} ms, "
                 f"{one['drops']} frames dropped (latest wins)")
    progress.say(f"throughput ratio pipeline/raw: {one['fps'] / raw['fps']:.2f}")
    _report_page(results, one, progress)
    per = ", ".join(f"{k} {v:.1f}" for k, v in two["per_source_fps"].items())
    progress.say(f"pipeline, 2 sources, 2 camera processes: {two['fps']:.1f} fps in total "
                 f"(captured per source: {per})")
    progress.say(f"scaling 1->2 sources: {two['fps'] / one['fps']:.2f}")
    per_frame = two["service_cpu_ms"] + two["worker_cpu_ms"]
    progress.say(f"CPU per result with 2 sources: service process {two['service_cpu_ms']:.2f} ms "
                 f"(journal, health), camera processes {two['worker_cpu_ms']:.2f} ms (capture, "
                 f"preprocessing, invoke p50 {two['invoke_p50_ms']:.2f} ms, decoding); "
                 f"2 cores allow at most {2000 / per_frame:.0f} fps, a scaling of "
                 f"{2000 / per_frame / one['fps']:.2f}")
    model_mb = results["model_mb"]
    for label, run in (("1 camera", one), ("2 cameras", two)):
        memory = run["memory"]
        service, workers = memory["service"], memory["workers"]
        worst = max(workers, key=lambda w: w["pss"])
        # PSS: a page shared by several of our processes (libraries) counts once in total
        whole = service["pss"] + sum(w["pss"] for w in workers)
        budget = len(workers) * (50 + model_mb) + service["pss"]
        progress.say(f"memory, {label}: each camera process RSS {worst['rss']:.1f} MB "
                     f"(private {worst['private']:.1f}, PSS {worst['pss']:.1f}; the rest is "
                     f"libraries shared with the others), peak RSS {run['worker_rss_mb']:.1f} "
                     f"MB; the shared part, the service process: RSS {service['rss']:.1f} MB, "
                     f"PSS {service['pss']:.1f} MB; whole service (PSS) {whole:.1f} MB against "
                     f"{len(workers)} x (50 MB + model {model_mb:.1f} MB) + the shared part = "
                     f"{budget:.1f} MB: {'within' if whole <= budget else 'OVER'}")
    progress.say(f"bare loop process: peak RSS {raw['peak_rss_mb']:.1f} MB")
    rt = results["rtsp"]
    progress.say(f"RTSP (H.264 640x480 at {rt['stream_fps']} fps from 127.0.0.1, PyAV): "
                 f"{rt['fps']:.1f} results/s, decode+scale {rt['decode_ms']:.2f} ms per frame, "
                 f"capture->result p50 {rt['p50_ms']:.2f} ms, p99 {rt['p99_ms']:.2f} ms")
    heavy = results.get("heavier")
    if heavy:
        h1, h2 = heavy["one"], heavy["two"]
        progress.say(f"heavier model ({heavy['name']}, invoke p50 {h1['invoke_p50_ms']:.2f} ms): "
                     f"raw {heavy['raw']['fps']:.1f} fps, pipeline/raw "
                     f"{h1['fps'] / heavy['raw']['fps']:.2f}, 2 sources {h2['fps']:.1f} fps")
        progress.say(f"heavier model scaling 1->2 sources: {h2['fps'] / h1['fps']:.2f} "
                     f"(physical reference {heavy['raw_pair']['fps'] / heavy['raw']['fps']:.2f})")
