"""Field samples: a running service keeps uncertain, periodic and ordered frames as JPEG and
JSON on its /data, within its bounds, counting what goes unseen; a full disk never holds up
inference; collected samples become the .npz convert-model takes."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_runtime.config import validate
from edgebake_runtime.service import Service
from helpers import broker_args, invoke
from runtime_helpers import RunningApp, make_config, replay_folder, wait_for


def sample_app(tmp: Path, model: Path, **samples: Any) -> Service:
    config = make_config(tmp, model, [{"name": "cam", "kind": "replay",
                                       "path": str(replay_folder(tmp)), "fps": 10}])
    raw = dict(config.raw, device_id="pole-7")
    raw["samples"] = {"enabled": True, "dir": str(tmp / "samples"), **samples}
    return Service(validate(raw, "test config"))


def kept(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_uncertain_and_periodic_frames_are_kept_with_their_sidecars(
        tmp_path: Path, default_model: Path) -> None:
    """A band that holds every detection score keeps uncertain frames at most one per
    min_gap_sec; every_sec adds periodic ones. Each JPEG has its sidecar."""
    folder = tmp_path / "samples"
    with RunningApp(sample_app(tmp_path, default_model, low_confidence=[0.0, 1.0],
                               min_gap_sec=0.5, every_sec=1.0)) as running:
        wait_for(lambda: len(kept(folder)) >= 4, 60, "four samples")
        health = wait_for(lambda: running.health()["samples"]["kept"] >= 4 and
                          running.health()["samples"], 30, "the samples in /health")
        results = running.app.metrics.results
    sidecars = kept(folder)
    assert {s["reason"] for s in sidecars} <= {"uncertain", "periodic"}
    assert "uncertain" in {s["reason"] for s in sidecars}
    for sidecar in sidecars:
        assert sidecar["unit"] == "pole-7" and sidecar["source"] == "cam"
        assert sidecar["model"] == running.app.card.version
        assert "detections" in sidecar["result"]
        assert (folder / sidecar["image"]).stat().st_size > 1000
        assert re.fullmatch(r"[0-9]{10}_[0-9]{3}-cam-[0-9]+\.jpg", sidecar["image"])
    stamps = sorted(s["ts"] for s in sidecars if s["reason"] == "uncertain")
    assert all(b - a >= 0.45 for a, b in itertools.pairwise(stamps)), stamps
    assert health["enabled"] and health["write_errors"] == 0
    # far fewer samples than results: the gap bounds them
    assert len(sidecars) < results / 3


def test_bounds_remove_the_oldest_and_count_those_never_collected(
        tmp_path: Path, default_model: Path) -> None:
    from edgebake_runtime import samplestore

    folder = tmp_path / "samples"
    original = samplestore.PRUNE_SEC
    samplestore.PRUNE_SEC = 0.5
    try:
        with RunningApp(sample_app(tmp_path, default_model, low_confidence=[0.0, 1.0],
                                   min_gap_sec=0.2, max_files=3)) as running:
            wait_for(lambda: running.health()["samples"]["removed"] >= 3, 60,
                     "three samples pruned")
            newest = max(p.stem for p in folder.glob("*.jpg"))
            (folder / ".collected").write_text(newest + "\n")
            unseen = running.health()["samples"]["removed_unseen"]
            assert unseen >= 3
            # what a collector fetched no longer counts as unseen when it goes
            wait_for(lambda: running.health()["samples"]["removed"] >= unseen + 3, 60,
                     "more samples pruned")
            health = running.health()["samples"]
    finally:
        samplestore.PRUNE_SEC = original
    assert len(list(folder.glob("*.jpg"))) <= 3 + 2  # the bound, plus what came since
    assert health["removed_unseen"] < health["removed"], health
    assert health["collected_up_to"] == newest


def test_a_full_disk_never_holds_up_inference(tmp_path: Path, default_model: Path) -> None:
    """Samples on a nearly full filesystem (a tmpfs made for the test): none is written,
    each is counted, results keep coming and the unit stays healthy."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (2 * 2**20 - 64 * 1024))
        with RunningApp(sample_app(tmp_path, default_model, dir=str(mount / "samples"),
                                   low_confidence=[0.0, 1.0], min_gap_sec=0.1)) as running:
            wait_for(lambda: running.health()["samples"].get("low_space", 0) >= 5, 60,
                     "samples refused for space")
            before = running.app.metrics.results
            wait_for(lambda: running.app.metrics.results >= before + 20, 30,
                     "results while samples are refused")
            wait_for(lambda: running.health()["healthy"], 30, "a healthy unit")
        assert not list((mount / "samples").glob("*.jpg"))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_signed_orders_ask_for_frames_and_share_them_over_http(
        tmp_path: Path, default_model: Path) -> None:
    """`invoke send-order --samples 3` over a TLS broker keeps the next frames (whatever
    their score: the band here holds none); `collect-samples --broker` then pulls them from
    the unit's HTTP server with a token only its sha256 of which crossed the broker, and a
    second pull fetches nothing twice. Without the token the unit refuses."""
    import urllib.error
    import urllib.request

    from edgebake_builder.validate.broker import LocalBroker

    broker = LocalBroker.start_tls()
    assert broker.tls is not None
    keys = tmp_path / "keys"
    keys.mkdir()
    assert invoke("make-key", "--out", str(tmp_path / "ops.key")).returncode == 0
    (keys / "ops.pub").write_bytes((tmp_path / "ops.key.pub").read_bytes())
    (tmp_path / "target").write_text("pi4\n")
    out = tmp_path / "collected"
    try:
        app = sample_app(tmp_path, default_model, low_confidence=[1.0, 1.0], every_sec=0.0)
        raw = dict(app.config.raw)
        raw["mqtt"] = {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                       "username": broker.tls.username, "password": broker.tls.password,
                       "tls": {"enabled": True, "ca_file": str(broker.tls.ca_file)}}
        raw["update"] = {**raw["update"], "mqtt_commands": True, "keys_dir": str(keys),
                         "target_file": str(tmp_path / "target")}
        with RunningApp(Service(validate(raw, "test config"))) as running:
            wait_for(lambda: running.app.mqtt is not None and
                     running.app.mqtt.connected.is_set() and running.app.metrics.results > 0,
                     30, "the unit on the broker")
            sent = invoke("send-order", *broker_args(broker), "--to", "pole-7", "--key",
                          str(tmp_path / "ops.key"), "--samples", "3")
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: len(kept(tmp_path / "samples")) >= 3, 60, "three samples")
            assert running.app.http is not None
            url = f"http://127.0.0.1:{running.app.http.port}/samples?token=guess"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code == 403
            pull = ["collect-samples", *broker_args(broker), "--to", "pole-7", "--key",
                    str(tmp_path / "ops.key"), "--out", str(out)]
            # the transfer breaks after the listing and three files (the unit stops
            # answering): what is whole is kept, nothing half, and the next run resumes
            from edgebake_runtime import sampleshare

            sampleshare.MAX_REQUESTS = 4
            try:
                broken = invoke(*pull)
            finally:
                sampleshare.MAX_REQUESTS = 20000
            assert broken.returncode == 1, broken.stdout
            assert "HTTP 403" in broken.stderr and "run it again to resume" in broken.stderr
            assert len((out / "manifest.jsonl").read_text().splitlines()) == 1
            assert not list(out.glob(".*"))  # no half-written file
            pulled = invoke(*pull)
            assert pulled.returncode == 0, pulled.stderr
            assert "pole-7: 2 sample(s) fetched, 1 already" in pulled.stdout, pulled.stdout
            again = invoke(*pull)
            assert "pole-7: 0 sample(s) fetched, 3 already" in again.stdout, again.stdout
            with pytest.raises(urllib.error.HTTPError) as still:
                urllib.request.urlopen(url, timeout=10)  # a guess stays refused
            assert still.value.code == 403
            health = running.health()["samples"]
        reasons = [s["reason"] for s in kept(tmp_path / "samples")]
        assert reasons == ["requested"] * 3, reasons
        fetched = sorted(p.name for p in out.glob("*.jp*"))
        assert fetched == sorted(p.name for p in (tmp_path / "samples").glob("*.jpg"))
        manifest = [json.loads(line) for line in
                    (out / "manifest.jsonl").read_text().splitlines()]
        assert [m["unit_host"] for m in manifest] == ["pole-7"] * 3
        assert health["collected_up_to"] == max(m["name"] for m in manifest)
        assert health["shared"]["refused"] >= 2
    finally:
        broker.stop()


@pytest.fixture
def collected(tmp_path: Path) -> Iterator[Path]:
    """A folder as collect-samples leaves it: JPEGs with their sidecars."""
    from PIL import Image

    folder = tmp_path / "collected"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(6):
        name = f"1796356551_{number:03d}-cam-{number}"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"{name}.jpg")
        (folder / f"{name}.json").write_text(json.dumps({"reason": "periodic"}))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_samples_become_the_npz_convert_model_takes(collected: Path, tmp_path: Path) -> None:
    from edgebake_builder.convert.dataset import load_dataset

    labels = tmp_path / "labels.csv"
    names = sorted(p.stem for p in collected.glob("*.jpg"))
    labels.write_text("name,label\n" + "".join(
        f"{n}.jpg,{'face' if i % 2 else 'empty'}\n" for i, n in enumerate(names[:4])))
    out = tmp_path / "data.npz"
    made = invoke("samples-to-dataset", "--samples", str(collected), "--out", str(out),
                  "--labels", str(labels), "--size", "32,24")
    assert made.returncode == 0, made.stderr
    assert "4 samples of 32x24, classes empty, face" in made.stdout, made.stdout
    data = load_dataset(out, (1, 24, 32, 3), "validation")
    assert data.x.shape == (4, 24, 32, 3) and data.x.min() >= 0.0 and data.x.max() <= 1.0
    assert data.y is not None and list(data.y) == [0, 1, 0, 1]
    # as typed in the issue: no size given, the samples' own (64x48 here)
    unlabelled = invoke("samples-to-dataset", "--samples", str(collected), "--out",
                        str(tmp_path / "rep.npz"))
    assert unlabelled.returncode == 0 and "6 samples of 64x48" in unlabelled.stdout
    assert "y" not in np.load(tmp_path / "rep.npz").files


@pytest.mark.parametrize(("args", "message"), [
    (["--size", "32"], "--size '32': expected width,height"),
    (["--card", "{bad}"], "cannot read the model's input size"),
    (["--size", "8,8", "--labels", "{bad}"], "bad.csv:2: expected name,label"),
])
def test_dataset_mistakes_are_one_line(collected: Path, tmp_path: Path, args: list[str],
                                       message: str) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("name,label\nonly-a-name\n")
    args = [a.replace("{bad}", str(bad)) for a in args]
    out = tmp_path / "x.npz"
    result = invoke("samples-to-dataset", "--samples", str(collected), "--out", str(out),
                    *args)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()


def test_the_collector_reads_the_names_units_make() -> None:
    from edgebake_builder.samples.collect import stamp
    from edgebake_runtime.samples import NAME

    name = f"{1796356551.5:.3f}-front-door.2-17".replace(".", "_", 1)
    assert NAME.fullmatch(name) and stamp(name) == pytest.approx(1796356551.5)
    assert not NAME.fullmatch("../etc/passwd")
