"""`--target jetson-orin-nano`: a rootfs overlay with cp310 wheels, applied offline to an
L4T-shaped rootfs (our Debian base with L4T's markers: JetPack itself cannot be downloaded
here), applied twice with the same result, and removed again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from edgebake_builder.errors import BuildError
from edgebake_builder.units import check_units
from helpers import invoke

pytestmark = pytest.mark.image


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("jetson")
    result = invoke("build-image", "--target", "jetson-orin-nano", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    return {"path": out / manifest["overlay"], "manifest": manifest}


def l4t_rootfs(parent: Path) -> Path:
    """Linux_for_Tegra/rootfs as NVIDIA lays it out, from the pi4 Debian base."""
    from edgebake_builder.recipe import load_recipe
    from edgebake_builder.steps.bootstrap import base_tarball

    tegra = parent / "Linux_for_Tegra"
    rootfs = tegra / "rootfs"
    rootfs.mkdir(parents=True)
    with tarfile.open(base_tarball(load_recipe("pi4"))) as tar:
        tar.extractall(rootfs, numeric_owner=True, filter="fully_trusted")
    (rootfs / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0\n")
    for tool in ("flash.sh", "apply_binaries.sh"):
        (tegra / tool).write_text("#!/bin/sh\n")
    return rootfs


def snapshot(rootfs: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    found: dict[str, tuple[int, int, int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(rootfs):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                body: bytes | str = os.readlink(path)
            elif path.is_file():
                body = path.read_bytes()
            else:
                body = b""
            found[str(path.relative_to(rootfs))] = (st.st_mode, st.st_uid, st.st_gid, body)
    return found


def test_overlay_holds_cp310_wheels_units_and_data(overlay: dict[str, Any]) -> None:
    manifest = overlay["manifest"]
    assert manifest["systemd_version"] == 249
    wheels = {w["name"]: w["version"] for w in manifest["python_wheels"]}
    assert wheels["numpy"].startswith("1.") and "pillow" in wheels and "pyyaml" in wheels
    assert manifest["model"]["runtime"]["name"] in wheels
    names = subprocess.run(["tar", "--zstd", "-tf", str(overlay["path"])], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert any(n.endswith(".cpython-310-aarch64-linux-gnu.so") for n in names)
    assert not any("cpython-311" in n or "cpython-313" in n for n in names)
    for needed in ("./usr/lib/systemd/system/edgebake.service",
                   "./usr/lib/sysusers.d/edgebake.conf",
                   "./etc/systemd/journald.conf.d/edgebake.conf",
                   "./etc/systemd/system.conf.d/edgebake-watchdog.conf",
                   "./data/results/", "./etc/edgebake/app.yaml"):
        assert needed in names, needed
    # our own base's pieces never reach NVIDIA's rootfs
    assert "./etc/fstab" not in names and "./etc/hostname" not in names
    sums = (overlay["path"].parent / "SHA256SUMS").read_text()
    assert manifest["overlay_sha256"] in sums


def test_apply_twice_then_remove_restores_the_rootfs(overlay: dict[str, Any],
                                                     tmp_path: Path) -> None:
    rootfs = l4t_rootfs(tmp_path)
    theirs = rootfs / "etc" / "systemd" / "journald.conf.d" / "edgebake.conf"
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_text("[Journal]\n# the rootfs's own file of that name\n")
    before = snapshot(rootfs)
    first = invoke("apply-overlay", "--rootfs", str(rootfs), "--overlay", str(overlay["path"]),
                   "--check")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert re.search(r"1[0-9] passed", first.stdout), first.stdout[-2000:]
    assert "l4t_initrd_flash.sh" in first.stdout and "kept aside" in first.stdout
    applied = snapshot(rootfs)
    second = invoke("apply-overlay", "--rootfs", str(rootfs), "--overlay", str(overlay["path"]))
    assert second.returncode == 0, second.stderr[-2000:]
    assert snapshot(rootfs) == applied, "applying twice changed the rootfs"
    passwd = (rootfs / "etc" / "passwd").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("edgebake:"))
    results = (rootfs / "data" / "results").stat()
    assert (results.st_uid, results.st_gid) == (int(user[2]), int(user[3]))
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/edgebake.service").is_symlink()
    assert "Storage=persistent" in theirs.read_text()
    assert (rootfs / "etc").stat().st_mode == before["etc"][0]
    removed = invoke("apply-overlay", "--rootfs", str(rootfs), "--remove")
    assert removed.returncode == 0, removed.stderr[-2000:]
    after = snapshot(rootfs)
    accounts = {"etc/passwd", "etc/group", "etc/shadow", "etc/gshadow", "etc/passwd-",
                "etc/group-", "etc/shadow-", "etc/gshadow-"}
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed <= accounts, sorted(changed - accounts)[:10]
    assert theirs.read_text().endswith("the rootfs's own file of that name\n")


def test_bad_apply_arguments_fail_with_one_line(overlay: dict[str, Any],
                                                tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "os-release").write_text("ID=debian\n")
    cases = [(["--rootfs", str(empty), "--overlay", str(overlay["path"])],
              "not a root filesystem"),
             (["--rootfs", str(rootfs), "--overlay", str(tmp_path / "none.tar.zst")],
              "file not found")]
    for args, expected in cases:
        result = invoke("apply-overlay", *args)
        assert result.returncode != 0 and expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_units_newer_than_the_target_systemd_are_refused(tmp_path: Path) -> None:
    units = tmp_path / "usr" / "lib" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / "edgebake.service").write_text("[Service]\nProtectProc=invisible\n"
                                            "RestrictFileSystems=ext4\n")
    check_units(tmp_path, ["edgebake"], 252)
    with pytest.raises(BuildError, match=r"RestrictFileSystems= needs systemd 250; the target "
                                         r"has 249"):
        check_units(tmp_path, ["edgebake"], 249)
