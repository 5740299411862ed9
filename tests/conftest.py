"""Shared fixtures: the project's default model and a built image."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import INVOKE, ROOT, partition_table


@pytest.fixture(scope="session")
def default_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped BlazeFace model with a card and golden outputs, in a temp folder (the card
    is made in a child process: TensorFlow, if a test loaded it, clashes with tflite-runtime)."""
    from edgebake_builder.convert.isolated import write_card
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.model import DEFAULT_MODEL, fetch_locked_model, read_models_lock

    folder = tmp_path_factory.mktemp("model")
    cached = fetch_locked_model(read_models_lock()[DEFAULT_MODEL], Progress(1))
    model = folder / "face_detection_short_range.tflite"
    model.write_bytes(cached.read_bytes())
    write_card(model, folder / "face_detection_short_range.card.json", model.stem, {})
    return model


collect_ignore = ["image_checks"]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`invoke make-os-key --out keys` (once) and `invoke build-image --target pi4` into
    out/pi4, exactly as the README says."""
    if not (ROOT / "keys" / "os-ca.crt").is_file():
        keys = subprocess.run([*INVOKE, "make-os-key", "--out", "keys"], cwd=ROOT, text=True,
                              check=False)
        assert keys.returncode == 0, "invoke make-os-key --out keys failed"
    result = subprocess.run([*INVOKE, "build-image", "--target", "pi4"], cwd=ROOT, text=True,
                            check=False)
    assert result.returncode == 0, "invoke build-image --target pi4 failed (see output above)"
    out = ROOT / "out" / "pi4"
    manifest = json.loads((out / "manifest.json").read_text())
    return {"out": out, "manifest": manifest, "image": out / manifest["image"],
            "partitions": partition_table(out / manifest["image"])}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fast tests first, then the image build, then the QEMU boot that needs the image.
    Tests that import TensorFlow get the `tensorflow` marker: `invoke test` runs them in a
    pytest process of their own, since TensorFlow's TFLite build clashes with tflite-runtime."""
    for item in items:
        if item.path.name == "test_convert.py":
            item.add_marker(pytest.mark.tensorflow)

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("boot"):
            return 2
        if item.get_closest_marker("image"):
            return 1
        return 0

    items.sort(key=rank)
