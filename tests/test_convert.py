"""convert-model with real TensorFlow: four quantisations, cards, the gate, and bad inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edgebake_builder.errors import BuildError

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from edgebake_builder.bench.digits import train_digits_cnn

    return train_digits_cnn(tmp_path_factory.mktemp("digits"), epochs=6)


def convert(digits: dict[str, Path], out: Path, quantize: str, **kw: Any) -> Any:
    from edgebake_builder.convert.converter import ConvertOptions, convert_model

    options = ConvertOptions(model=kw.pop("model", digits["model"]), output=out,
                             quantize=quantize,
                             representative_data=kw.pop("representative",
                                                        digits["representative"]),
                             validation_data=kw.pop("validation", digits["validation"]), **kw)
    return convert_model(options)


@pytest.mark.parametrize("quantize", ["none", "dynamic", "float16", "int8"])
def test_four_ways_with_cards(digits: dict[str, Path], tmp_path: Path, quantize: str) -> None:
    """A Keras 3 model saved by the current TensorFlow: converted, gated, and checked under
    each device runtime (in processes without TensorFlow, as on a unit)."""
    result = convert(digits, tmp_path / f"m_{quantize}.tflite", quantize)
    card = json.loads(result.card_path.read_text())
    assert card["sha256"] == __import__("hashlib").sha256(result.output.read_bytes()).hexdigest()
    assert card["size_bytes"] == result.output.stat().st_size
    assert card["task"] == "classification" and card["labels"] == [str(i) for i in range(10)]
    assert card["quantization"] == quantize
    assert {"tensorflow", "edgebake", card["golden"]["runtime"]} <= set(card["tools"])
    assert card["tools"]["tensorflow"].startswith("2.2")
    runtimes = card["runtimes"]
    assert set(runtimes) == {"tflite-runtime", "ai-edge-litert"}
    assert runtimes["ai-edge-litert"]["ok"] is True, runtimes["ai-edge-litert"]
    assert runtimes["ai-edge-litert"]["version"] == "2.3.0"
    for verdict in runtimes.values():
        assert verdict["ok"] or "cannot load" in verdict["error"] or "golden" in verdict["error"]
    assert "CONV_2D" in card["ops"] and "FULLY_CONNECTED" in card["ops"]
    assert card["golden"]["count"] == 3
    acc = card["accuracy"]
    assert acc["metric"] == "accuracy" and acc["reference"] > 0.9
    assert acc["delta"] == pytest.approx(acc["reference"] - acc["converted"], abs=1e-5)
    assert acc["delta"] <= 0.01
    expected = {"int8": "int8"}.get(quantize, "float32")
    assert card["inputs"][0]["dtype"] == expected
    if quantize == "int8":
        scale, _ = card["inputs"][0]["quantization"].values()
        assert scale > 0 and card["outputs"][0]["dtype"] == "int8"


def test_sizes_shrink_as_expected(digits: dict[str, Path], tmp_path: Path) -> None:
    sizes = {q: convert(digits, tmp_path / f"{q}.tflite", q, validation=None).size_bytes
             for q in ("none", "float16", "int8")}
    assert 0.4 < sizes["float16"] / sizes["none"] < 0.6
    assert sizes["int8"] / sizes["none"] < 0.35


def test_float16_and_int8_variants_ship_and_are_measured_by_the_unit(
        digits: dict[str, Path], tmp_path: Path) -> None:
    """The digits model converted three ways, each through its gate: the float model is the
    image's, float16 and int8 its variants (recipe model.variants). Installed as the image
    has them, the unit's measurement (in a process without TensorFlow) golden-tests each with
    the device runtime and measures it; the choice is one of the three."""
    from edgebake_builder.progress import Progress
    from edgebake_builder.steps.install import install_model
    from edgebake_builder.steps.model import prepare_model, prepare_variants
    from edgebake_builder.steps.rootfs import inside
    from edgebake_runtime.threadtune import tune_in_child

    made = {q: convert(digits, tmp_path / "made" / f"digits_{q}.tflite", q).output
            for q in ("none", "float16", "int8")}
    main = prepare_model(str(made["none"]), tmp_path / "work", Progress(1))
    prepared = prepare_variants([str(made["float16"]), str(made["int8"])], main, Progress(1))
    assert [v.card["quantization"] for v in prepared.variants] == ["float16", "int8"]
    assert {v.card["version"] for v in prepared.variants} == {main.card["version"]}
    rootfs = tmp_path / "rootfs"
    model = inside(rootfs, install_model(prepared, rootfs))
    tuning = tune_in_child(model, 1, 1, tmp_path / "threads.json", False)
    assert set(tuning.variants) == {"digits_float16", "digits_int8"}, tuning
    assert not tuning.refused, tuning.refused
    assert tuning.variant in ("", "digits_float16", "digits_int8")
    assert all(rate > 0 for table in tuning.variants.values() for rate in table.values())


def test_gate_fails_on_bad_calibration_and_leaves_nothing(digits: dict[str, Path],
                                                          tmp_path: Path) -> None:
    blank = tmp_path / "blank.npz"
    np.savez(blank, x=np.zeros((50, 8, 8, 1), np.float32))
    out = tmp_path / "out" / "m.tflite"
    with pytest.raises(BuildError) as caught:
        convert(digits, out, "int8", representative=blank, max_accuracy_loss=0.01)
    message = str(caught.value)
    assert message.startswith("accuracy gate failed: accuracy ")
    assert "(original)" in message and "> --max-accuracy-loss 0.01" in message
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("case", ["not-a-model", "no-signature", "shapes", "empty-folder",
                                  "int8-without-data"])
def test_bad_inputs_get_one_clear_error(digits: dict[str, Path], tmp_path: Path,
                                        case: str) -> None:
    import tensorflow as tf

    kwargs: dict[str, Any] = {}
    quantize = "none"
    if case == "not-a-model":
        bogus = tmp_path / "bogus.keras"
        bogus.write_text("not a model")
        kwargs["model"], expected = bogus, "not a loadable Keras model"
    elif case == "no-signature":
        module = tf.Module()
        module.v = tf.Variable(1.0)
        tf.saved_model.save(module, str(tmp_path / "sm"))
        kwargs["model"], expected = tmp_path / "sm", "has no serving_default signature"
    elif case == "shapes":
        wrong = tmp_path / "wrong.npz"
        np.savez(wrong, x=np.zeros((10, 16, 16, 1), np.float32))
        kwargs["representative"], quantize = wrong, "int8"
        expected = "representative data has samples of shape [16, 16, 1]"
    elif case == "empty-folder":
        (tmp_path / "val" / "cats").mkdir(parents=True)
        kwargs["validation"], expected = tmp_path / "val", "validation data is empty"
    else:
        kwargs["representative"], quantize = None, "int8"
        expected = "needs --representative-data"
    out = tmp_path / "o" / "m.tflite"
    with pytest.raises(BuildError) as caught:
        convert(digits, out, quantize, **kwargs)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not out.exists() and not out.with_name("m.card.json").exists()


def test_cli_prints_the_figures_and_one_line_errors(digits: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "m.tflite"
    cmd = [sys.executable, "-m", "invoke", "convert-model", "--model", str(digits["model"]),
           "--quantize", "int8", "--representative-data", str(digits["representative"]),
           "--validation-data", str(digits["validation"]), "--output", str(out)]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "accuracy: original 0." in ok.stdout and "delta" in ok.stdout
    assert out.is_file() and out.with_name("m.card.json").is_file()
    bad = subprocess.run([*cmd[:8], "--output", str(tmp_path / "x.tflite")], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "needs --representative-data" in bad.stderr


def unsupported_models(folder: Path) -> dict[str, Path]:
    """One model with a Flex (SELECT_TF_OPS) op and one with a custom op."""
    import tensorflow as tf

    class Det(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 3, 3], tf.float32)], autograph=False)
        def f(self, x: Any) -> Any:
            return tf.linalg.det(x)

    class Igamma(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)], autograph=False)
        def f(self, x: Any) -> Any:
            return tf.math.igamma(x, x)

    paths = {}
    for name, module, ops, custom in (
            ("flex", Det(), [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS],
             False),
            ("custom", Igamma(), [tf.lite.OpsSet.TFLITE_BUILTINS], True)):
        conv = tf.lite.TFLiteConverter.from_concrete_functions(
            [module.f.get_concrete_function()], module)
        conv.target_spec.supported_ops = ops
        conv.allow_custom_ops = custom
        paths[name] = folder / f"{name}.tflite"
        paths[name].write_bytes(conv.convert())
    return paths


def without_tensorflow(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Device runtimes run in a process without TensorFlow (its TFLite build clashes)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          check=False, cwd=ROOT)


INSPECT = """
import sys
from pathlib import Path
from edgebake_builder.errors import BuildError
from edgebake_builder.modelcard import inspect_model
try:
    inspect_model(Path(sys.argv[1]))
except BuildError as exc:
    print(exc)
"""


def test_flex_and_custom_ops_are_rejected_naming_the_op(tmp_path: Path) -> None:
    models = unsupported_models(tmp_path)
    flex = without_tensorflow(INSPECT, str(models["flex"])).stdout
    assert re.search(r"Flex\w*MatrixDeterminant", flex), flex
    custom = without_tensorflow(INSPECT, str(models["custom"])).stdout
    assert "custom op: Igamma" in custom
    result = subprocess.run([sys.executable, "-m", "invoke", "build-image", "--model",
                             str(models["flex"]), "--out", str(tmp_path / "out")], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "Flex" in result.stderr


def test_golden_mismatch_names_the_largest_deviation(default_model: Path,
                                                     tmp_path: Path) -> None:
    """What the build runs inside the target rootfs: drifted golden outputs fail it."""
    card_path = default_model.with_name(default_model.stem + ".card.json")
    card = json.loads(card_path.read_text())
    golden = dict(np.load(card_path.parent / card["golden"]["file"]))
    golden["output_1_0"] = golden["output_1_0"] + 0.5
    model = tmp_path / default_model.name
    model.write_bytes(default_model.read_bytes())
    np.savez(tmp_path / card["golden"]["file"], **golden)
    (tmp_path / card_path.name).write_text(json.dumps(card))
    def check(model: Path, card: Path, runtime: str) -> dict[str, Any]:
        proc = without_tensorflow("from edgebake_runtime.selfcheck import main; main()",
                                  "--model", str(model), "--card", str(card),
                                  "--runtime", runtime)
        report: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
        return report

    for runtime in ("tflite-runtime", "ai-edge-litert"):
        report = check(model, tmp_path / card_path.name, runtime)
        assert report["ok"] is False and report["runtime"] == runtime
        assert "golden case 1" in report["error"] and "largest deviation 0.5" in report["error"]
        good = check(default_model, card_path, runtime)
        assert good["ok"] is True and good["runtime"] == runtime


@pytest.mark.image
def test_auto_runtime_takes_ai_edge_litert_when_tflite_runtime_cannot_load(
        digits: dict[str, Path], tmp_path: Path) -> None:
    """TF 2.21's dynamic-range model uses FULLY_CONNECTED v12, newer than tflite-runtime 2.14
    knows: the pi4 (bookworm) build picks ai-edge-litert and says why, in log and manifest."""
    result = convert(digits, tmp_path / "dyn.tflite", "dynamic")
    card = json.loads(result.card_path.read_text())
    old = card["runtimes"]["tflite-runtime"]
    assert old["ok"] is False and "FULLY_CONNECTED" in old["error"], old
    out = tmp_path / "out"
    build = subprocess.run([sys.executable, "-m", "invoke", "build-image", "--target", "pi4",
                            "--model", str(result.output), "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    runtime = manifest["model"]["runtime"]
    assert runtime["name"] == "ai-edge-litert" and runtime["version"] == "2.3.0"
    assert "FULLY_CONNECTED" in runtime["reason"] and "version '12'" in runtime["reason"]
    assert manifest["model"]["verified_on_target"] is True
    assert manifest["model"]["target_runtime"]["runtime"] == "ai-edge-litert"
    wheels = {w["name"] for w in manifest["python_wheels"]}
    assert "ai-edge-litert" in wheels and "tflite-runtime" not in wheels, wheels
    assert "runtime ai-edge-litert (auto: tflite-runtime 2.14.0" in \
        (out / "build.log").read_text()


def _build_trixie_int8(digits: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "m.tflite"
    convert(digits, model, "int8")
    build = subprocess.run([sys.executable, "-m", "invoke", "build-image", "--target",
                            "pi4-trixie", "--model", str(model)], cwd=ROOT, text=True,
                           check=False)
    assert build.returncode == 0, "invoke build-image --target pi4-trixie failed (see above)"
    manifest = json.loads((ROOT / "out" / "pi4-trixie" / "manifest.json").read_text())
    assert manifest["model"]["runtime"]["name"] == "ai-edge-litert"
    assert manifest["model"]["card"]["task"] == "classification"
    assert manifest["model"]["verified_on_target"] is True
    assert any(p["name"] == "python3" and p["version"].startswith("3.13")
               for p in manifest["packages"]), "trixie's python3 is 3.13"


# in `invoke test --long`: its base alone is 12-16 minutes of emulated dpkg on a cold cache
@pytest.mark.image
@pytest.mark.long
def test_trixie_int8_model_built_and_verified_in_the_target(digits: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """A Keras 3 model -> int8 -> pi4-trixie image, the model verified inside its root under
    qemu-user; the boot after it is the next check. Both are in `invoke test --long`: the
    same units and code boot on the pi4 image in CI."""
    _build_trixie_int8(digits, tmp_path)


@pytest.mark.image
@pytest.mark.boot
@pytest.mark.long
def test_trixie_acceptance_int8_model_built_and_booted(digits: dict[str, Path],
                                                        tmp_path: Path) -> None:
    """Issue acceptance: a Keras 3 model -> int8 -> pi4-trixie image -> booted and checked."""
    _build_trixie_int8(digits, tmp_path)
    tested = subprocess.run([sys.executable, "-m", "invoke", "test-image", "--target",
                             "pi4-trixie", "--no-update-trials",
                             "--no-supervision-trials"], cwd=ROOT, text=True,
                            check=False)
    assert tested.returncode == 0, "invoke test-image --target pi4-trixie failed (see above)"
