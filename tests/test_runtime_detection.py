"""Real inference with tflite-runtime, as a camera process runs it: BlazeFace boxes on real
pictures, preprocessing maths."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_runtime.camera.model import LoadedModel
from edgebake_runtime.card import card_path_for
from edgebake_runtime.frames import Frame
from edgebake_runtime.postprocess import blazeface_anchors
from edgebake_runtime.preprocess import Preprocessor
from PIL import Image
from runtime_helpers import ASTRONAUT_BOX, astronaut_path, china_image


def make_worker(model: Path) -> LoadedModel:
    """The model as a camera process loads it (one interpreter thread)."""
    return LoadedModel.load(model, card_path_for(model), "test", 1, 1)


def detect(loaded: LoadedModel, image: np.ndarray[Any, Any]) -> list[dict[str, Any]]:
    """One frame through the camera process's steps: into the input, invoke, decode."""
    frame = Frame("test", 1, time.monotonic(), time.time(), image)
    loaded.fill_input(frame)
    loaded.interpreter.invoke()
    outputs = [loaded.interpreter.get_tensor(i) for i in loaded.outputs]
    result = loaded.decode(loaded.card, outputs, frame.placement, None, 3)
    return list(result["detections"])


def astronaut() -> np.ndarray[Any, Any]:
    return np.asarray(Image.open(astronaut_path()).convert("RGB"))


def test_blazeface_finds_the_astronauts_face(default_model: Path) -> None:
    worker = make_worker(default_model)
    faces = detect(worker, astronaut())
    assert len(faces) == 1
    assert faces[0]["score"] > 0.8
    assert faces[0]["box"] == pytest.approx(ASTRONAUT_BOX, abs=0.03)
    assert len(faces[0]["keypoints"]) == 6


def test_blazeface_finds_no_face_in_china_jpg(default_model: Path) -> None:
    worker = make_worker(default_model)
    assert detect(worker, china_image()) == []


def test_boxes_map_back_through_letterboxing(default_model: Path) -> None:
    """The same face padded into a wide frame must come back at the same place in it."""
    worker = make_worker(default_model)
    face = astronaut()
    wide = np.zeros((512, 640, 3), dtype=np.uint8)
    wide[:, 128:] = face
    faces = detect(worker, wide)
    assert len(faces) == 1
    x0, y0, x1, y1 = ASTRONAUT_BOX
    expected = [(128 + x0 * 512) / 640, y0, (128 + x1 * 512) / 640, y1]
    assert faces[0]["box"] == pytest.approx(expected, abs=0.03)


def test_full_range_variant_uses_the_cards_anchors(tmp_path: Path) -> None:
    from edgebake_builder.modelcard import write_card
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.model import fetch_locked_model, read_models_lock

    cached = fetch_locked_model(read_models_lock()["face_detection_full_range"], Progress(1))
    model = tmp_path / "full.tflite"
    model.write_bytes(cached.read_bytes())
    card = write_card(model, tmp_path / "full.card.json")
    assert card["postprocessing"]["blazeface"]["variant"] == "full_range"
    worker = make_worker(model)
    faces = detect(worker, astronaut())
    assert len(faces) == 1
    assert faces[0]["box"] == pytest.approx(ASTRONAUT_BOX, abs=0.04)


def test_anchor_counts_match_both_variants() -> None:
    assert blazeface_anchors(128, (8, 16, 16, 16), 0.5, 1.0).shape == (896, 2)
    assert blazeface_anchors(192, (4,), 0.5, 0.0).shape == (2304, 2)


def test_int8_preprocessing_quantises_with_scale_and_zero_point(tmp_path: Path) -> None:
    import json

    from edgebake_runtime.card import Card

    data = {"task": "classification", "sha256": "x", "outputs": [],
            "inputs": [{"name": "in", "shape": [1, 4, 4, 3], "dtype": "int8",
                        "quantization": {"scale": 1 / 255, "zero_point": -128}}],
            "preprocessing": {"range": [0.0, 1.0]}}
    card = Card(data=json.loads(json.dumps(data)), path=tmp_path / "c.json")
    pre = Preprocessor(card)
    frame = np.array([[[0, 128, 255]] * 4] * 4, dtype=np.uint8)
    tensor, _ = pre(frame)
    assert tensor.dtype == np.int8
    assert tensor[0, 0, 0].tolist() == [-128, 0, 127]
