"""`invoke test-image`: static testinfra checks on the rootfs, then boot in QEMU and check the
running unit over SSH. Writes junit.xml, console.log and journal.txt."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..progress import Progress
from . import diskimage
from .broker import LocalBroker
from .fileserver import FileServer
from .osbundles import foreign_bundle
from .qemu import QemuMachine, console_tail
from .rtsp import RtspServer, make_h264
from .seed import render_seed, seed_overlay
from .trialbundles import make_trial_bundles
from .unitjournal import boot_figures, data_is_mounted, save_journal

CHECKS_DIR = Path(__file__).resolve().parents[3] / "tests" / "image_checks"
SSH_TIMEOUT_SEC = 420.0
TEST_HOSTNAME = "edgebake-qemu-test"
CARD_EXTRA_BYTES = 512 * 2**20


@dataclass
class ImageTestResult:
    passed: int
    failed: int
    junit: Path
    figures: dict[str, float]


def run_checks(phase: str, junit: Path, hosts: str, env: dict[str, str], progress: Progress,
            extra: list[str]) -> int:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE",
           "--durations=30",
           f"--rootdir={CHECKS_DIR}", "-c", str(CHECKS_DIR / "pytest.ini"),
           f"--junitxml={junit}", f"--hosts={hosts}", *extra, str(CHECKS_DIR / phase)]
    progress.log("$ " + " ".join(cmd))
    result = subprocess.run(cmd, env={**os.environ, **env}, text=True, capture_output=True,
                            check=False)
    progress.log(result.stdout + result.stderr)
    for line in result.stdout.splitlines():
        if line.startswith(("FAILED", "ERROR")) or re.search(r"\d+ (passed|failed)", line):
            progress.say(f"      {line}")
    return result.returncode


def merge_junit(parts: list[Path], dest: Path) -> tuple[int, int]:
    suites = ET.Element("testsuites")
    passed = failed = 0
    for part in parts:
        if not part.exists():
            continue
        root = ET.parse(part).getroot()
        for suite in (root.iter("testsuite")):
            suites.append(suite)
            total = int(suite.get("tests", 0))
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            failed += bad
            passed += total - bad - skipped
    suites.set("tests", str(passed + failed))
    suites.set("failures", str(failed))
    dest.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suites).write(dest, encoding="utf-8", xml_declaration=True)
    return passed, failed


def unpack_rootfs(image: Path, dest: Path, progress: Progress) -> Path:
    """debugfs rdump: the root filesystem as a folder, read in place (no mount, no loop)."""
    part = diskimage.root_partition(image)
    fs = diskimage.extract(image, part, dest.parent / "root.ext4")
    dest.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(fs)], capture_output=True,
                            text=True, check=False)
    fs.unlink()
    if result.returncode != 0:
        raise BuildError(f"{image}: cannot read the root filesystem: {result.stderr[-300:]}")
    progress.log(result.stderr)
    return dest


def find_image(default_out: Path, target: str, image: Path | None
               ) -> tuple[Path, Path, dict[str, Any]]:
    """The image to test, the folder for its results, and its manifest (if it has one)."""
    if image is None:
        manifest_file = default_out / "manifest.json"
        if not manifest_file.is_file():
            raise BuildError(f"{manifest_file}: no build found; run "
                             f"`invoke build-image --target {target}` or pass --image")
        manifest = json.loads(manifest_file.read_text())
        image, out_dir = default_out / manifest["image"], default_out
    else:
        candidate = image.parent / "manifest.json"
        manifest = json.loads(candidate.read_text()) if candidate.is_file() else {}
        out_dir = image.parent
    if not image.is_file():
        raise BuildError(f"{image}: image not found")
    return image.resolve(), out_dir, manifest


def test_image(image: Path, out_dir: Path, manifest: dict[str, Any],
               progress: Progress, fail_fast: bool = False, update_trials: bool = True,
               supervision_trials: bool = True, os_rollback: bool = True,
               runtime_checks: bool = True) -> ImageTestResult:
    """Static checks on the image's rootfs, then the image booted in QEMU and checked over
    SSH; the checks' JUnit reports merged into test/junit.xml."""
    started = time.monotonic()
    test_dir = out_dir / "test"
    shutil.rmtree(test_dir, ignore_errors=True)
    test_dir.mkdir(parents=True)
    junit_parts = [test_dir / "junit-static.xml", test_dir / "junit-running.xml"]
    figures: dict[str, float] = {}
    codes = {"static": 1, "running": 1}
    with tempfile.TemporaryDirectory(prefix="edgebake-test-", dir=out_dir) as tmp_name:
        tmp = Path(tmp_name)
        manifest_path = tmp / "manifest.json"
        manifest_path.write_text(json.dumps(manifest))
        env = {"EDGEBAKE_MANIFEST": str(manifest_path), "EDGEBAKE_TEST_DIR": str(test_dir),
               # an A/B image: a system that never gets healthy is rolled back (~5 min)
               "EDGEBAKE_OS_ROLLBACK": "1" if os_rollback and update_trials else "",
               # the runtime's own logic over SSH (model update, rollout, samples, the page)
               "EDGEBAKE_RUNTIME_CHECKS": "1" if runtime_checks else "",
               "EDGEBAKE_IMAGE": str(image.resolve())}
        with progress.step("static checks on the image's rootfs (testinfra, chroot)"):
            codes["static"] = _static_checks(image, tmp, junit_parts[0], env, progress)
        if codes["static"] != 0 and fail_fast:
            progress.say("      static checks failed; not booting (--fail-fast)")
            codes["running"] = 0  # not run: the static failures say why
        else:
            codes["running"], figures = _boot_and_check(image, tmp, test_dir, manifest, env,
                                                        junit_parts[1], progress,
                                                        update_trials, supervision_trials)
    return _result(junit_parts, codes, test_dir, figures, started, progress)


def _static_checks(image: Path, tmp: Path, junit: Path, env: dict[str, str],
                   progress: Progress) -> int:
    rootfs = unpack_rootfs(image, tmp / "rootfs", progress)
    env["EDGEBAKE_ROOTFS"] = str(rootfs)
    code = run_checks("static", junit, str(rootfs), env, progress, ["--connection=chroot"])
    shutil.rmtree(rootfs, ignore_errors=True)
    return code


def _boot_and_check(image: Path, tmp: Path, test_dir: Path, manifest: dict[str, Any],
                    env: dict[str, str], junit: Path, progress: Progress, update_trials: bool,
                    supervision_trials: bool) -> tuple[int, dict[str, float]]:
    """The unit's world (a test key, update bundles, a broker, an RTSP camera, a USB stick,
    a seed), the image booted in it, and the checks run over SSH."""
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgebake-test",
                    "-f", str(key)], check=True)
    trials = make_trial_bundles(tmp / "bundles", str(manifest.get("target", "pi4")), progress)
    env["EDGEBAKE_BUNDLE"] = str(trials.paths["good"])
    # system updates (A/B images): test bundles are signed with the build's own OS key
    keyring = Path(str((manifest.get("recipe") or {}).get("update", {}).get("os_keyring", "")))
    env["EDGEBAKE_OS_KEYS"] = str(keyring.resolve().parent)
    if update_trials:  # the bundles a unit must refuse or take back by itself
        env["EDGEBAKE_UPDATE_TRIALS"] = "1"
        env["EDGEBAKE_TRIAL_BUNDLES"] = json.dumps({name: str(path) for name, path in
                                                    trials.paths.items()})
    if supervision_trials:  # kill -9, SIGSTOP and a camera unplug on the running unit
        env["EDGEBAKE_SUPERVISION_TRIALS"] = "1"
    env["EDGEBAKE_ORDER_KEY"] = str(trials.private_key)
    # the fleet's broker: TLS with a login (the unit takes orders only so), its CA in the seed
    broker = LocalBroker.start_tls(addresses=("127.0.0.1", QEMU_HOST_ADDRESS)) \
        if shutil.which("mosquitto") else None
    # an RTSP camera on the host, seen by the guest through QEMU's user network
    # (small and slow: QEMU emulates the unit's CPU, and H.264 is decoded in full)
    stream = make_h264(tmp / "stream.h264", fps=2, width=320, height=320,
                       picture=stream_picture())
    rtsp = RtspServer(stream, fps=2).start()
    env["EDGEBAKE_RTSP_SOURCE"] = "rtsp"
    # the fleet's update server: what MQTT orders point to
    served = FileServer(tmp / "served").start()
    env["EDGEBAKE_SERVED_DIR"] = str(served.folder)
    env["EDGEBAKE_SERVED_URL"] = served.origin(QEMU_HOST_ADDRESS)
    seed = _test_seed(tmp, key, rtsp.url(QEMU_HOST_ADDRESS), broker, trials.public_key, env)
    # a "card" larger than the image: the data partition must grow into it at first boot
    disk_bytes = image.stat().st_size + CARD_EXTRA_BYTES
    env["EDGEBAKE_DISK_BYTES"] = str(disk_bytes)
    machine = QemuMachine(image=image, workdir=tmp / "vm", console=test_dir / "console.log",
                          extra_cmdline=["modules-load=vivid"], disk_bytes=disk_bytes,
                          usb_sticks=_usb_sticks(tmp, manifest, env))
    try:
        with progress.step("boot the image in QEMU (qcow2 overlay + test seed)"):
            _boot(machine, image, manifest, seed, key, progress)
        if not data_is_mounted(machine, key, test_dir, progress):
            return 1, {}
        with progress.step("runtime checks over SSH (testinfra)"):
            return _running_checks(machine, key, tmp, test_dir, env, junit, progress)
    finally:
        machine.stop()
        rtsp.stop()
        served.stop()
        if broker is not None:
            broker.stop()


def _usb_sticks(tmp: Path, manifest: dict[str, Any], env: dict[str, str]) -> list[Path]:
    """A technician's stick with bundles this unit must refuse, and one that claims to be
    the unit's root, which must never be mounted as it."""
    on_stick = {"model-9.9.ebundle": USB_BUNDLE}  # signed by another key
    system = manifest.get("system") or {}
    if system.get("layout") == "ab" and system.get("compatible") and shutil.which("rauc"):
        # a system bundle signed under a stranger's CA: root's updater must refuse it
        on_stick[USB_OS_BUNDLE] = foreign_bundle(tmp / USB_OS_BUNDLE, system["compatible"],
                                                 "99.0")
        env["EDGEBAKE_USB_OS_BUNDLE"] = USB_OS_BUNDLE
    env["EDGEBAKE_USB_BUNDLE"] = "model-9.9.ebundle"
    return [usb_stick(tmp / "stick.img", on_stick),
            hostile_root_stick(tmp / "hostile-root.img", tmp / "hostile-tree")]


def _test_seed(tmp: Path, key: Path, rtsp_url: str, broker: LocalBroker | None,
               update_key: str, env: dict[str, str]) -> bytes:
    """The test unit's seed, saved as UTF-16 with a byte-order mark, as Windows editors do."""
    app: dict[str, Any] = {"sources": [
        # vivid (loaded from the kernel command line) must be found by itself. Low rates:
        # QEMU emulates the unit's CPU, and the checks' own commands (an update's golden
        # test, SSH) must not queue behind the inference the checks only need to see going.
        {"name": "cameras", "kind": "v4l2-auto", "fps": 2, "width": 320, "height": 240,
         "max_age_sec": 10},
        {"name": "rtsp", "kind": "rtsp", "url": rtsp_url, "fps": 1, "max_age_sec": 20}],
        # QEMU emulates the CPU: a generous latency budget; a window past the reboot check;
        # a trial judged on 5 inferences (a new model's may take a second each on a busy host)
        "update": {"max_latency_ms": 20000, "window_sec": 3600, "min_trial_inferences": 5},
        # field samples: a periodic frame of each camera, for collect-samples to fetch
        "samples": {"enabled": True, "every_sec": 10, "max_files": 200}}
    mqtt_ca = ""
    if broker is not None and broker.tls is not None:
        # QEMU's user network shows the host's loopback to the guest as 10.0.2.2
        app["mqtt"] = {"enabled": True, "host": QEMU_HOST_ADDRESS, "port": broker.port,
                       "username": broker.tls.username, "password": broker.tls.password,
                       "tls": {"enabled": True}}
        app["update"].update({"mqtt_commands": True, "mqtt_group": "qemu",
                              "allowed_origins": [env["EDGEBAKE_SERVED_URL"]]})
        mqtt_ca = broker.tls.ca_file.read_text()
        env.update({"EDGEBAKE_MQTT_PORT": str(broker.port),
                    "EDGEBAKE_MQTT_CA": str(broker.tls.ca_file),
                    "EDGEBAKE_MQTT_USER": broker.tls.username,
                    "EDGEBAKE_MQTT_PASSWORD": broker.tls.password})
    return render_seed(TEST_HOSTNAME, [key.with_suffix(".pub").read_text().strip()],
                       app=app, device_id="qemu-test-unit", update_keys=[update_key],
                       mqtt_ca=mqtt_ca).encode("utf-16")


def _boot(machine: QemuMachine, image: Path, manifest: dict[str, Any], seed: bytes, key: Path,
          progress: Progress) -> None:
    machine.prepare()
    if machine.uboot:
        progress.say("      firmware: U-Boot (qemu_arm64) runs the image's boot.scr, which "
                     "boots slot A's own kernel, as a Pi's U-Boot does after its firmware")
    else:
        kernel, _ = diskimage.kernel_and_initrd_names(image, machine.boot)
        origin = "the image's own kernel"
        if manifest.get("base_image"):
            origin += (" (QEMU's virt machine cannot run a Raspberry Pi kernel: this works "
                       "when the base carries a generic arm64 kernel, as the look-alike does "
                       "with Debian's)")
        progress.say(f"      kernel: {kernel} from the boot partition, {origin}")
    dropped = machine.imager_one_shot_args()
    if dropped:
        progress.say("      left out of QEMU's kernel command line (Imager's first-boot run, "
                     "which needs the Pi firmware to re-read cmdline.txt after it): "
                     f"{' '.join(dropped)}")
    written = seed_overlay(image, machine.overlay, machine.boot, seed, machine.boot_files)
    progress.say(f"      seed written into the overlay ({written} bytes changed)")
    machine.start()
    waited = machine.wait_for_ssh(key, SSH_TIMEOUT_SEC)
    progress.say(f"      SSH up after {waited:.0f}s")


def _running_checks(machine: QemuMachine, key: Path, tmp: Path, test_dir: Path,
                    env: dict[str, str], junit: Path, progress: Progress
                    ) -> tuple[int, dict[str, float]]:
    env.update({"EDGEBAKE_SSH_KEY": str(key), "EDGEBAKE_SSH_PORT": str(machine.ssh_port),
                "EDGEBAKE_HTTP_PORT": str(machine.http_port),
                "EDGEBAKE_HOSTNAME": TEST_HOSTNAME, "EDGEBAKE_CONSOLE": str(machine.console)})
    hosts = f"ssh://root@127.0.0.1:{machine.ssh_port}"
    # a short folder for the shared connection's socket (a socket path has ~100 bytes)
    with tempfile.TemporaryDirectory(prefix="edgebake-ssh-") as sockets:
        config = _ssh_config(tmp, Path(sockets))
        env["EDGEBAKE_SSH_CONFIG"] = str(config)
        code = run_checks("running", junit, hosts, env, progress,
                          ["--ssh-identity-file", str(key), "--ssh-config", str(config)])
        subprocess.run(["ssh", "-F", str(config), "-p", str(machine.ssh_port), "-O", "exit",
                        "root@127.0.0.1"], capture_output=True, check=False)
    if code != 0:
        progress.say("      runtime checks failed; last 30 console lines:")
        for line in console_tail(machine.console, 30).splitlines():
            progress.say(f"      | {line}")
    return code, boot_figures(save_journal(machine, key, test_dir))


def _result(junit_parts: list[Path], codes: dict[str, int], test_dir: Path,
            figures: dict[str, float], started: float, progress: Progress) -> ImageTestResult:
    passed, failed = merge_junit(junit_parts, test_dir / "junit.xml")
    for phase, part in zip(codes, junit_parts, strict=True):
        if codes[phase] != 0 and failed == 0:
            # a phase that crashed, or wrote no report, is a failure even with no failed test
            failed = 1
            progress.say(f"      {phase} checks exited {codes[phase]} "
                         f"({'no report' if not part.exists() else 'see the log'})")
        part.unlink(missing_ok=True)
    for update_figures in (test_dir / "figures-update.json", test_dir / "figures-rollback.json",
                           test_dir / "figures-security.json"):
        if update_figures.is_file():
            for name, value in json.loads(update_figures.read_text()).items():
                if isinstance(value, (int, float)):
                    figures[name.replace("_", "-")] = float(value)
            update_figures.unlink()
    figures["test-image-seconds"] = round(time.monotonic() - started, 1)
    return ImageTestResult(passed, failed, test_dir / "junit.xml", figures)


QEMU_HOST_ADDRESS = "10.0.2.2"
USB_BUNDLE = CHECKS_DIR.parent / "corpus" / "bundles" / "unknown-key.ebundle"
USB_OS_BUNDLE = "system-99.0.raucb"


def usb_stick(path: Path, files: dict[str, Path]) -> Path:
    """A FAT-formatted stick image holding edgebake/<name> for each file, made without
    mounting."""
    subprocess.run(["mkfs.vfat", "-C", "-n", "EBSTICK", str(path), "8192"], check=True,
                   capture_output=True)
    subprocess.run(["mmd", "-i", str(path), "::/edgebake"], check=True, capture_output=True)
    for name, source in files.items():
        subprocess.run(["mcopy", "-i", str(path), str(source), f"::/edgebake/{name}"],
                       check=True, capture_output=True)
    return path


def hostile_root_stick(path: Path, tree: Path) -> Path:
    """An ext4 stick labelled like the unit's root partition, with a marker in /etc that the
    running checks must not find (mke2fs -d: no mount, no loop device)."""
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "etc" / "edgebake-hostile-root").write_text("this stick must not be the root\n")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "EB_ROOT", "-d", str(tree),
                    str(path), "16M"], check=True, capture_output=True)
    return path


def stream_picture() -> Any:
    """A picture with a face for the RTSP stream, from scikit-image when it is installed."""
    try:
        import numpy as np
        import skimage.data
        from PIL import Image
    except ImportError:
        return None
    path = Path(skimage.data.__file__).parent / "astronaut.png"
    return np.asarray(Image.open(path).convert("RGB"))


def _ssh_config(tmp: Path, sockets: Path) -> Path:
    """The checks' SSH settings. Their commands share one connection: under QEMU's emulation
    each new login costs the unit ~0.7 s of key exchange and session setup, and the checks run
    hundreds of commands. A dead connection (the unit rebooted) is noticed within 15 s."""
    config = tmp / "ssh_config"
    config.write_text("Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
                      "  LogLevel ERROR\n  ConnectTimeout 15\n  ServerAliveInterval 5\n"
                      f"  ServerAliveCountMax 3\n  ControlPath {sockets}/%C\n")
    return config
