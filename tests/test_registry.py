"""The model registry: a real MLflow server (SQLite, local artifacts) on 127.0.0.1.
register-model logs a converted model as a version with its figures; make-bundle fetches a
version by alias or number, and the bundle, the card and a unit's /health name it; every
registry mistake is one line, with nothing written."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.cache import sha256_file
from edgebake_builder.progress import Progress
from edgebake_builder.registry.server import RegistryServer
from edgebake_builder.steps.model import fetch_locked_model, read_models_lock
from helpers import invoke
from runtime_helpers import RunningApp, wait_for


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("registry")
    assert invoke("make-key", "--out", str(folder / "ops.key")).returncode == 0
    with RegistryServer.start(folder / "server", say=print) as server:
        yield {"uri": server.uri, "key": folder / "ops.key", "folder": folder}


def bundle_json(bundle: Path, member: str) -> dict[str, Any]:
    with tarfile.open(bundle) as tar:
        handle = tar.extractfile(member)
        assert handle is not None
        found: dict[str, Any] = json.loads(handle.read())
        return found


def run_query(uri: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(f"{uri}/api/2.0/mlflow/{path}",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        found: dict[str, Any] = json.loads(reply.read())
        return found


def test_register_then_bundle_by_alias_and_by_version(registry: dict[str, Any],
                                                      tmp_path: Path) -> None:
    """The acceptance's first two commands; the run holds the card and the figures, and the
    bundle records the registry, name, version, run id and the source's sha256."""
    uri = registry["uri"]
    model = fetch_locked_model(read_models_lock()["face_detection_full_range"], Progress(1))
    first = invoke("register-model", "--model", str(model), "--registry", uri, "--name",
                   "faces")
    assert first.returncode == 0, first.stderr
    assert "registered faces version 1" in first.stdout and "alias champion" in first.stdout
    second = invoke("register-model", "--model", str(model), "--registry", uri, "--name",
                    "faces", "--no-alias")
    assert "registered faces version 2" in second.stdout, second.stdout + second.stderr

    runs = run_query(uri, "runs/search", {"experiment_ids": [], "max_results": 10,
                                          "filter": "", "run_view_type": "ALL"})
    if not runs.get("runs"):  # experiment ids are required by some versions
        exp = run_query(uri, "experiments/search", {"max_results": 10})["experiments"]
        runs = run_query(uri, "runs/search",
                         {"experiment_ids": [e["experiment_id"] for e in exp]})
    metrics = {m["key"]: m["value"] for m in runs["runs"][0]["data"]["metrics"]}
    assert metrics["size_bytes"] == model.stat().st_size
    assert metrics["host_latency_ms"] > 0

    by_alias = tmp_path / "faces3.ebundle"
    made = invoke("make-bundle", "--model", "models:/faces@champion", "--registry", uri,
                  "--key", str(registry["key"]), "--version", "3", "--out", str(by_alias))
    assert made.returncode == 0, made.stderr
    manifest = bundle_json(by_alias, "manifest.json")
    card = bundle_json(by_alias, "model.card.json")
    for record in (manifest["registry"], card["registry"]):
        assert record["uri"] == uri and record["name"] == "faces"
        assert record["version"] == "1"  # the alias points at version 1, not the newest
        assert len(record["run_id"]) == 32
        assert record["source_sha256"] == sha256_file(model)
    by_number = tmp_path / "faces4.ebundle"
    made = invoke("make-bundle", "--model", "models:/faces/2", "--registry", uri,
                  "--key", str(registry["key"]), "--version", "4", "--out", str(by_number))
    assert made.returncode == 0, made.stderr
    assert bundle_json(by_number, "manifest.json")["registry"]["version"] == "2"
    assert bundle_json(by_number, "manifest.json")["registry"]["run_id"] != \
        manifest["registry"]["run_id"]


def test_a_unit_shows_where_its_model_came_from(registry: dict[str, Any], tmp_path: Path,
                                                default_model: Path) -> None:
    """/health (and so the MQTT health topic and fleet-status) names the registered
    version a unit runs once it took the bundle."""
    from test_model_update import install, update_app

    model = fetch_locked_model(read_models_lock()["face_detection_full_range"], Progress(1))
    assert invoke("register-model", "--model", str(model), "--registry", registry["uri"],
                  "--name", "gate-cam", "--alias", "prod").returncode == 0
    bundle = tmp_path / "b.ebundle"
    made = invoke("make-bundle", "--model", "models:/gate-cam@prod", "--registry",
                  registry["uri"], "--key", str(registry["key"]), "--version", "2.0",
                  "--out", str(bundle))
    assert made.returncode == 0, made.stderr
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "ops.pub").write_bytes(Path(f"{registry['key']}.pub").read_bytes())
    with RunningApp(update_app(tmp_path, default_model)) as running:
        install(running.app, bundle, keys)
        shown = wait_for(lambda: running.health()["model"]["registry"], 60,
                         "the registered model to serve")
    assert shown["name"] == "gate-cam" and shown["version"] == "1", shown
    assert shown["uri"] == registry["uri"]


@pytest.mark.tensorflow
def test_a_registered_keras_model_is_converted_when_bundled(registry: dict[str, Any],
                                                            tmp_path: Path) -> None:
    from edgebake_builder.bench.digits import train_digits_cnn
    from edgebake_builder.registry.client import register

    digits = train_digits_cnn(tmp_path / "digits", epochs=1)
    register(registry["uri"], "digits", [digits["model"]], {}, {}, {}, ["candidate"])
    bundle = tmp_path / "digits.ebundle"
    made = invoke("make-bundle", "--model", "models:/digits@candidate", "--registry",
                  registry["uri"], "--key", str(registry["key"]), "--version", "1.0",
                  "--out", str(bundle))
    assert made.returncode == 0, made.stderr
    card = bundle_json(bundle, "model.card.json")
    assert card["source"]["format"] == "keras", card["source"]
    assert card["task"] == "classification"
    assert card["registry"]["source_sha256"] == sha256_file(digits["model"])


def test_registry_mistakes_are_one_line_and_write_nothing(registry: dict[str, Any],
                                                          tmp_path: Path) -> None:
    from edgebake_builder.registry.client import register

    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    register(registry["uri"], "notes", [notes], {}, {}, {}, ["champion"])
    out = tmp_path / "never.ebundle"
    key = str(registry["key"])
    cases = [
        (["--model", "models:/faces@champion", "--registry", "http://127.0.0.1:1"],
         "registry http://127.0.0.1:1 does not answer"),
        (["--model", "models:/nobody@champion", "--registry", registry["uri"]],
         "the registry has no model 'nobody' with alias 'champion'"),
        (["--model", "models:/faces@nope", "--registry", registry["uri"]],
         "the registry has no model 'faces' with alias 'nope'"),
        (["--model", "models:/faces/99", "--registry", registry["uri"]],
         "the registry has no model 'faces' with version 99"),
        (["--model", "models:/notes@champion", "--registry", registry["uri"]],
         "holds neither a .tflite nor a model convert-model takes"),
        (["--model", "models:/faces", "--registry", registry["uri"]],
         "expected models:/<name>@<alias> or models:/<name>/<version>"),
        (["--model", "models:/faces@champion"], "needs --registry"),
    ]
    for args, message in cases:
        result = invoke("make-bundle", *args, "--key", key, "--version", "9", "--out",
                        str(out))
        assert result.returncode == 1, (args, result.stdout)
        assert message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
    wrong = invoke("register-model", "--model", str(notes), "--registry", registry["uri"],
                   "--name", "faces")
    assert wrong.returncode == 1 and "expected a .tflite" in wrong.stderr, wrong.stderr


def test_collected_samples_go_to_the_registry_as_a_dataset(registry: dict[str, Any],
                                                           tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    samples = tmp_path / "samples"
    samples.mkdir()
    for number in range(3):
        name = f"1796356551_{number:03d}-cam-{number}"
        Image.fromarray(np.full((24, 32, 3), number * 60, np.uint8)).save(samples / f"{name}.jpg")
        (samples / f"{name}.json").write_text("{}")
    made = invoke("samples-to-dataset", "--samples", str(samples), "--out",
                  str(tmp_path / "data.npz"), "--registry", registry["uri"], "--name",
                  "north-week-49")
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.strip().splitlines()[-1].split(" as run ")[1].split()[0]
    import urllib.request

    with urllib.request.urlopen(f"{registry['uri']}/api/2.0/mlflow/artifacts/list?run_id="
                                f"{run_id}&path=dataset", timeout=30) as reply:
        listed = json.loads(reply.read())
    assert [f["path"] for f in listed["files"]] == ["dataset/data.npz"], listed
