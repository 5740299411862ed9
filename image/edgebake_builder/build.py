"""build_image(): the whole build, top to bottom, as a list of named steps."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebake_runtime.config import ConfigError, validate

from . import __version__, preflight, units
from .cache import sha256_file
from .errors import BuildError
from .progress import Progress
from .recipe import Recipe, load_recipe
from .steps import (
    assemble,
    baseimage,
    bootstrap,
    install,
    model,
    overlayout,
    overlays,
    packages,
    publish,
    vendorboot,
    verify,
    wheels,
)
from .steps import rootfs as rootfs_tree

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 9
MIN_FREE_BYTES = 6 * 2**30


@dataclass
class BuildOptions:
    target: str = "pi4"
    recipe_file: Path | None = None
    model: str = ""
    out_dir: Path | None = None
    workdir: Path | None = None
    no_cache: bool = False
    xz_level: int = 1
    source_date_epoch: int | None = None
    base_image: Path | None = None  # a vendor image (Raspberry Pi OS Lite) to build on
    base_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def default_source_date_epoch() -> int:
    """The last commit's time, so the same checkout always stamps the same time."""
    explicit = os.environ.get("SOURCE_DATE_EPOCH")
    if explicit:
        return int(explicit)
    with contextlib.suppress(OSError, subprocess.CalledProcessError, ValueError):
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%ct"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return int(out)
    return 1735689600  # 2025-01-01, for a tree without git history


def app_config_for(recipe: Recipe, model_path: Path, card_path: Path) -> dict[str, Any]:
    """The app.yaml contents: recipe `app` settings plus the baked-in model's location."""
    config = dict(recipe["app"])
    config["model"] = {**config.get("model", {}), "path": str(model_path),
                       "card": str(card_path)}
    return config


def check_app_config(recipe: Recipe) -> None:
    """The runtime validates app.yaml at start; validate it here too, before any work."""
    probe = app_config_for(recipe, Path("/opt/edgebake/model/m.tflite"),
                           Path("/opt/edgebake/model/m.card.json"))
    try:
        validate(probe, "recipe: app")
    except ConfigError as exc:
        raise BuildError(str(exc)) from None


def build_image(options: BuildOptions) -> dict[str, Any]:
    started = time.monotonic()
    vendor = None
    if options.base_image is not None:
        vendor = baseimage.BaseImage(options.base_image.resolve(), options.base_sha256.lower())
        vendor.check_args()
    elif options.base_sha256:
        raise BuildError("--base-sha256 given without --base")
    recipe = load_recipe(options.target, options.recipe_file, base_image=vendor is not None)
    model_arg = options.model or recipe["model.path"]
    check_app_config(recipe)
    out_dir = (options.out_dir or REPO_ROOT / "out" / options.target).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    epoch = options.source_date_epoch or default_source_date_epoch()
    recipe_sha = recipe.sha256()
    progress = Progress(STEPS, log_path=out_dir / "build.log")
    progress.say(f"edgebake {__version__}: target {options.target}, recipe {recipe_sha[:12]}, "
                 f"SOURCE_DATE_EPOCH {epoch}")
    work_parent = options.workdir or out_dir.parent
    work_parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".work-{options.target}-", dir=work_parent))
    try:
        with progress.step("preflight: host tools, binfmt, disk space"):
            preflight.require_root()
            preflight.require_tools()
            preflight.require_binfmt()
            preflight.require_disk_space(workdir, MIN_FREE_BYTES)
        target = wheels.Target(recipe["python.version"], recipe["python.glibc"])
        lock = wheels.read_wheels_lock()
        with progress.step("model: fetch, inspect, card, golden outputs, runtime"):
            prepared = model.prepare_model(model_arg, workdir, progress)
            runtime = model.choose_runtime(
                recipe["runtime"], prepared.card,
                [r for r in model.RUNTIME_PREFERENCE if wheels.wheel_for(r, lock, target)],
                target.python)
            progress.say(f"      runtime {runtime.name} ({runtime.reason})")
        base_info: dict[str, Any] = {}
        overlay_only = recipe["output"] == "overlay"
        tarball: Path | None = None
        if vendor is None and recipe["base"] == "none":
            with progress.step("base rootfs: none (an overlay for a rootfs made elsewhere)"):
                progress.say("      the overlay starts from an empty tree")
        elif vendor is None:
            with progress.step("base rootfs (mmdebstrap, cached by content key)"):
                tarball = bootstrap.bootstrap_base(recipe, progress, no_cache=options.no_cache)
        else:
            with progress.step(f"base rootfs: import {vendor.path.name} (no mounts, cached)"):
                tarball, base_info = baseimage.import_base(vendor, progress,
                                                           no_cache=options.no_cache)
        with progress.step("wheels: download pinned aarch64 wheels by hash"):
            locked = wheels.select_wheels([runtime.name, *recipe["wheels"]], lock, target)
            wheel_dir = wheels.download_wheels(locked, target, progress)
        rootfs = workdir / "rootfs"
        with progress.step("install: runtime, wheels, model, users"):
            if tarball is None:
                rootfs.mkdir(parents=True)
            else:
                install.extract_base(tarball, rootfs, progress)
            if vendor is not None:
                packages.add_missing(recipe, rootfs, base_info["packages"], progress)
            install.install_runtime(rootfs)
            wheels.install_wheels(locked, wheel_dir, rootfs_tree.inside(rootfs, install.SITE_DIR),
                                  target, progress)
            model_path = install.install_model(prepared, rootfs)
            card_path = install.MODEL_DIR / prepared.card_path.name
        with progress.step("overlays: render templates, enable units, first-boot state"):
            context = {"recipe": recipe.as_nested(), "target": options.target,
                       "model": prepared.card,
                       "model_path": str(model_path), "card_path": str(card_path),
                       "app_config": app_config_for(recipe, model_path, card_path),
                       "partition_labels": {k.lower(): v for k, v in
                                            assemble.PARTITION_LABELS.items()},
                       "state_binds": overlays.state_binds(rootfs)}
            overlays.apply_overlays(recipe["overlays"], rootfs, context)
            units.check_units(rootfs, ["edgebake"], recipe["systemd.version"])
            if overlay_only:  # users and ownership come when it is applied to a rootfs
                overlays.configure_services(recipe, rootfs, progress)
                overlays.make_data_tree(rootfs, 0, 0, state=False)
            else:
                uid, gid = overlays.create_users(rootfs, progress)
                overlays.lock_passwords(rootfs)
                overlays.configure_services(recipe, rootfs, progress)
                overlays.prepare_first_boot(recipe, rootfs)
                if vendor is None:
                    overlays.write_boot_config(recipe, rootfs)
                else:
                    vendorboot.adapt(recipe, rootfs, base_info, progress)
                overlays.make_data_tree(rootfs, uid, gid)
        verified: dict[str, Any] = {"ok": False, "skipped": True}
        with progress.step("verify: run the model in the target rootfs (qemu-user)"):
            if tarball is None:
                progress.say("      skipped: no target rootfs to run in (apply-overlay --verify "
                             "runs it in the real one)")
            elif recipe["verify.enabled"]:
                verified = verify.verify_on_target(rootfs, model_path, card_path, progress)
            else:
                progress.say("      skipped (verify.enabled: false)")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
        image_name = f"{recipe['name']}.img"
        common = {
            "edgebake_version": __version__, "target": options.target, "name": recipe["name"],
            "recipe_sha256": recipe_sha,
            "recipe_sources": [os.path.relpath(s, REPO_ROOT) if s.startswith(
                str(REPO_ROOT)) else s for s in recipe.sources],
            "recipe": recipe.as_nested(),
            "python_wheels": [{"name": w.name, "version": w.version, "sha256": w.sha256}
                              for w in locked],
            "model": {"path": str(model_path), "card_path": str(card_path),
                      "sha256": prepared.card["sha256"], "card": prepared.card,
                      "verified_on_target": bool(verified.get("ok")),
                      "target_runtime": {k: verified.get(k) for k in
                                         ("runtime", "runtime_version", "max_deviation")},
                      "runtime": {"name": runtime.name, "reason": runtime.reason,
                                  "version": next(w.version for w in locked
                                                  if w.name == runtime.name)}},
            "source_date_epoch": epoch,
        }
        if overlay_only:
            with progress.step("overlay: .tar.zst of what edgebake adds"):
                rootfs_bytes = rootfs_tree.tree_bytes(rootfs)
                assemble.clamp_mtimes(rootfs, epoch)
                overlay = overlayout.write_overlay(rootfs, staging, epoch, progress)
            with progress.step("publish: SHA256SUMS, manifest.json"):
                manifest = {**common, "overlay": overlay.name,
                            "overlay_sha256": sha256_file(overlay),
                            "overlay_bytes": overlay.stat().st_size,
                            "systemd_version": recipe["systemd.version"],
                            "rootfs_bytes": rootfs_bytes,
                            "build_seconds": round(time.monotonic() - started, 1)}
                publish.write_json(staging / "manifest.json", manifest)
                names = [overlay.name, "manifest.json"]
                publish.write_sums(staging, names)
                publish.move_into_place(staging, out_dir, [*names, "SHA256SUMS"])
            progress.say(f"overlay: {out_dir / overlay.name} "
                         f"({manifest['overlay_bytes'] / 2**20:.1f} MiB, {rootfs_bytes / 2**20:.0f}"
                         f" MiB unpacked) in {manifest['build_seconds']:.0f}s; apply it with "
                         f"`invoke apply-overlay --rootfs Linux_for_Tegra/rootfs`")
            return manifest
        with progress.step("assemble: genimage (MBR: FAT32 boot, ext4 root, ext4 data)"):
            assemble.compile_python(rootfs, epoch, progress)
            installed = rootfs_tree.installed_packages(rootfs)
            rootfs_bytes = rootfs_tree.tree_bytes(rootfs)
            assemble.clamp_mtimes(rootfs, epoch)
            image = assemble.assemble(recipe, recipe_sha, rootfs, workdir, staging,
                                      image_name, epoch, progress)
        with progress.step("publish: xz, bmap, SHA256SUMS, manifest.json"):
            xz_path = publish.compress(image, options.xz_level, progress)
            bmap = publish.make_bmap(image, progress)
            manifest = {
                **common,
                "image": image.name,
                "image_xz": xz_path.name,
                "bmap": bmap.name,
                "image_sha256": sha256_file(image),
                "image_bytes": image.stat().st_size,
                "image_xz_bytes": xz_path.stat().st_size,
                "base_key": bootstrap.base_key(recipe) if vendor is None else None,
                "base_image": None if vendor is None else {
                    "name": base_info["name"], "sha256": base_info["sha256"],
                    "release": base_info["release"], "rpi_issue": base_info["rpi_issue"],
                    "cmdline": base_info["cmdline"],
                    "packages_added": sorted({p["name"] for p in installed}
                                             - set(base_info["packages"]))},
                "packages": installed,
                "partitions": {"labels": assemble.PARTITION_LABELS,
                               **assemble.DiskIds.for_recipe(recipe_sha).__dict__},
                "rootfs_bytes": rootfs_bytes,
                "build_seconds": round(time.monotonic() - started, 1),
            }
            publish.write_json(staging / "manifest.json", manifest)
            names = [image.name, xz_path.name, bmap.name, "manifest.json"]
            publish.write_sums(staging, names, known={image.name: manifest["image_sha256"]})
            publish.move_into_place(staging, out_dir, [*names, "SHA256SUMS"])
        progress.say(f"image: {out_dir / image.name} ({manifest['image_bytes'] / 2**20:.0f} MiB, "
                     f"xz {manifest['image_xz_bytes'] / 2**20:.0f} MiB, rootfs "
                     f"{rootfs_bytes / 2**20:.0f} MiB) in {manifest['build_seconds']:.0f}s")
        return manifest
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for leftover in out_dir.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        progress.close()
