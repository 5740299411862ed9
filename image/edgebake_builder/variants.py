"""The kinds of base and of output a recipe can pick, chosen once per build.

A base says where the rootfs starts (Debian packages, a vendor image, nothing) and what that
means for the later steps; an output says what the build makes (a disk image, an overlay
tarball). The build's steps call them and never ask which kind they have.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from . import manifest, sbom
from .cache import sha256_file
from .context import BuildContext
from .errors import BuildError
from .steps import (
    abboot,
    assemble,
    baseimage,
    bootstrap,
    osbundle,
    overlayout,
    overlays,
    packages,
    prune,
    publish,
    refuse,
    vendorboot,
)
from .steps import rootfs as rootfs_tree


class Base:
    """Where the rootfs starts."""

    title = ""
    has_rootfs = True  # a target tree the model can be verified in

    def make(self, ctx: BuildContext) -> None:
        """Make (or find cached) the base tarball: `ctx.tarball`."""

    def after_install(self, ctx: BuildContext) -> None:
        """Called once the runtime is in the tree."""

    def boot_config(self, ctx: BuildContext) -> None:
        """Write what the boot partition needs."""
        overlays.write_boot_config(ctx.recipe, ctx.rootfs, ctx.root_spec)
        if ctx.recipe["layout.kind"] == "ab":
            abboot.switch_to_uboot(ctx.recipe, ctx.rootfs, ctx.epoch, ctx.progress)

    def manifest_fields(self, ctx: BuildContext, installed: list[dict[str, Any]]
                        ) -> dict[str, Any]:
        return {}


class DebianBase(Base):
    title = "base rootfs (mmdebstrap, cached by content key)"

    def make(self, ctx: BuildContext) -> None:
        ctx.tarball = bootstrap.bootstrap_base(ctx.recipe, ctx.progress,
                                               no_cache=ctx.options.no_cache)

    def manifest_fields(self, ctx: BuildContext, installed: list[dict[str, Any]]
                        ) -> dict[str, Any]:
        return {"base_key": bootstrap.base_key(ctx.recipe), "base_image": None}


class VendorBase(Base):
    """A vendor image (Raspberry Pi OS Lite): its kernel, firmware and packages are kept."""

    def __init__(self, image: baseimage.BaseImage) -> None:
        self.image = image
        self.title = f"base rootfs: import {image.path.name} (no mounts, cached)"
        self.info: baseimage.VendorInfo | None = None

    def make(self, ctx: BuildContext) -> None:
        ctx.tarball, self.info = baseimage.import_base(self.image, ctx.progress,
                                                       no_cache=ctx.options.no_cache)

    def _info(self) -> baseimage.VendorInfo:
        assert self.info is not None, "the base step comes first"
        return self.info

    def after_install(self, ctx: BuildContext) -> None:
        packages.add_missing(ctx.recipe, ctx.rootfs, self._info().packages, ctx.progress)

    def boot_config(self, ctx: BuildContext) -> None:
        vendorboot.adapt(ctx.recipe, ctx.rootfs, self._info(), ctx.root_spec, ctx.progress)

    def manifest_fields(self, ctx: BuildContext, installed: list[dict[str, Any]]
                        ) -> dict[str, Any]:
        info = self._info()
        return {"base_key": None, "base_image": {
            "name": info.name, "sha256": info.sha256, "release": info.release,
            "rpi_issue": info.rpi_issue, "cmdline": info.cmdline,
            "packages_added": sorted({p["name"] for p in installed} - set(info.packages))}}


class NoBase(Base):
    """Nothing: an overlay for a rootfs made elsewhere (NVIDIA's L4T)."""

    title = "base rootfs: none (an overlay for a rootfs made elsewhere)"
    has_rootfs = False

    def make(self, ctx: BuildContext) -> None:
        ctx.progress.say("      the overlay starts from an empty tree")


class Output:
    """What the build makes from the finished tree."""

    assemble_title = ""
    publish_title = ""

    def configure(self, ctx: BuildContext) -> None:
        """Users, services, first boot and the data tree, as this output needs them."""
        raise NotImplementedError

    def assemble(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def publish(self, ctx: BuildContext) -> None:
        raise NotImplementedError

    def summary(self, ctx: BuildContext) -> str:
        raise NotImplementedError


class DiskImage(Output):
    os_keys: osbundle.OsKeys | None = None
    assemble_title = ("assemble: SBOM, genimage (MBR: FAT32 boot, ext4 root or roots A and B, "
                      "ext4 data)")
    publish_title = "publish: zstd (or xz), bmap, SHA256SUMS, manifest.json"

    def configure(self, ctx: BuildContext) -> None:
        uid, gid = overlays.create_users(ctx.rootfs, ctx.progress)
        overlays.protect_config(ctx.rootfs, gid)
        overlays.lock_passwords(ctx.rootfs)
        overlays.configure_services(ctx.recipe, ctx.rootfs, ctx.progress)
        overlays.prepare_first_boot(ctx.recipe, ctx.rootfs)
        ctx.base.boot_config(ctx)
        self.os_keys = (osbundle.install_keyring(ctx.recipe, ctx.rootfs, ctx.progress)
                        if ctx.recipe["layout.kind"] == "ab" else None)
        overlays.make_data_tree(ctx.rootfs, uid, gid)

    def assemble(self, ctx: BuildContext) -> None:
        prune.prune_modules(ctx.rootfs, ctx.recipe["kernel.modules_exclude"],
                            ctx.recipe["kernel.modules_keep"], ctx.progress)
        prune.prune_hwdb(ctx.rootfs, ctx.recipe["hwdb_exclude"], ctx.progress)
        refuse.refuse_libraries(ctx.rootfs, ctx.recipe["refuse_libraries"],
                                ctx.recipe["refuse_answer_none"], ctx.progress)
        prune.prune(ctx.rootfs, ctx.recipe["prune"], ctx.recipe["prune_keep"], ctx.progress)
        assemble.compile_python(ctx.rootfs, ctx.epoch, ctx.progress)
        self.installed = rootfs_tree.installed_packages(ctx.rootfs)
        self.sbom = bake_sbom(ctx)
        ctx.rootfs_bytes = rootfs_tree.tree_bytes(ctx.rootfs)
        assemble.clamp_mtimes(ctx.rootfs, ctx.epoch)
        self.image = assemble.assemble(ctx.recipe, ctx.disk_ids, ctx.rootfs,
                                       ctx.workdir, ctx.staging, f"{ctx.recipe['name']}.img",
                                       ctx.epoch, ctx.progress)

    def publish(self, ctx: BuildContext) -> None:
        image = self.image
        packed = publish.compress(image, ctx.options.compression, ctx.options.xz_level,
                                  ctx.progress)
        bmap = publish.make_bmap(image, ctx.progress)
        image_sha = sha256_file(image)
        system = self.system_bundle(ctx)
        artifacts = [image, packed, bmap, *self.sbom] + ([system] if system else [])
        ctx.manifest = manifest.build(ctx, {
            "image": image.name, "image_compressed": packed.name, "bmap": bmap.name,
            "image_sha256": image_sha, "image_bytes": image.stat().st_size,
            "image_compressed_bytes": packed.stat().st_size,
            **ctx.base.manifest_fields(ctx, self.installed),
            "packages": self.installed,
            "sbom": sbom_fields(self.sbom),
            "system": {"layout": ctx.recipe["layout.kind"], "version": ctx.recipe["version"],
                       "bundle": system.name if system else None,
                       "bundle_sha256": sha256_file(system) if system else None,
                       "bundle_bytes": system.stat().st_size if system else None,
                       "compatible": ctx.recipe["name"]},
            "partitions": {"labels": assemble.PARTITION_LABELS,
                           "partuuids": ctx.disk_ids.partuuids(),
                           **ctx.disk_ids.__dict__}})
        publish.publish(ctx.staging, ctx.out_dir, artifacts, ctx.manifest,
                        known={image.name: image_sha})
        for stale in ctx.out_dir.glob("*.raucb"):  # an earlier build's system bundle
            if system is None or stale.name != system.name:
                stale.unlink()
        for other in ("zst", "xz"):  # an earlier build's copy in the other format is stale
            stale = ctx.out_dir / f"{image.name}.{other}"
            if stale.name != packed.name:
                stale.unlink(missing_ok=True)

    def system_bundle(self, ctx: BuildContext) -> Path | None:
        """With an A/B layout and a signing key: this build's root as a RAUC bundle."""
        if self.os_keys is None:
            return None
        name = f"{ctx.recipe['name']}-{ctx.recipe['version']}.raucb"
        return osbundle.make_bundle(self.os_keys, ctx.recipe["name"], ctx.recipe["version"],
                                    ctx.workdir / "root.ext4", ctx.workdir,
                                    ctx.staging / name, ctx.progress)

    def summary(self, ctx: BuildContext) -> str:
        m = ctx.manifest
        return (f"image: {ctx.out_dir / m['image']} ({m['image_bytes'] / 2**20:.0f} MiB, "
                f"{ctx.options.compression} {m['image_compressed_bytes'] / 2**20:.0f} MiB, "
                f"rootfs "
                f"{ctx.rootfs_bytes / 2**20:.0f} MiB) in {m['build_seconds']:.0f}s")


class Overlay(Output):
    assemble_title = "overlay: .tar.zst of what edgebake adds"
    publish_title = "publish: SHA256SUMS, manifest.json"

    def configure(self, ctx: BuildContext) -> None:
        # users and ownership come when it is applied to a rootfs
        overlays.configure_services(ctx.recipe, ctx.rootfs, ctx.progress)
        overlays.make_data_tree(ctx.rootfs, 0, 0, state=False)

    def assemble(self, ctx: BuildContext) -> None:
        self.sbom = bake_sbom(ctx)
        ctx.rootfs_bytes = rootfs_tree.tree_bytes(ctx.rootfs)
        assemble.clamp_mtimes(ctx.rootfs, ctx.epoch)
        self.overlay = overlayout.write_overlay(ctx.rootfs, ctx.staging, ctx.epoch,
                                                ctx.progress)

    def publish(self, ctx: BuildContext) -> None:
        overlay = self.overlay
        ctx.manifest = manifest.build(ctx, {
            "overlay": overlay.name, "overlay_sha256": sha256_file(overlay),
            "overlay_bytes": overlay.stat().st_size,
            "sbom": sbom_fields(self.sbom),
            "systemd_version": ctx.recipe["systemd.version"]})
        publish.publish(ctx.staging, ctx.out_dir, [overlay, *self.sbom], ctx.manifest)

    def summary(self, ctx: BuildContext) -> str:
        m = ctx.manifest
        return (f"overlay: {ctx.out_dir / m['overlay']} ({m['overlay_bytes'] / 2**20:.1f} MiB, "
                f"{ctx.rootfs_bytes / 2**20:.0f} MiB unpacked) in {m['build_seconds']:.0f}s; "
                "apply it with `invoke apply-overlay --rootfs Linux_for_Tegra/rootfs`")


def sbom_fields(made: tuple[Path, Path]) -> dict[str, str]:
    return {"spdx": made[0].name, "cyclonedx": made[1].name, "sha256": sha256_file(made[0])}


def bake_sbom(ctx: BuildContext) -> tuple[Path, Path]:
    """The tree's SBOM, into the tree (for the unit's /health and for the system bundle) and
    beside the output as `<name>.spdx.json` and `<name>.cdx.json`."""
    card = ctx.model.card
    components = sbom.extras(ctx.wheels, ctx.model.model.name, str(card["version"]),
                             str(card["sha256"]))
    spdx, cdx = sbom.make_sbom(ctx.rootfs, ctx.recipe["name"], ctx.recipe["version"],
                               components, ctx.workdir / "sbom", ctx.epoch, ctx.progress)
    folder = rootfs_tree.inside(ctx.rootfs, sbom.IN_IMAGE)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spdx, folder / sbom.SPDX_NAME)
    (folder / "sbom.sha256").write_text(sha256_file(spdx) + "\n")
    published = []
    for made, suffix in ((spdx, "spdx.json"), (cdx, "cdx.json")):
        target = ctx.staging / f"{ctx.recipe['name']}.{suffix}"
        shutil.copyfile(made, target)
        published.append(target)
    return published[0], published[1]


def vendor_image(image: Path | None, sha256: str) -> baseimage.BaseImage | None:
    """The --base image, its arguments checked before any work."""
    if image is None:
        if sha256:
            raise BuildError("--base-sha256 given without --base")
        return None
    vendor = baseimage.BaseImage(image.resolve(), sha256.lower())
    vendor.check_args()
    return vendor


def choose_base(recipe_base: str, vendor: baseimage.BaseImage | None) -> Base:
    if vendor is not None:
        return VendorBase(vendor)
    return NoBase() if recipe_base == "none" else DebianBase()


def choose_output(recipe_output: str) -> Output:
    return Overlay() if recipe_output == "overlay" else DiskImage()
