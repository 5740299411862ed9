"""The bad-input corpus: every file gets one clear line naming the file and the field, through
the tool that meets it, with no traceback and no output left behind; bad frames never stop a
running service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from edgebake_runtime.service import Service
from edgebake_runtime.sources.base import CorruptFrame
from edgebake_runtime.sources.replay import decode_image
from edgebake_runtime.sources.v4l2 import yuyv_to_rgb
from helpers import INVOKE, ROOT
from runtime_helpers import RunningApp, astronaut_path, make_config, wait_for

CORPUS = ROOT / "tests" / "corpus"
EXPECT: dict[str, list[str]] = yaml.safe_load((CORPUS / "expect.yaml").read_text())
NOT_INPUTS = {"expect.yaml", "make_corpus.py", "make_sources.py", "trusted.pub"}


def corpus_files() -> list[str]:
    return sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*")
                  if p.is_file() and p.name not in NOT_INPUTS and "__pycache__" not in p.parts)


def test_the_corpus_is_complete() -> None:
    files = corpus_files()
    assert len(files) >= 30
    assert sorted(EXPECT) == files, "every corpus file needs an expectation, and only those"
    kinds = {name.split("/")[0] for name in files}
    assert kinds == {"recipes", "seeds", "configs", "models", "frames", "bundles", "sources"}


def _run(name: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    path = CORPUS / name
    kind = name.split("/")[0]
    if kind == "recipes":
        cmd = [*INVOKE, "show-recipe", "--target", "pi4", "--recipe", str(path)]
    elif kind == "seeds":
        cmd = [sys.executable, "-m", "edgebake_runtime.firstboot", "--check", str(path),
               str(tmp / "no-app.yaml")]
    elif kind in ("configs", "models"):
        if kind == "models":
            config = tmp / "app.yaml"
            config.write_text(yaml.safe_dump({"model": {"path": str(path)}}))
            path = config
        cmd = [sys.executable, "-m", "edgebake_runtime.main", "--check", "--config", str(path),
               "--overrides", str(tmp / "none.yaml")]
    elif kind == "sources":
        cmd = [*INVOKE, "convert-model", "--model", str(path), "--output",
               str(tmp / "out" / "model.tflite")]
    else:
        cmd = [*INVOKE, "verify-bundle", "--bundle", str(path), "--public-key",
               str(CORPUS / "bundles" / "trusted.pub"), "--current", "1.0"]
    return subprocess.run(cmd, cwd=ROOT if cmd[:len(INVOKE)] == INVOKE else tmp,
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize("name", [n for n in sorted(EXPECT) if not n.startswith("frames/")])
def test_a_bad_input_gets_one_clear_line(name: str, tmp_path: Path) -> None:
    before = sorted(tmp_path.rglob("*"))
    result = _run(name, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, output
    line = lines[0]
    shown = name if name.split("/")[0] != "models" else Path(name).stem
    assert Path(shown).name in line or Path(name).stem in line, line
    for word in EXPECT[name]:
        assert word in line, f"{word!r} missing from: {line}"
    written = [p for p in sorted(tmp_path.rglob("*")) if p not in before and
               p.name != "app.yaml"]
    assert written == [], f"partial output left: {written}"


@pytest.mark.parametrize("name", [n for n in sorted(EXPECT) if n.startswith("frames/")])
def test_a_bad_frame_is_a_counted_corrupt_frame(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    with pytest.raises(CorruptFrame) as caught:
        if name.endswith(".yuyv"):
            yuyv_to_rgb(data, 640, 480)
        else:
            decode_image(data, name, lambda w, h: (128, 128))
    message = str(caught.value)
    assert "\n" not in message
    if not name.endswith(".yuyv"):
        assert name in message
    for word in EXPECT[name]:
        assert word in message, f"{word!r} missing from: {message}"


def test_bad_frames_never_stop_a_running_service(default_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "replay"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(astronaut_path().read_bytes())
    pictures = [n for n in EXPECT if n.startswith("frames/") and not n.endswith(".yuyv")]
    for name in pictures:
        (folder / f"b_{Path(name).name}").write_bytes((CORPUS / name).read_bytes())
    config = make_config(tmp_path, default_model, [
        {"name": "replay", "kind": "replay", "path": str(folder), "fps": 20}])
    with RunningApp(Service(config)) as running:
        def two_rounds() -> dict[str, Any] | None:
            snap = running.health()
            source = snap["sources"]["replay"]
            return snap if source["corrupt_frames"] >= 2 * len(pictures) else None

        snap = wait_for(two_rounds, 60, "two rounds of the bad frames")
        assert snap["healthy"], snap["status"]
        assert snap["sources"]["replay"]["state"] == "up"
        assert snap["sources"]["replay"]["reconnects"] == 0
        assert snap["inference"]["results"] >= 2
