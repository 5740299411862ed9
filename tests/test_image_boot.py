"""`invoke test-image` on the real image: it boots under QEMU and its checks pass; a broken
image fails and names the check."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from helpers import INVOKE, ROOT

pytestmark = pytest.mark.boot


def junit_counts(path: Path) -> tuple[int, int]:
    root = ET.parse(path).getroot()
    suites = list(root.iter("testsuite"))
    tests = sum(int(s.get("tests", 0)) for s in suites)
    bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    return tests - bad, bad


def test_the_built_image_boots_and_passes_its_checks(built: dict[str, Any]) -> None:
    # the system update rollbacks run in test --long (bench-osupdate): CI's time budget
    result = subprocess.run([*INVOKE, "test-image", "--target", "pi4", "--no-os-rollback"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0
    test_dir = built["out"] / "test"
    passed, failed = junit_counts(test_dir / "junit.xml")
    assert failed == 0 and passed >= 15
    assert "Reached target" in (test_dir / "console.log").read_text(errors="replace")
    assert "edgebake" in (test_dir / "journal.txt").read_text(errors="replace")
    assert "boot-to-first-inference:" in result.stdout
    assert not list(built["out"].glob("edgebake-test-*")), "test-image left files behind"
    ps = subprocess.run(["pgrep", "-f", "qemu-system-aarch64"], capture_output=True, text=True,
                        check=False)
    assert ps.stdout.strip() == "", "a QEMU process was left running"


def test_a_broken_image_fails_naming_the_check(built: dict[str, Any], tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("# the service is not enabled: the unit would boot and do nothing\n"
                      "services:\n  disable: [edgebake.service]\n")
    out = tmp_path / "broken"
    build = subprocess.run([*INVOKE, "build-image", "--target", "pi4", "--recipe", str(recipe),
                            "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    image = next(out.glob("*.img"))
    result = subprocess.run([*INVOKE, "test-image", "--image", str(image), "--fail-fast"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "test_unit_enabled" in result.stdout and "edgebake.service" in result.stdout


def test_bad_image_paths_get_one_line(tmp_path: Path) -> None:
    not_image = tmp_path / "notes.img"
    not_image.write_bytes(b"hello" * 1000)
    for path, message in ((tmp_path / "missing.img", "image not found"),
                          (not_image, "not a disk image")):
        result = subprocess.run([*INVOKE, "test-image", "--image", str(path)], cwd=ROOT,
                                capture_output=True, text=True, check=False)
        assert result.returncode == 1
        assert message in result.stderr and "Traceback" not in result.stderr


def test_the_unit_survives_power_cuts_and_a_frozen_pid1(built: dict[str, Any]) -> None:
    """Three SIGKILLs of the QEMU unit (during its first boot, while running, during a model
    update), then PID 1 frozen until the hardware watchdog resets it (`invoke bench-powercut`
    runs 50)."""
    result = subprocess.run([*INVOKE, "bench-powercut", "--cycles", "3", "--seed", "7"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    print(result.stdout[-6000:], result.stderr[-3000:])
    assert result.returncode == 0
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("power cuts survived: 3/3,"), summary
    assert summary.endswith("torn lines: 0"), summary
    assert "hardware watchdog: PID 1 frozen, unit reset and back to inference in" in result.stdout
    ps = subprocess.run(["pgrep", "-f", "qemu-system-aarch64"], capture_output=True, text=True,
                        check=False)
    assert ps.stdout.strip() == "", "a QEMU process was left running"


@pytest.mark.long
def test_system_updates_install_and_every_failure_is_rolled_back(built: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    """`invoke bench-osupdate --cycles 1` after a second build (`--version` and another
    out): the second build's bundle is installed and kept; a service that never gets healthy,
    a kernel that cannot boot and a power cut during the install each leave the old system
    running and say so; a tampered bundle and another CA's are refused."""
    second = tmp_path / "v2"
    build = subprocess.run([*INVOKE, "build-image", "--target", "pi4", "--version",
                            f"{built['manifest']['system']['version']}.9", "--out",
                            str(second)], cwd=ROOT, capture_output=True, text=True,
                           check=False)
    assert build.returncode == 0, build.stdout[-3000:]
    bundle = next(second.glob("*.raucb"))
    sbom = subprocess.run([*INVOKE, "sbom-diff", "--from",
                           str(built["out"] / built["manifest"]["sbom"]["spdx"]), "--to",
                           str(second / "edgebake-pi4.spdx.json")], cwd=ROOT,
                          capture_output=True, text=True, check=False)
    assert sbom.returncode == 0 and "1 changed" in sbom.stdout, sbom.stdout  # the version
    result = subprocess.run([*INVOKE, "bench-osupdate", "--cycles", "1", "--second",
                             str(bundle)], cwd=ROOT, capture_output=True, text=True,
                            check=False)
    print(result.stdout[-8000:], result.stderr[-3000:])
    assert result.returncode == 0
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("os updates: installed 1/1, failed updates rolled back 3/3, "
                           "refused 2/2,"), line
