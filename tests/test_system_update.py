"""System updates on the host side and the unit's judgement, without booting: the OS keys,
signed RAUC bundles and what RAUC refuses, the SBOM and its diff, and the trial's verdict
read from a real /health server."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from edgebake_builder.errors import BuildError, RecipeError
from edgebake_builder.oskeys import make_os_keys
from edgebake_builder.progress import Progress
from edgebake_builder.recipe import load_recipe
from edgebake_builder.sbom import Extra, diff, make_sbom
from edgebake_builder.steps.osbundle import OsKeys, bundle_version, make_bundle
from edgebake_runtime import osupdate
from helpers import INVOKE, ROOT
from spdx_tools.spdx.model.package import PackagePurpose

needs_rauc = pytest.mark.skipif(shutil.which("rauc") is None or shutil.which("mksquashfs")
                                is None, reason="needs rauc and squashfs-tools "
                                "(bash .ci/bootstrap installs them)")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> OsKeys:
    folder = tmp_path_factory.mktemp("keys")
    ca, _, cert, key = make_os_keys(folder)
    return OsKeys(ca, key, cert)


def test_os_keys_are_made_once_and_never_overwritten(keys: OsKeys, tmp_path: Path) -> None:
    folder = keys.keyring.parent
    assert sorted(p.name for p in folder.iterdir()) == ["os-ca.crt", "os-ca.key", "os.crt",
                                                        "os.key"]
    assert (folder / "os.key").stat().st_mode & 0o777 == 0o600
    assert (folder / "os-ca.key").stat().st_mode & 0o777 == 0o600
    chain = subprocess.run(["openssl", "verify", "-CAfile", str(keys.keyring),
                            str(keys.cert)], capture_output=True, text=True, check=False)
    assert chain.returncode == 0, chain.stderr
    again = subprocess.run([*INVOKE, "make-os-key", "--out", str(folder)], cwd=ROOT,
                           capture_output=True, text=True, check=False)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert "Traceback" not in again.stderr


def small_bundle(keys: OsKeys, work: Path, version: str = "2.0") -> Path:
    root = work / "rootfs.ext4"
    tree = work / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hello").write_bytes(os.urandom(64 * 1024))  # squashfs needs > 4 KiB
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(tree), str(root), "4M"],
                   check=True)
    return make_bundle(keys, "edgebake-test", version, root, work, work / "small.raucb",
                       Progress(1)) or Path()


@needs_rauc
def test_a_bundle_is_signed_and_checked_against_the_keyring(keys: OsKeys,
                                                            tmp_path: Path) -> None:
    bundle = small_bundle(keys, tmp_path)
    assert bundle_version(bundle) == "2.0"
    ok = subprocess.run(["rauc", "info", f"--keyring={keys.keyring}", "--output-format=json",
                         str(bundle)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["compatible"] == "edgebake-test"
    # a bundle whose signed part (manifest, verity root hash) changed after signing, and
    # one checked against another CA: refused (a changed payload block fails dm-verity's
    # check as the unit reads it: bench-osupdate's tampered bundle)
    tampered = tmp_path / "tampered.raucb"
    data = bytearray(bundle.read_bytes())
    data[-300:-284] = bytes(b ^ 0xFF for b in data[-300:-284])
    tampered.write_bytes(bytes(data))
    other = make_os_keys(tmp_path / "other")
    for path, keyring in ((tampered, keys.keyring), (bundle, other[0])):
        refused = subprocess.run(["rauc", "info", f"--keyring={keyring}", str(path)],
                                 capture_output=True, text=True, check=False)
        assert refused.returncode != 0, path


@needs_rauc
def test_no_signing_key_means_no_bundle(keys: OsKeys, tmp_path: Path) -> None:
    made = small_bundle(OsKeys(keys.keyring, None, None), tmp_path)
    assert made == Path()
    assert not list(tmp_path.glob("*.raucb"))


def test_a_bad_version_gets_one_line() -> None:
    with pytest.raises(RecipeError, match=r"--version.*version"):
        load_recipe("pi4").with_setting("version", "1.0 beta!", "--version")
    assert load_recipe("pi4").with_setting("version", "2026.12.1", "--version")["version"] \
        == "2026.12.1"


def fake_root(folder: Path, packages: dict[str, str]) -> Path:
    """A tree with a dpkg database listing `packages` (name -> version)."""
    status = folder / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True)
    status.write_text("".join(
        f"Package: {name}\nStatus: install ok installed\nPriority: optional\n"
        f"Architecture: arm64\nSource: {name}-src\nVersion: {version}\n"
        f"Maintainer: Someone <someone@example.org>\nDescription: {name}\n\n"
        for name, version in packages.items()))
    return folder


def test_sbom_lists_debian_sources_wheels_model_and_diff_says_what_changed(
        tmp_path: Path) -> None:
    wheel = Extra("av", "17.1.0", "ab" * 32, "pkg:pypi/av@17.1.0", PackagePurpose.LIBRARY)
    sboms = []
    for name, packages in (("old", {"openssl": "3.0.1-1", "zlib1g": "1.2.13-1"}),
                           ("new", {"openssl": "3.0.2-1", "libfoo": "1.0-1"})):
        spdx, cdx = make_sbom(fake_root(tmp_path / name, packages), "edgebake-test", name,
                              [wheel], tmp_path / f"out-{name}", 1700000000, Progress(1))
        document = json.loads(spdx.read_text())
        names = {p["name"] for p in document["packages"]}
        assert {"openssl", "openssl-src", "av", *packages} <= names, names
        assert document["spdxVersion"] == "SPDX-2.3" and cdx.is_file()
        sboms.append(spdx)
    lines, summary = diff(sboms[0], sboms[1])
    assert "~ deb/debian/openssl?arch=arm64 3.0.1-1 -> 3.0.2-1" in lines, lines
    assert "~ deb/debian/openssl-src?arch=source 3.0.1-1 -> 3.0.2-1" in lines, lines
    assert "+ deb/debian/libfoo?arch=arm64 1.0-1" in lines, lines
    assert "- deb/debian/zlib1g?arch=arm64 1.2.13-1" in lines, lines
    assert not any("pypi/av" in x for x in lines)  # the same wheel in both
    # openssl, its source and the system itself changed; the wheel did not
    assert summary == "sbom-diff: 3 changed, 2 added, 2 removed, 1 unchanged", summary
    with pytest.raises(BuildError, match="not an SPDX JSON document"):
        diff(tmp_path / "missing.spdx.json", sboms[1])


class Health(http.server.BaseHTTPRequestHandler):
    answer: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        body = json.dumps(Health.answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()


def test_the_trial_keeps_a_healthy_system_and_rejects_a_stuck_or_silent_one(
        health_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(osupdate, "POLL_SEC", 0.05)
    Health.answer = {"ready": True, "healthy": True, "status": "running: 1 source(s)"}
    assert osupdate.judge_window(0.3, health_url, osupdate.time.monotonic()) == \
        (True, "running: 1 source(s)")
    Health.answer = {"ready": True, "healthy": False, "status": "stuck: camera cam0 hung"}
    good, why = osupdate.judge_window(30, health_url, osupdate.time.monotonic())
    assert not good and "stuck on trial" in why  # decided at once, not at the window's end
    Health.answer = {"ready": False, "healthy": False, "status": "starting: loading"}
    good, why = osupdate.judge_window(0.3, health_url, osupdate.time.monotonic())
    assert not good and "not healthy at the end" in why and "starting" in why
    good, why = osupdate.judge_window(0.3, "http://127.0.0.1:9/health",
                                      osupdate.time.monotonic())
    assert not good and "never answered" in why


def test_a_bundle_for_another_unit_or_too_big_for_the_slot_is_refused_first(
        tmp_path: Path) -> None:
    slot = tmp_path / "slot-b"
    slot.write_bytes(b"\0" * 4096)
    conf = tmp_path / "system.conf"
    conf.write_text("[system]\ncompatible=edgebake-pi4\nbootloader=uboot\n\n"
                    f"[slot.rootfs.1]\ndevice={slot}\ntype=ext4\nbootname=B\n")
    fits = {"compatible": "edgebake-pi4", "images": [{"rootfs": {"size": 4096}}]}
    assert osupdate.unfit(fits, "B", conf) == ""
    other = {**fits, "compatible": "edgebake-pi4-trixie"}
    assert "is for 'edgebake-pi4-trixie', this unit is 'edgebake-pi4'" in \
        osupdate.unfit(other, "B", conf)
    big = {**fits, "images": [{"rootfs": {"size": 8192}}]}
    assert "slot B holds 0 MiB" in osupdate.unfit(big, "B", conf)
