"""convert-model from PyTorch (.pt2 through litert-torch) and ONNX (through onnx2tf), with
the real toolchains: four quantisations, the gate against torch and onnxruntime, layout and
normalisation as the unit applies them, and YOLO decoding against Ultralytics' own."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_builder.convert import toolchain
from edgebake_builder.convert.converter import ConvertOptions, ConvertResult, convert_model
from edgebake_builder.errors import BuildError
from edgebake_runtime.card import load_card
from edgebake_runtime.interp import load_interpreter
from edgebake_runtime.postprocess import yolo as yolo_decoder
from edgebake_runtime.preprocess import Placement, Preprocessor
from edgebake_runtime.yolo import decode
from helpers import INVOKE, ROOT, invoke

pytestmark = pytest.mark.torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgebake_builder.examples.models import make_examples

    out = tmp_path_factory.mktemp("examples")
    trained = make_examples(out)
    assert trained["accuracy"] > 0.85, trained
    return out


def convert(examples: Path, out: Path, model: str, quantize: str, **kw: Any) -> ConvertResult:
    options = ConvertOptions(
        model=examples / model, output=out, quantize=quantize,
        representative_data=kw.pop("representative", examples / "rep.npz"),
        validation_data=kw.pop("validation", examples / "val.npz"),
        mean=kw.pop("mean", None), std=kw.pop("std", None), **kw)
    return convert_model(options)


Converted = dict[tuple[str, str], ConvertResult]


@pytest.fixture(scope="module")
def converted(examples: Path, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """Conversions shared by the tests of this module, made once each."""
    return {}


def converted_once(cache: Converted, examples: Path, model: str, quantize: str,
                   tmp: Path) -> ConvertResult:
    if (model, quantize) not in cache:
        out = tmp / f"{model.replace('.', '_')}_{quantize}.tflite"
        cache[model, quantize] = convert(examples, out, model, quantize)
    return cache[model, quantize]


# CI converts what the acceptance commands convert (and float32 and float16 for the
# size claim); every other path and mode is in `invoke test --long`.
CASES = [("resnet18.pt2", "int8"), ("resnet18.onnx", "float16"), ("resnet18.pt2", "float16"),
         pytest.param("resnet18.pt2", "dynamic", marks=pytest.mark.long),
         pytest.param("resnet18.onnx", "dynamic", marks=pytest.mark.long),
         pytest.param("resnet18.onnx", "int8", marks=pytest.mark.long),
         pytest.param("resnet18.onnx", "none", marks=pytest.mark.long)]


@pytest.mark.parametrize(("model", "quantize"), CASES)
def test_resnet18_converts_and_passes_the_gate(examples: Path, converted: Converted,
                                               tmp_path_factory: pytest.TempPathFactory,
                                               model: str, quantize: str) -> None:
    result = converted_once(converted, examples, model, quantize,
                            tmp_path_factory.mktemp("r18"))
    card = json.loads(result.card_path.read_text())
    source = card["source"]
    assert source["format"] == model.split(".")[1] and source["layout"] == "NCHW"
    assert source["converter"] == ("litert-torch" if model.endswith(".pt2") else "onnx2tf")
    assert source["converter"] in card["tools"]
    assert ("torch" if model.endswith(".pt2") else "onnxruntime") in card["tools"]
    if quantize != "none":
        assert "ai-edge-quantizer" in card["tools"]
    assert card["inputs"][0]["shape"] == [1, 64, 64, 3], "the unit's frames are NHWC"
    assert card["task"] == "classification" and card["quantization"] == quantize
    assert card["postprocessing"]["classification"]["softmax"] is True, "logits, made scores"
    assert card["preprocessing"]["mean"] == pytest.approx([v * 255 for v in MEAN])
    assert card["preprocessing"]["std"] == pytest.approx([v * 255 for v in STD])
    if quantize == "int8":
        assert card["inputs"][0]["dtype"] == "int8" and card["outputs"][0]["dtype"] == "int8"
    acc = card["accuracy"]
    assert acc["metric"] == "accuracy" and acc["reference"] > 0.85, acc
    assert acc["delta"] <= 0.01 and acc["samples"] == 360 and acc["data"] == "validation"
    assert acc["top1_agreement"] > 0.95 and acc["max_abs_deviation"] > 0
    assert card["runtimes"]["ai-edge-litert"]["ok"], card["runtimes"]


def test_float16_and_int8_shrink_as_claimed(examples: Path, converted: Converted,
                                           tmp_path: Path) -> None:
    sizes = {q: converted_once(converted, examples, "resnet18.pt2", q, tmp_path).size_bytes
             for q in ("none", "float16", "int8")}
    assert 0.4 <= sizes["float16"] / sizes["none"] <= 0.6, sizes
    assert sizes["int8"] / sizes["none"] <= 0.3, sizes


def test_the_gate_refuses_a_damaged_conversion_and_writes_nothing(examples: Path,
                                                                  tmp_path: Path) -> None:
    """int8 ranges calibrated on inputs a thousand times too small clip every real input."""
    data = np.load(examples / "rep.npz")
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=data["x"] / 1000.0)
    out = tmp_path / "out" / "r18.tflite"
    with pytest.raises(BuildError, match="accuracy gate failed") as caught:
        convert(examples, out, "resnet18.pt2", "int8", representative=tiny)
    assert "nothing was written" in str(caught.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def _pixels(examples: Path, count: int) -> np.ndarray[Any, Any]:
    """Validation digits back as the uint8 RGB frames a camera would give."""
    x: np.ndarray[Any, Any] = np.load(examples / "val.npz")["x"][:count]  # NCHW, normalised
    rgb = x.transpose(0, 2, 3, 1) * np.array(STD) + np.array(MEAN)
    frames: np.ndarray[Any, Any] = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)
    return frames


def test_the_unit_normalises_as_torch_does(examples: Path, converted: Converted,
                                          tmp_path: Path) -> None:
    """The same frames give the same classes through torch (ToTensor + Normalize) and
    through the unit's preprocessing from the card and the converted model."""
    result = converted_once(converted, examples, "resnet18.pt2", "none", tmp_path)
    card = load_card(result.card_path)
    frames = _pixels(examples, 40)
    as_torch = ((frames / 255.0 - np.array(MEAN)) / np.array(STD)).astype(np.float32)
    source_path = tmp_path / "frames.npy"
    np.save(source_path, np.ascontiguousarray(as_torch.transpose(0, 3, 1, 2)))
    reference = tmp_path / "reference.npy"
    toolchain.call("torch", "edgebake_builder.convert.torch_child", "reference",
                   {"model": str(examples / "resnet18.pt2"), "x": str(source_path),
                    "out": str(reference)})
    torch_classes = np.load(reference).argmax(axis=1)
    interpreter = load_interpreter(result.output, num_threads=1)
    preprocess = Preprocessor(card)
    unit_classes = []
    for frame in frames:
        tensor, _ = preprocess(frame)
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
        interpreter.invoke()
        unit_classes.append(int(interpreter.get_tensor(
            interpreter.get_output_details()[0]["index"]).argmax()))
    assert list(torch_classes) == unit_classes
    assert len(set(unit_classes)) >= 5, "the frames are of several digits"


def _ultralytics(heads: np.ndarray[Any, Any], tmp: Path, conf: float, iou: float,
                 max_det: int) -> list[dict[str, Any]]:
    raw, found = tmp / "heads.npy", tmp / "found.json"
    np.save(raw, heads)
    proc = subprocess.run([str(toolchain.python_for("torch")), str(ROOT / "tests" /
                                                                    "yolo_reference.py"),
                           str(raw), str(found), str(conf), str(iou), str(max_det)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result: list[dict[str, Any]] = json.loads(found.read_text())
    return result


def _crowded_heads(count: int, classes: int, anchors: int) -> np.ndarray[Any, Any]:
    """Raw heads with clusters of overlapping boxes of a few classes, distinct scores."""
    rng = np.random.default_rng(7)
    heads = np.zeros((count, 4 + classes, anchors), np.float32)
    for head in heads:
        centres = rng.uniform(40, 280, size=(12, 2))
        which = rng.integers(0, 12, anchors)
        head[0:2] = (centres[which] + rng.normal(0, 6, (anchors, 2))).T
        head[2:4] = rng.uniform(20, 90, (2, anchors))
        head[4:] = rng.uniform(0, 0.2, (classes, anchors))
        hot = rng.integers(0, 6, anchors)
        head[4 + hot, np.arange(anchors)] = rng.uniform(0.05, 0.99, anchors)
    return heads


def test_yolo11n_from_onnx_decodes_as_ultralytics_does(examples: Path, tmp_path: Path) -> None:
    result = convert(examples, tmp_path / "yolo.tflite", "yolo11n.onnx", "float16",
                     representative=None, validation=None, labels=examples / "coco.txt")
    card = load_card(result.card_path)
    assert card.task == "yolo" and len(card.labels) == 80 and card.labels[0] == "person"
    assert card.preprocessing["fit"] == "letterbox" and card.outputs[0].shape == (1, 84, 2100)
    assert card.data["source"]["converter"] == "onnx2tf"
    assert "FlexSplitV" not in card.data["ops"]
    interpreter = load_interpreter(result.output, num_threads=1)
    frame = np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    tensor, placement = Preprocessor(card)(frame)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
    interpreter.invoke()
    model_head = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    # An untrained head gives every anchor the same tiny score, and ties leave NMS's order
    # to the sort's whim: the model's own head is only checked for its shape here (the gate
    # compared it with onnxruntime's); the decoders meet on crowded heads with many
    # overlapping boxes and distinct scores.
    assert model_head.shape == (1, 84, 2100) and card.data["accuracy"]["data"] == "synthetic"
    assert card.data["accuracy"]["max_abs_deviation"] < 1.0
    crowded = _crowded_heads(5, 80, 2100)
    cases = [(crowded, 0.25), (crowded, 0.6)]
    compared = 0
    for heads, conf in cases:
        expected = _ultralytics(heads, tmp_path, conf, 0.7, 300)
        for head, want in zip(heads, expected, strict=True):
            got = decode(head, conf, 0.7, 300)
            assert got.classes.tolist() == want["classes"]
            assert np.allclose(got.boxes, np.asarray(want["boxes"]).reshape(-1, 4), atol=1e-3)
            assert np.allclose(got.scores, want["scores"], atol=1e-6)
            compared += len(want["classes"])
    assert compared > 50, "enough detections to compare"
    frame_result = yolo_decoder(card, [crowded[:1]], placement, None, 3)
    assert frame_result["task"] == "yolo" and frame_result["detections"]
    first = frame_result["detections"][0]
    assert first["label"] in card.labels and all(0.0 <= v <= 1.0 for v in first["box"])
    assert isinstance(placement, Placement)


@pytest.mark.parametrize(("case", "args", "expected"), [
    ("mean of the wrong length", ["--mean", "0.5,0.5", "--std", "0.2,0.2,0.2"],
     "--mean: expected 1 or 3 values"),
    ("std without mean", ["--std", "0.2,0.2,0.2"], "--mean and --std go together"),
    ("a converter for another format", ["--converter", "litert-torch"], "converts with onnx2tf"),
    ("shape that is not numbers", ["--input-shape", "1,3,x,64"], "--input-shape: expected"),
])
def test_bad_options_get_one_line(examples: Path, tmp_path: Path, case: str,
                                  args: list[str], expected: str) -> None:
    out = tmp_path / "out.tflite"
    proc = invoke("convert-model", "--model", str(examples / "resnet18.onnx"), "--output",
                  str(out), *args)
    assert proc.returncode == 1, case
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not out.exists()


def test_the_acceptance_command_prints_the_gate_and_reads_the_models_normalisation(
        examples: Path, tmp_path: Path) -> None:
    """The issue's first command as written: no --mean/--std, the .pt2 carries them."""
    out = tmp_path / "r18.tflite"
    proc = invoke("convert-model", "--model", str(examples / "resnet18.pt2"), "--quantize",
                  "int8", "--representative-data", str(examples / "rep.npz"),
                  "--validation-data", str(examples / "val.npz"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "[4/4] the card" in proc.stdout and "gate: accuracy: original 0.9" in proc.stdout
    assert "top-1 agreement" in proc.stdout and "max |deviation|" in proc.stdout
    card = json.loads(out.with_name("r18.card.json").read_text())
    assert card["preprocessing"]["mean"] == pytest.approx([v * 255 for v in MEAN])


def test_normalised_data_without_mean_and_std_is_refused(examples: Path,
                                                         tmp_path: Path) -> None:
    """A program saved without its normalisation, and data that went through one."""
    bare = tmp_path / "bare.pt2"
    proc = subprocess.run([str(toolchain.python_for("torch")), "-c",
                           "import sys, torch; torch.export.save(torch.export.load(sys.argv[1]), "
                           "sys.argv[2])", str(examples / "resnet18.pt2"), str(bare)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-1000:]
    with pytest.raises(BuildError, match=r"val.npz: samples go down to -[0-9.]+, so they were "
                                         r"normalised; pass --mean and --std"):
        convert_model(ConvertOptions(model=bare, output=tmp_path / "x.tflite",
                                     validation_data=examples / "val.npz"))
    assert not (tmp_path / "x.tflite").exists()


def test_representative_data_of_the_wrong_shape_is_refused(examples: Path,
                                                           tmp_path: Path) -> None:
    wrong = tmp_path / "rep.npz"
    np.savez(wrong, x=np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(BuildError, match=r"rep.npz: representative data has samples of shape "
                                         r"\[3, 32, 32\].*\[64, 64, 3\].*\[3, 64, 64\]"):
        convert(examples, tmp_path / "x.tflite", "resnet18.pt2", "int8", representative=wrong)


@pytest.mark.image
@pytest.mark.boot
@pytest.mark.long
def test_resnet18_int8_image_classifies_on_the_booted_unit(examples: Path, converted: Converted,
                                                           tmp_path: Path) -> None:
    """Issue acceptance: the int8 ResNet18 from its .pt2 baked into a pi4 image, booted,
    classifying with the card's normalisation (the running checks read its journal lines)."""
    result = converted_once(converted, examples, "resnet18.pt2", "int8", tmp_path)
    out = tmp_path / "out"
    build = invoke("build-image", "--target", "pi4", "--model", str(result.output),
                   "--out", str(out))
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    card = manifest["model"]["card"]
    assert card["task"] == "classification" and card["source"]["format"] == "pt2"
    assert card["preprocessing"]["mean"] == pytest.approx([v * 255 for v in MEAN])
    assert manifest["model"]["verified_on_target"] is True
    image = next(out.glob("*.img"))
    tested = subprocess.run([*INVOKE, "test-image", "--image", str(image),
                             "--no-update-trials", "--no-supervision-trials"], cwd=ROOT,
                            text=True, check=False)
    assert tested.returncode == 0, "invoke test-image on the ResNet18 image failed (see above)"


@pytest.mark.long
def test_yolo11n_int8_from_onnx_calibrates_on_photographs(examples: Path, tmp_path: Path) -> None:
    """Full int8 of a model onnx2tf wrote without a signature (one is added to calibrate)."""
    from edgebake_builder.bench.convert_torch import _yolo_frames

    frames = _yolo_frames(tmp_path / "frames.npz", 320)
    result = convert(examples, tmp_path / "yolo8.tflite", "yolo11n.onnx", "int8",
                     representative=frames, validation=None, labels=examples / "coco.txt")
    card = load_card(result.card_path)
    assert card.task == "yolo" and card.inputs[0].dtype == "int8"
    assert card.data["accuracy"]["data"] == "synthetic"
    assert result.size_bytes < 0.35 * (examples / "yolo11n.onnx").stat().st_size
