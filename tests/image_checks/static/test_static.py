"""Static checks on the image's root filesystem, before it ever boots."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

SERVICE = "/usr/lib/systemd/system/edgebake.service"
# `overlay`: also true of a rootfs the Jetson overlay was applied to (`apply-overlay --check`)
overlay = pytest.mark.overlay


@pytest.mark.parametrize("package", ["systemd", "linux-image-arm64", "raspi-firmware",
                                     "python3", "python3-numpy", "python3-pil",
                                     "openssh-server"])
def test_package_installed(host: Any, package: str) -> None:
    assert host.package(package).is_installed


@pytest.mark.parametrize(("path", "mode"), [
    pytest.param("/opt/edgebake/bin/edgebake-runtime", 0o755, marks=overlay),
    ("/opt/edgebake/bin/edgebake-firstboot", 0o755),
    pytest.param(SERVICE, 0o644, marks=overlay),
    pytest.param("/usr/lib/sysusers.d/edgebake.conf", 0o644, marks=overlay),
    ("/etc/ssh/sshd_config.d/edgebake.conf", 0o644),
])
def test_file_owner_and_mode(host: Any, path: str, mode: int) -> None:
    f = host.file(path)
    assert f.exists and f.user == "root" and f.group == "root"
    assert f.mode == mode


@overlay
def test_the_unit_knows_its_target_and_fleet(host: Any) -> None:
    """Bundles and orders are checked against these two (recipe target and update.fleet)."""
    assert host.file("/etc/edgebake/target").content_string.strip() != ""
    fleet = host.file("/etc/edgebake/fleet")
    assert fleet.mode == 0o644 and fleet.content_string.strip() == "default"


def test_config_with_credentials_is_for_root_and_the_service_only(host: Any) -> None:
    """app.yaml may carry the broker's password: not world-readable (0640 root:edgebake)."""
    f = host.file("/etc/edgebake/app.yaml")
    assert (f.user, f.group, f.mode) == ("root", "edgebake", 0o640)


@overlay
def test_service_user(host: Any) -> None:
    user = host.user("edgebake")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin")
    assert "video" in user.groups
    assert user.uid < 1000


def test_no_account_has_a_usable_password(host: Any) -> None:
    for line in host.file("/etc/shadow").content_string.splitlines():
        name, password = line.split(":")[:2]
        assert password.startswith(("!", "*")), f"{name} has a usable password"


@pytest.mark.parametrize(("unit", "target"), [
    pytest.param("edgebake.service", "multi-user.target", marks=overlay),
    ("edgebake-firstboot.service", "sysinit.target"),
    ("systemd-networkd.service", "multi-user.target"),
])
def test_unit_enabled(host: Any, unit: str, target: str) -> None:
    link = host.file(f"/etc/systemd/system/{target}.wants/{unit}")
    assert link.is_symlink


@overlay
def test_model_matches_manifest(host: Any, manifest: dict[str, Any]) -> None:
    model = manifest["model"]
    data = host.file(model["path"]).content
    assert hashlib.sha256(data).hexdigest() == model["sha256"]
    if "image" in manifest:  # an overlay is verified in the rootfs it is applied to
        assert model["verified_on_target"] is True


def test_sshd_is_key_only(host: Any) -> None:
    config = host.file("/etc/ssh/sshd_config.d/edgebake.conf").content_string
    assert "PasswordAuthentication no" in config
    assert "KbdInteractiveAuthentication no" in config
    assert "PermitRootLogin prohibit-password" in config
    assert "HostKey /etc/ssh/ssh_host_ed25519_key" in config.splitlines()
    # each unit makes its own at first boot: none from the build (nor its stand-ins)
    for kind in ("rsa", "ecdsa", "ed25519"):
        assert not host.file(f"/etc/ssh/ssh_host_{kind}_key").exists, kind


def test_the_initramfs_settings_are_the_packages_own(host: Any) -> None:
    """The base skips initramfs updates only while its packages install (one initramfs, not
    three); the image keeps initramfs-tools' own setting."""
    conf = host.file("/etc/initramfs-tools/update-initramfs.conf")
    if conf.exists:
        assert "update_initramfs=no" not in conf.content_string
        assert not host.file("/etc/initramfs-tools/update-initramfs.conf.dpkg-dist").exists


@pytest.mark.parametrize("directive", [
    "Type=notify", "User=edgebake", "NoNewPrivileges=yes", "ProtectSystem=strict",
    "ReadWritePaths=/data", "PrivateTmp=yes", "CapabilityBoundingSet=",
    "DeviceAllow=char-video4linux rw", "WatchdogSec=",
])
@overlay
def test_unit_hardening(host: Any, directive: str) -> None:
    assert directive in host.file(SERVICE).content_string


@overlay
def test_watchdog_and_journald_limits(host: Any) -> None:
    watchdog = host.file("/etc/systemd/system.conf.d/edgebake-watchdog.conf").content_string
    assert "RuntimeWatchdogSec=" in watchdog
    assert "SystemMaxUse=" in host.file(
        "/etc/systemd/journald.conf.d/edgebake.conf").content_string


def test_runtime_imports_in_the_target(host: Any, manifest: dict[str, Any]) -> None:
    """The shipped Python imports the shipped app and the TFLite runtime the build chose."""
    module = {"tflite-runtime": "tflite_runtime",
              "ai-edge-litert": "ai_edge_litert"}[manifest["model"]["runtime"]["name"]]
    cmd = host.run("PYTHONPATH=/opt/edgebake/lib python3 -c "
                   f"'import {module}.interpreter, edgebake_runtime.service; print(\"ok\")'")
    assert cmd.rc == 0, cmd.stderr
    assert cmd.stdout.strip() == "ok"


H264_DECODE = """
import av
print(sum(1 for _ in av.open("/tmp/edgebake-check/clip.h264").decode(video=0)))
"""
X264_ENCODE = """
import av
codec = av.CodecContext.create("libx264", "w")
codec.width, codec.height, codec.pix_fmt = 64, 64, "yuv420p"
codec.open()
print("opened")
"""


def _h264_clip(path: Path, frames: int) -> None:
    """A short H.264 stream made on the host, as an RTSP camera would send one."""
    import av
    import numpy as np

    with av.open(str(path), "w", format="h264") as out:
        stream = out.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 40, np.uint8),
                                               format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def test_streams_decode_with_the_shipped_pyav(host: Any, manifest: dict[str, Any]) -> None:
    """PyAV's shared objects lose their debug sections, and the encoders its FFmpeg links
    are refused (recipe refuse_libraries): H.264 still decodes in the target (qemu-user),
    which is what RTSP cameras need, and a refused encoder ends the process naming it."""
    if not host.file("/opt/edgebake/lib/av").exists:
        pytest.skip("this image ships no PyAV")
    scratch = Path(os.environ["EDGEBAKE_ROOTFS"]) / "tmp" / "edgebake-check"
    scratch.mkdir(parents=True, exist_ok=True)
    _h264_clip(scratch / "clip.h264", 4)
    (scratch / "decode.py").write_text(H264_DECODE)
    (scratch / "encode.py").write_text(X264_ENCODE)
    cmd = host.run("PYTHONPATH=/opt/edgebake/lib python3 /tmp/edgebake-check/decode.py")
    assert cmd.rc == 0 and cmd.stdout.strip() == "4", cmd.stderr[-800:]
    refused = any("libx264" in p for p in manifest["recipe"].get("refuse_libraries", []))
    cmd = host.run("PYTHONPATH=/opt/edgebake/lib python3 /tmp/edgebake-check/encode.py")
    if refused:
        assert cmd.rc == 70 and "opened" not in cmd.stdout, (cmd.rc, cmd.stdout)
        assert "libx264" in cmd.stderr and "left out of this image" in cmd.stderr, cmd.stderr
    else:
        assert cmd.rc == 0 and cmd.stdout.strip() == "opened", cmd.stderr[-800:]


def test_model_updates_can_be_checked_on_the_target(host: Any) -> None:
    """The shipped cryptography (Debian's, or the wheels on an overlay) signs and verifies
    ed25519 under the target's Python."""
    script = ("from cryptography.hazmat.primitives.asymmetric import ed25519; "
              "k = ed25519.Ed25519PrivateKey.generate(); "
              "k.public_key().verify(k.sign(b'x'), b'x'); "
              "import edgebake_runtime.update; print('ok')")
    cmd = host.run(f'PYTHONPATH=/opt/edgebake/lib python3 -c "{script}"')
    assert cmd.rc == 0 and cmd.stdout.strip() == "ok", cmd.stderr
    assert host.file("/opt/edgebake/bin/edgebake-update").mode == 0o755
    # a technician's shell and `invoke push-model` find it on PATH
    on_path = host.file("/usr/local/bin/edgebake-update")
    assert on_path.is_symlink and on_path.linked_to == "/opt/edgebake/bin/edgebake-update"
    assert host.file("/etc/edgebake/target").content_string.strip()
    assert host.file("/etc/edgebake/update-keys/recipe.pub").exists


def builtin_modules(root: Path) -> set[str]:
    """Names of the drivers built into the kernel (modules.builtin), which need no file."""
    from edgebake_builder.kmods import module_name

    listing = root / "modules.builtin"
    lines = listing.read_text().split() if listing.is_file() else []
    return {module_name(Path(line)) for line in lines}


def test_every_kernel_module_has_its_dependencies() -> None:
    """The closure of `depends=` over every shipped module: none points at a pruned one."""
    from edgebake_builder.kmods import ModuleTree, kernel_trees, missing_dependencies

    trees = kernel_trees(Path(os.environ["EDGEBAKE_ROOTFS"]))
    assert trees
    for root in trees:
        tree = ModuleTree.scan(root)
        assert len(tree.files) > 100
        assert missing_dependencies(tree) == {}
        # what the kept list promises: USB storage, Wi-Fi, cameras, the watchdog, ethernet,
        # PCIe (the Pi 4's USB), verity bundles, sticks, VPN, and QEMU's virtio and vivid
        for needed in ("usb_storage", "uas", "sd_mod", "scsi_mod", "brcmfmac", "cfg80211",
                       "vivid", "uvcvideo", "bcm2835_wdt", "genet", "pcie_brcmstb",
                       "xhci_pci", "dm_verity", "loop", "squashfs", "vfat", "exfat",
                       "wireguard", "virtio_net"):
            assert needed in tree.files or needed in builtin_modules(root), needed


@pytest.mark.parametrize("path", ["/usr/sbin/wpa_supplicant", "/usr/sbin/sfdisk",
                                  "/usr/sbin/resize2fs"])
def test_field_tools_present(host: Any, path: str) -> None:
    assert host.file(path).exists


def test_pi4_wifi_firmware_present(host: Any) -> None:
    found = host.run("ls /lib/firmware/brcm/ | grep -c '^brcmfmac43455-sdio'").stdout.strip()
    assert int(found or 0) >= 1


@pytest.mark.parametrize("unit", ["edgebake-growdata.service"])
def test_field_units_enabled(host: Any, unit: str) -> None:
    assert host.service(unit).is_enabled


def test_config_and_model_errors_do_not_restart_loop(host: Any) -> None:
    unit = host.file(SERVICE).content_string
    assert "RestartPreventExitStatus=2 3" in unit


def test_partitions_are_found_by_this_images_own_ids(host: Any,
                                                     manifest: dict[str, Any]) -> None:
    """Never by a label: a USB stick labelled like our partitions must not be mounted as the
    root or /data (the kernel's root= is checked on the boot partition by the build tests and
    on the booted unit)."""
    ids = manifest["partitions"]["partuuids"]
    fields = {line.split()[1]: line.split()[0] for line in
              host.file("/etc/fstab").content_string.splitlines()
              if line.strip() and not line.startswith("#")}
    # an A/B root is the slot U-Boot booted: root= on its command line, checked when booted
    mounts = (("/", "root"),) if "root" in ids else ()
    for mount, name in (*mounts, ("/boot/firmware", "boot"), ("/data", "data")):
        assert fields[mount] == f"PARTUUID={ids[name]}", (mount, fields[mount])
    if "root" not in ids:
        assert "/" not in fields, fields


def test_root_is_mounted_read_only_with_state_bound_from_data(host: Any,
                                                            manifest: dict[str, Any]) -> None:
    fields = [line.split() for line in host.file("/etc/fstab").content_string.splitlines()
              if line.strip() and not line.startswith("#")]
    by_target = {f[1]: f for f in fields}
    if "/" in by_target:
        assert by_target["/"][3].split(",")[0] == "ro", by_target["/"]
    else:  # A/B: the boot script's command line mounts the slot read-only
        from edgebake_builder.validate import diskimage
        image = Path(os.environ["EDGEBAKE_IMAGE"])
        script = diskimage.read_fat_file(image, diskimage.boot_partition(image),
                                         "boot.cmd").decode()
        bootargs = next(x for x in script.splitlines() if "setenv bootargs" in x)
        assert " ro " in bootargs and " rw " not in bootargs, bootargs
    for target, name in (("/var/log", "log"), ("/var/lib/systemd", "systemd"),
                         ("/var/lib/edgebake", "edgebake")):
        assert by_target[target][0] == f"/data/state/{name}", by_target.get(target)
        assert "bind" in by_target[target][3].split(",")
    assert by_target["/tmp"][2] == by_target["/var/tmp"][2] == "tmpfs"
    wanted = host.run("ls /etc/systemd/system/*.wants/").stdout.split()
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer",
                 "e2scrub_all.timer", "e2scrub_reap.service"):
        assert unit not in wanted, unit
    assert "edgebake.service" in wanted, wanted  # the listing itself worked
    link = host.run("readlink /etc/resolv.conf").stdout.strip()
    assert link == "../run/systemd/resolve/stub-resolv.conf", link  # not the build host's


def test_rauc_knows_both_slots_and_trusts_the_keyring_a_bundle_was_signed_for(
        host: Any, manifest: dict[str, Any]) -> None:
    """An A/B image: RAUC's slots by this disk's PARTUUIDs, U-Boot's variables on the boot
    partition, verity bundles only, the identity handler; and the keyring baked in exactly
    when the build made a bundle (so a built bundle always installs on its own image)."""
    system = manifest.get("system") or {}
    if system.get("layout") != "ab":
        pytest.skip("a single-root image")
    ids = manifest["partitions"]["partuuids"]
    conf = host.file("/etc/rauc/system.conf").content_string
    assert f"compatible={manifest['name']}" in conf and "bootloader=uboot" in conf
    assert "bundle-formats=-plain" in conf
    for slot, name in (("A", "root_a"), ("B", "root_b")):
        assert f"device=/dev/disk/by-partuuid/{ids[name]}\ntype=ext4\nbootname={slot}" in conf
    assert host.file("/etc/fw_env.config").content_string.splitlines()[-1] == \
        "/boot/firmware/boot-state.env 0x0 0x4000"
    assert host.file("/usr/lib/edgebake/rauc-post-install").mode & 0o111
    assert host.file("/etc/rauc/keyring.pem").exists == bool(system.get("bundle"))
    assert host.file("/etc/edgebake/version").content_string.strip() == system["version"]
    assert host.file("/boot/vmlinuz").size > 10 * 2**20  # the slot's own kernel and initrd
    assert host.file("/boot/initrd.img").size > 2**20
    sbom = host.file("/usr/share/edgebake/sbom.spdx.json")
    assert hashlib.sha256(sbom.content).hexdigest() == \
        host.file("/usr/share/edgebake/sbom.sha256").content_string.strip() == \
        manifest["sbom"]["sha256"]
