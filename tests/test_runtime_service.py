"""The service end to end on the host: replay -> queue -> worker -> journal, /health, /metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edgebake_runtime.config import ConfigError, load_config, validate
from edgebake_runtime.journal import read_lines
from edgebake_runtime.modelload import StartupError
from edgebake_runtime.service import Service
from runtime_helpers import RunningApp, make_config, replay_folder, wait_for


def test_replay_to_journal_and_health(tmp_path: Path, default_model: Path) -> None:
    folder = replay_folder(tmp_path, corrupt=1)
    config = make_config(tmp_path, default_model,
                         [{"name": "cam", "kind": "replay", "path": str(folder), "fps": 20}])
    with RunningApp(Service(config)) as running:
        wait_for(lambda: running.app.ready, 20, "READY after the first inference")
        wait_for(lambda: running.app.metrics.results >= 10, 20, "10 results")
        code, body = running.get("/health")
        health = json.loads(body)
        assert code == 200 and health["healthy"]
        cam = health["sources"]["cam"]
        assert cam["state"] == "up" and cam["fps"] > 5
        assert cam["last_frame_age_sec"] < 1.0
        assert cam["corrupt_frames"] >= 1
        assert health["model"]["sha256"] == running.app.card.sha256
        assert health["inference"]["p50_ms"] > 0
        assert health["inference"]["p99_ms"] >= health["inference"]["p50_ms"]
        metrics = running.get("/metrics")[1].decode()
        assert 'edgebake_source_fps{source="cam"}' in metrics
        assert "edgebake_inference_latency_seconds" in metrics
        assert running.get("/nope")[0] == 404
    records = list(read_lines(tmp_path / "results"))
    assert len(records) >= 10
    faces = [r for r in records if r["detections"]]
    assert faces and all(r["source"] == "cam" and r["task"] == "blazeface" for r in records)
    # alternating astronaut (one face) and china (none) frames
    assert 0 < len(faces) < len(records)


def test_latest_frame_wins_and_counts_drops(tmp_path: Path, default_model: Path) -> None:
    from edgebake_runtime.frames import Frame, LatestFrameQueue

    queue = LatestFrameQueue(depth=2)
    for seq in range(5):
        queue.put(Frame("s", seq, 0.0, 0.0, None))  # type: ignore[arg-type]
    assert queue.dropped == 3
    assert [f.seq for f in iter(lambda: queue.wait_take(0.0), None)] == [3, 4]


def test_down_source_is_shown_and_is_not_a_crash(tmp_path: Path, default_model: Path) -> None:
    folder = replay_folder(tmp_path)
    config = make_config(tmp_path, default_model, [
        {"name": "good", "kind": "replay", "path": str(folder), "fps": 10},
        {"name": "gone", "kind": "v4l2", "device": str(tmp_path / "video9"),
         "max_age_sec": 1.0}])
    with RunningApp(Service(config)) as running:
        wait_for(lambda: running.app.ready, 20, "READY")
        health = wait_for(lambda: (h := running.health()) and not h["healthy"] and h, 10,
                          "the missing camera to make the unit unhealthy")
        assert health["sources"]["gone"]["state"] == "down"
        assert "No such file" in health["sources"]["gone"]["last_error"]
        assert health["sources"]["good"]["state"] == "up"
        assert "gone has delivered no frame" in health["status"]


def test_two_sources_each_get_their_results(tmp_path: Path, default_model: Path) -> None:
    folder = replay_folder(tmp_path)
    config = make_config(tmp_path, default_model, [
        {"name": "a", "kind": "replay", "path": str(folder), "fps": 15},
        {"name": "b", "kind": "synthetic", "fps": 15}])
    with RunningApp(Service(config)) as running:
        wait_for(lambda: running.app.metrics.results >= 20, 20, "20 results")
    sources = [r["source"] for r in read_lines(tmp_path / "results")]
    assert sources.count("a") >= 5 and sources.count("b") >= 5


@pytest.mark.parametrize("damage", ["garbage", "truncated", "png", "card-shape"])
def test_bad_model_is_refused_with_a_reason(tmp_path: Path, default_model: Path,
                                            damage: str) -> None:
    model = tmp_path / "m.tflite"
    card = tmp_path / "m.card.json"
    data = default_model.read_bytes()
    card_data = json.loads(default_model.with_name(default_model.stem + ".card.json").read_text())
    if damage == "garbage":
        data = data[:8] + bytes(range(256)) * 40
    elif damage == "truncated":
        data = data[: len(data) // 3]
    elif damage == "png":
        data = Path(__file__).with_name("conftest.py").read_bytes()
    elif damage == "card-shape":
        card_data["inputs"][0]["shape"] = [1, 96, 96, 3]
    model.write_bytes(data)
    import hashlib

    card_data["sha256"] = hashlib.sha256(data).hexdigest()
    card.write_text(json.dumps(card_data))
    config = make_config(tmp_path, model, [{"name": "s", "kind": "synthetic"}])
    with pytest.raises(StartupError) as caught:
        Service(config)
    message = str(caught.value)
    assert str(model) in message
    expected = {"garbage": "corrupt", "truncated": "corrupt", "png": "not a TFLite model",
                "card-shape": "does not match the card"}[damage]
    assert expected in message
    assert not (tmp_path / "results").exists()


def test_a_cut_off_model_is_named_truncated_wherever_it_is_cut(default_model: Path) -> None:
    """The runtimes word a short file differently by where the cut falls; the bounds check
    names it the same way at every cut, and passes the whole file."""
    from edgebake_runtime.flatbuf import truncation

    data = default_model.read_bytes()
    assert truncation(data) is None
    missed = [n for n in range(1, 64) if truncation(data[: len(data) * n // 64]) is None]
    assert missed == []


def test_model_changed_after_its_card_was_written(tmp_path: Path, default_model: Path) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes(default_model.read_bytes() + b"\0")
    card = default_model.with_name(default_model.stem + ".card.json")
    (tmp_path / "m.card.json").write_text(card.read_text())
    config = make_config(tmp_path, model, [{"name": "s", "kind": "synthetic"}])
    with pytest.raises(StartupError, match=r"does not match its card"):
        Service(config)


@pytest.mark.parametrize(("data", "message"), [
    ({"sources": [{"name": "x", "kind": "webcam"}]}, "sources[0].kind: expected one of"),
    ({"sources": [{"name": "x", "kind": "rtsp"}]}, "sources[0].url: expected a value"),
    ({"inference": {"num_threads": "two"}}, "inference.num_threads: expected an integer"),
    ({"journal": {"fsync_interval": 1}}, "journal.fsync_interval: unknown setting"),
    ({"mqtt": {"port": 70000}}, "mqtt.port: expected an integer between 1 and 65535"),
])
def test_bad_config_names_field(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        validate(data, "/etc/edgebake/app.yaml")
    assert str(caught.value).startswith("/etc/edgebake/app.yaml: ")
    assert message in str(caught.value)


def test_seed_overrides_merge_over_app_yaml(tmp_path: Path) -> None:
    app = tmp_path / "app.yaml"
    app.write_text("model:\n  path: /m.tflite\nsources:\n  - {name: a, kind: synthetic}\n")
    overrides = tmp_path / "seed-overrides.yaml"
    overrides.write_text("device_id: unit-7\nmqtt:\n  host: broker.local\n")
    config = load_config(app, overrides)
    assert config.raw["device_id"] == "unit-7"
    assert config.raw["mqtt"]["host"] == "broker.local"
    assert config.sources[0].name == "a"
    overrides.write_text("mqtt:\n  port: zero\n")
    with pytest.raises(ConfigError, match=r"seed-overrides\.yaml: mqtt\.port"):
        load_config(app, overrides)


def test_unwritable_journal_file_is_replaced_and_counted(tmp_path: Path,
                                                          default_model: Path) -> None:
    """The newest journal file cannot take writes (here: it is /dev/full). The journal makes
    room, starts a new file and goes on; nothing is lost silently."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "results-000000001-20260101T000000.jsonl").symlink_to("/dev/full")
    config = make_config(tmp_path, default_model, [{"name": "s", "kind": "synthetic",
                                                    "fps": 20}])
    with RunningApp(Service(config)) as running:
        wait_for(lambda: running.app.metrics.results >= 5, 20, "results despite a bad file")
        health = wait_for(lambda: (h := running.health()) and h["journal"]["written"] >= 5
                          and h, 10, "the journal writing again")
        assert health["journal"]["error"] == ""
        assert health["journal"]["deleted_files"] == 1
        assert not (results / "results-000000001-20260101T000000.jsonl").is_symlink()
    lines = [json.loads(line) for f in sorted(results.glob("results-*.jsonl"))
             for line in f.read_text().splitlines()]
    assert len(lines) >= 5 and len({r["id"] for r in lines}) == len(lines)


def test_the_unit_prints_every_setting_it_takes() -> None:
    """One declaration gives each setting's type, default and help, as the recipe schema's."""
    import subprocess
    import sys

    from edgebake_runtime.config import DEFAULTS

    out = subprocess.run([sys.executable, "-m", "edgebake_runtime.main",
                          "--print-config-schema"], capture_output=True, text=True,
                         check=True).stdout
    for section, values in DEFAULTS.items():
        if isinstance(values, dict):
            for key in values:
                if not isinstance(values[key], dict):
                    assert f"{section}.{key} " in out, (section, key)
    assert "inference.num_threads            an integer between 0 and 16; default 0" in out
    assert "sources[].url" in out and "inference.workers" not in out
