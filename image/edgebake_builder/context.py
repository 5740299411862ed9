"""What a build knows: the options it was given, and what each step has made so far.

Each step reads what earlier steps put here and adds what it makes; nothing travels between
steps in loose dicts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .progress import Progress
from .recipe import Recipe
from .steps.assemble import DiskIds
from .steps.model import PreparedModel, RuntimeChoice
from .steps.wheels import LockedWheel, Target

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class BuildOptions:
    target: str = "pi4"
    recipe_file: Path | None = None
    model: str = ""
    out_dir: Path | None = None
    workdir: Path | None = None
    no_cache: bool = False
    compression: str = "zst"  # the published copy of the image: "zst" or "xz"
    xz_level: int = 1
    source_date_epoch: int | None = None
    base_image: Path | None = None  # a vendor image (Raspberry Pi OS Lite) to build on
    base_sha256: str = ""
    version: str = ""  # the system version, over the recipe's `version`
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


class Base(Protocol):
    """Where the rootfs starts (`variants`: Debian packages, a vendor image, nothing)."""

    title: str
    has_rootfs: bool  # a target tree the model can be verified in

    def make(self, ctx: BuildContext) -> None: ...
    def after_install(self, ctx: BuildContext) -> None: ...
    def boot_config(self, ctx: BuildContext) -> None: ...
    def manifest_fields(self, ctx: BuildContext, installed: list[dict[str, Any]]
                        ) -> dict[str, Any]: ...


class Output(Protocol):
    """What the build makes from the finished tree (`variants`: disk image, overlay)."""

    assemble_title: str
    publish_title: str

    def configure(self, ctx: BuildContext) -> None: ...
    def assemble(self, ctx: BuildContext) -> None: ...
    def publish(self, ctx: BuildContext) -> None: ...
    def summary(self, ctx: BuildContext) -> str: ...


@dataclass
class BuildContext:
    options: BuildOptions
    recipe: Recipe
    base: Base
    output: Output
    out_dir: Path
    workdir: Path
    staging: Path
    epoch: int
    progress: Progress
    started: float = field(default_factory=time.monotonic)
    # made by the steps, in order
    prepared: PreparedModel | None = None
    runtime: RuntimeChoice | None = None
    wheel_target: Target | None = None
    wheels: list[LockedWheel] = field(default_factory=list)
    wheel_dir: Path | None = None
    tarball: Path | None = None  # the base rootfs; None: the tree starts empty
    model_path: Path = Path()
    card_path: Path = Path()
    verified: dict[str, Any] = field(default_factory=lambda: {"ok": False, "skipped": True})
    artifacts: list[Path] = field(default_factory=list)  # what publish moves into out_dir
    rootfs_bytes: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def rootfs(self) -> Path:
        return self.workdir / "rootfs"

    @property
    def model(self) -> PreparedModel:
        assert self.prepared is not None, "the model step comes first"
        return self.prepared

    @property
    def disk_ids(self) -> DiskIds:
        """This build's disk signature and filesystem ids (from its inputs)."""
        keys = (self.recipe.sha256(), str(self.model.card["sha256"]), self.epoch)
        if self.recipe["layout.kind"] == "ab":
            return DiskIds.for_ab(self.recipe["name"], *keys)
        return DiskIds.for_build(*keys)

    @property
    def root_spec(self) -> str:
        """How the kernel finds the root: `kernel.root`, or by default (`auto`) this image's
        own root partition by its PARTUUID."""
        root = str(self.recipe["kernel.root"])
        first = "root_a" if self.recipe["layout.kind"] == "ab" else "root"  # ab: U-Boot's
        return f"PARTUUID={self.disk_ids.partuuid(first)}" if root == "auto" else root

    def seconds(self) -> float:
        return round(time.monotonic() - self.started, 1)

    @staticmethod
    def make_dirs(options: BuildOptions) -> tuple[Path, Path, Path]:
        """(out_dir, a fresh work dir beside it, a fresh staging dir inside it)."""
        out_dir = (options.out_dir or REPO_ROOT / "out" / options.target).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        work_parent = options.workdir or out_dir.parent
        work_parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".work-{options.target}-", dir=work_parent))
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
        return out_dir, workdir, staging

    def cleanup(self) -> None:
        """Work and staging go, whether the build ended or failed."""
        shutil.rmtree(self.workdir, ignore_errors=True)
        for leftover in self.out_dir.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.progress.close()
