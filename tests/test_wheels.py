"""The pinned-wheel requirements: one file per wheel set, so builds at once never mix sets."""

from __future__ import annotations

from pathlib import Path

from edgebake_builder.steps.wheels import Target, read_wheels_lock, requirements_file, select_wheels


def test_each_wheel_set_gets_its_own_requirements_file(tmp_path: Path) -> None:
    lock = read_wheels_lock()
    target = Target("3.11", "2.36")
    lite = select_wheels(["tflite-runtime", "paho-mqtt"], lock, target)
    litert = select_wheels(["ai-edge-litert", "paho-mqtt"], lock, target)
    first, second = requirements_file(lite, tmp_path), requirements_file(litert, tmp_path)
    assert first != second
    assert "tflite-runtime==" in first.read_text()
    assert "tflite-runtime" not in second.read_text() and "ai-edge-litert==" in second.read_text()
    assert requirements_file(list(reversed(lite)), tmp_path) == first  # same set, same file
