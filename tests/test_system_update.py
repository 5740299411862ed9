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


def test_a_handed_over_bundle_carries_a_note_root_trusts_only_field_by_field(
        tmp_path: Path) -> None:
    from edgebake_runtime.osinbox import hand_over, read_note, waiting

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    bundle = tmp_path / "fetched.raucb.tmp"
    bundle.write_bytes(b"x" * 1000)
    line = hand_over(bundle, "mqtt", 45.0, 7, inbox=inbox, name="system-2.0.raucb")
    assert "handed to the system updater" in line and not bundle.exists()
    [waiting_bundle] = waiting(inbox)
    assert read_note(waiting_bundle) == {"via": "mqtt", "seq": 7, "window_sec": 45,
                                         "name": "system-2.0.raucb"}
    # a note the service could have written to mislead root: every field falls back
    waiting_bundle.with_suffix(".json").write_text(json.dumps(
        {"via": "ssh; rm -rf /", "seq": -1, "window_sec": 10**9, "name": "../../etc/passwd"}))
    assert read_note(waiting_bundle) == {"via": "inbox", "seq": 0, "window_sec": None,
                                         "name": waiting_bundle.name}
    waiting_bundle.with_suffix(".json").write_bytes(b"\xff" * 10000)
    assert read_note(waiting_bundle)["via"] == "inbox"
    # a link (to a root-only file) or a FIFO (to hang root) is never read
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"via": "usb"}))
    waiting_bundle.with_suffix(".json").unlink()
    waiting_bundle.with_suffix(".json").symlink_to(secret)
    assert read_note(waiting_bundle)["via"] == "inbox"
    waiting_bundle.with_suffix(".json").unlink()
    os.mkfifo(waiting_bundle.with_suffix(".json"))
    assert read_note(waiting_bundle)["via"] == "inbox"
    # a dangling link named like a bundle does not stop the others being seen
    (inbox / "gone.raucb").symlink_to(tmp_path / "nowhere")
    assert waiting_bundle in waiting(inbox)


def test_the_os_pull_hands_a_new_bundle_over_once_and_never_fills_data(
        tmp_path: Path) -> None:
    """`update.os_pull_url`: a real HTTP server; the bundle goes whole into the inbox, the
    next poll costs a 304; a download that would eat into the journal's free space is
    refused in one line and leaves nothing behind."""
    from edgebake_runtime.osinbox import hand_over, read_note, waiting
    from edgebake_runtime.pull import BundlePuller, room_left
    from helpers import BundleServer

    fetch, inbox = tmp_path / "fetch", tmp_path / "inbox"
    fetch.mkdir()
    inbox.mkdir()
    served = tmp_path / "served.raucb"
    served.write_bytes(os.urandom(3 * 2**20))
    with BundleServer(served, etag='"os-2.0"') as server:
        puller = BundlePuller(server.url("edgebake-pi4.raucb"), 60.0, fetch,
                              lambda b: hand_over(b, "pull", inbox=inbox), "edgebake/test",
                              name="pulled.raucb", max_bytes=2**30, keep_free_percent=1.0)
        assert puller.poll_once() == "applied", puller.stats()
        assert puller.poll_once() == "not-modified"
        [bundle] = waiting(inbox)
        assert bundle.read_bytes() == served.read_bytes()
        assert read_note(bundle)["via"] == "pull"
        # a disk that cannot hold it beside the reserve
        statvfs = os.statvfs(fetch)
        free_percent = 100.0 * statvfs.f_bavail / statvfs.f_blocks
        full = BundlePuller(server.url("edgebake-pi4.raucb"), 60.0, tmp_path / "full",
                            lambda b: hand_over(b, "pull", inbox=inbox), "edgebake/test",
                            name="pulled.raucb", max_bytes=2**30,
                            keep_free_percent=free_percent)
        with pytest.raises(ValueError, match="no room for 3 MiB") as caught:
            full.poll_once()
        assert "\n" not in str(caught.value)
        assert room_left(fetch, free_percent) < served.stat().st_size
        too_big = BundlePuller(server.url("edgebake-pi4.raucb"), 60.0, tmp_path / "big",
                               lambda b: hand_over(b, "pull", inbox=inbox), "edgebake/test",
                               name="pulled.raucb", max_bytes=2**20)
        with pytest.raises(ValueError, match="takes at most"):
            too_big.poll_once()
    assert len(waiting(inbox)) == 1
    assert not [p for p in tmp_path.rglob("*.part")]


def test_a_system_order_goes_only_over_its_own_topic_and_hands_the_bundle_over(
        tmp_path: Path) -> None:
    """`edgebake/<device>/os-update`: a signed order with `system: true` and a URL; a model
    order there, or a system order on the model topic, is refused; a unit that is not A/B
    says it takes no system updates."""
    from edgebake_builder.signing import sign_order
    from edgebake_runtime import commands
    from edgebake_runtime.osinbox import hand_over, read_note, waiting
    from helpers import BundleServer

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    served = tmp_path / "served.raucb"
    served.write_bytes(os.urandom(2**20))
    with BundleServer(served, etag='"os"') as server:
        url = server.url("system.raucb")
        origin = url.split("/fleet/")[0]
        orders = commands.UpdateCommands(
            tmp_path / "models", lambda to, payload: json.loads(payload.partition(b"\n")[2]),
            lambda p, seq, window: "model applied", "test", (origin,))
        reports: list[tuple[str, str, int]] = []
        orders.publish = lambda step, detail, seq, version: reports.append((step, detail, seq))
        key = b"\x01" * 32
        system_order = sign_order(key, "unit1", url=url, system=True, seq=41, window_sec=90)
        model_order = sign_order(key, "unit1", url=url, seq=42)
        assert orders.handle("edgebake/unit1/os-update", system_order) == "refused"
        assert "takes no system updates" in reports[-1][1]
        orders.hand_over_os = lambda b, seq, window: hand_over(b, "mqtt", window, seq,
                                                               inbox=inbox)
        orders.os_folder = tmp_path / "fetch"
        assert orders.handle("edgebake/unit1/os-update", model_order) == "refused"
        assert "a model order on the system update topic" in reports[-1][1]
        assert orders.handle("edgebake/unit1/update", system_order) == "refused"
        assert "a system order on the model update topic" in reports[-1][1]
        assert orders.handle("edgebake/unit1/os-update", system_order) == "handed-over", \
            reports
    [bundle] = waiting(inbox)
    assert bundle.read_bytes() == served.read_bytes()
    assert read_note(bundle) == {"via": "mqtt", "seq": 41, "window_sec": 90,
                                 "name": bundle.name}
    assert reports[-1][0] == "handed-over" and reports[-1][2] == 41
    assert not list((tmp_path / "fetch").rglob("*.raucb*"))


def test_a_sticks_newest_system_bundle_goes_to_the_inbox_and_a_link_never(
        tmp_path: Path) -> None:
    from edgebake_runtime.osinbox import read_note, waiting
    from edgebake_runtime.osstate import REFUSALS_KEPT, OsState
    from edgebake_runtime.usbupdate import system_from

    stick, inbox = tmp_path / "stick", tmp_path / "inbox"
    (stick / "edgebake").mkdir(parents=True)
    inbox.mkdir()
    for version in ("1.9", "1.10"):
        (stick / "edgebake" / f"system-{version}.raucb").write_bytes(version.encode() * 5000)
    state = OsState(tmp_path / "os")
    [line] = system_from(stick, inbox, 1.0, state)
    assert line.startswith("system-1.10.raucb: system bundle handed"), line
    [bundle] = waiting(inbox)
    assert bundle.read_bytes().startswith(b"1.10") and read_note(bundle)["via"] == "usb"
    assert read_note(bundle)["name"] == "system-1.10.raucb"
    bundle.unlink()
    # a link on the stick (to the unit's own files, say) is refused, never followed
    (stick / "edgebake" / "system-9.0.raucb").symlink_to("/etc/hostname")
    [line] = system_from(stick, inbox, 1.0, state)
    assert "refused" in line and not waiting(inbox), line
    assert state.refusals()[-1]["via"] == "usb"
    # /health keeps the last few refusals, newest last, and never more
    for attempt in range(REFUSALS_KEPT + 2):
        state.refuse(f"attempt {attempt}", via="ssh")
    kept = state.refusals()
    assert [x["reason"] for x in kept] == [f"attempt {n}" for n in range(2, REFUSALS_KEPT + 2)]
    assert system_from(stick, tmp_path / "no-inbox", 1.0, state)[0].endswith(
        "takes no system updates (not an A/B system)")


def test_a_system_installs_only_when_newer_except_over_ssh() -> None:
    """A stick left in must not install the same system at every boot; a downgrade is a
    person's choice, so only SSH may make it."""
    from edgebake_runtime.osupdate import same_or_older

    assert "already runs" in same_or_older("1.1", "1.1", "usb")
    assert "already runs" in same_or_older("1.1", "1.1", "ssh")
    assert "older than the running 1.10" in same_or_older("1.9", "1.10", "usb")
    assert "older" in same_or_older("1.0", "1.1", "mqtt")
    assert same_or_older("1.0", "1.1", "ssh") == ""
    assert same_or_older("1.10", "1.9", "pull") == ""
    assert same_or_older("1.0.1-test", "1.0", "mqtt") == ""  # no order to judge


def test_a_rollback_is_the_verdict_only_once_the_unit_is_back_on_its_old_slot() -> None:
    """The failed system writes its verdict a moment before it reboots out: a laptop that
    read it then would report the rolled-back system as the one running."""
    from edgebake_builder.flashing.pushos import settled

    update = {"version": "2", "from_slot": "B", "to_slot": "A", "state": "rolled-back"}
    assert not settled({"booted": "A", "update": update}, "2")
    assert settled({"booted": "B", "update": update}, "2")
    assert not settled({"booted": "B", "update": update}, "3")
    kept = {**update, "state": "confirmed"}
    assert settled({"booted": "A", "update": kept}, "2")
    assert not settled({"booted": "A", "update": {**update, "state": "trial"}}, "2")
