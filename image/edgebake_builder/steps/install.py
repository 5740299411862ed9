"""Step: unpack the base and install the runtime, its launchers and the model."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..hostcmd import run
from ..progress import Progress
from .model import PreparedModel
from .rootfs import inside

RUNTIME_SRC = Path(__file__).resolve().parents[3] / "runtime" / "edgebake_runtime"
APP_ROOT = Path("/opt/edgebake")
MODEL_DIR = APP_ROOT / "model"
SITE_DIR = APP_ROOT / "lib"

LAUNCHER = """#!/usr/bin/python3 -I
# {what}: starts the installed edgebake runtime from /opt/edgebake/lib.
import sys
sys.path.insert(0, "/opt/edgebake/lib")
from {module} import main
sys.exit(main())
"""
LAUNCHERS = {
    "edgebake-runtime": ("edgebake_runtime.main", "the inference service"),
    "edgebake-firstboot": ("edgebake_runtime.firstboot", "first-boot seed and host keys"),
    "edgebake-selfcheck": ("edgebake_runtime.selfcheck", "model check with the shipped runtime"),
    "edgebake-growdata": ("edgebake_runtime.growdata", "data partition grows to fill the card"),
    "edgebake-update": ("edgebake_runtime.update", "signed model updates"),
    "edgebake-usb-update": ("edgebake_runtime.usbupdate",
                            "model and system bundles from a USB stick"),
    "edgebake-os": ("edgebake_runtime.osupdate", "system updates (RAUC) and their trial"),
}



def extract_base(tarball: Path, rootfs: Path, progress: Progress) -> None:
    if rootfs.exists():
        shutil.rmtree(rootfs)
    rootfs.mkdir(parents=True)
    run(["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf", tarball, "-C",
         rootfs], progress, what="tar (unpack base rootfs)")


def install_runtime(rootfs: Path) -> None:
    """The app's own code goes in as files; its dependencies come from Debian and the wheels."""
    lib = inside(rootfs, SITE_DIR)
    lib.mkdir(parents=True, exist_ok=True)
    dest = lib / "edgebake_runtime"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(RUNTIME_SRC, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bindir = inside(rootfs, APP_ROOT / "bin")
    bindir.mkdir(parents=True, exist_ok=True)
    on_path = inside(rootfs, Path("/usr/local/bin"))
    on_path.mkdir(parents=True, exist_ok=True)
    for name, (module, what) in LAUNCHERS.items():
        script = bindir / name
        script.write_text(LAUNCHER.format(module=module, what=what))
        script.chmod(0o755)
        # on PATH for a technician's shell and for `invoke push-model`
        link = on_path / name
        link.unlink(missing_ok=True)
        link.symlink_to(APP_ROOT / "bin" / name)
    (inside(rootfs, APP_ROOT) / "README").write_text(
        "edgebake appliance runtime.\n"
        "  bin/     launchers (service, first boot, model self-check)\n"
        "  lib/     the runtime and its pinned wheels\n"
        "  model/   the model baked into this image, its card and golden outputs\n"
        "Config: /etc/edgebake/app.yaml; per-unit seed: /boot/firmware/edgebake-seed.yaml\n")


def install_model(model: PreparedModel, rootfs: Path) -> Path:
    """Copy model, card and golden file, and its variants' (`<stem>.variants/`), into the
    image; return the model's target path."""
    target_dir = inside(rootfs, MODEL_DIR)
    shutil.rmtree(target_dir, ignore_errors=True)
    target_dir.mkdir(parents=True)
    for prepared in (model, *model.variants):
        folder = target_dir / prepared.model.parent.relative_to(model.model.parent)
        folder.mkdir(exist_ok=True)
        for path in (prepared.model, prepared.card_path, prepared.golden_path):
            shutil.copyfile(path, folder / path.name)
            (folder / path.name).chmod(0o644)
    return MODEL_DIR / model.model.name
