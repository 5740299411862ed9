"""build_image(): the whole build, top to bottom, as a list of named steps.

The recipe picks a base (Debian, a vendor image, none) and an output (disk image, overlay)
once (`variants`); the steps below call them and never branch on which kind they have.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgebake_runtime.config import ConfigError, validate
from edgebake_runtime.threadtune import variants_folder

from . import __version__, preflight, units, variants
from .context import BuildContext, BuildOptions, default_source_date_epoch
from .errors import BuildError
from .progress import Progress
from .recipe import Recipe, load_recipe
from .steps import install, model, overlays, verify, wheels
from .steps import rootfs as rootfs_tree

__all__ = ["BuildOptions", "build_image", "check_app_config", "load_recipe"]
MIN_FREE_BYTES = 6 * 2**30
Step = tuple[str, Callable[[BuildContext], None]]


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


# --- the steps every build runs ------------------------------------------------------------
def check_host(ctx: BuildContext) -> None:
    preflight.require_root()
    preflight.require_tools()
    if ctx.recipe["layout.kind"] == "ab":
        preflight.require_tools(preflight.AB_TOOLS)
    preflight.require_binfmt()
    preflight.require_disk_space(ctx.workdir, MIN_FREE_BYTES)


def prepare_model(ctx: BuildContext) -> None:
    recipe = ctx.recipe
    ctx.wheel_target = wheels.Target(recipe["python.version"], recipe["python.glibc"])
    lock = wheels.read_wheels_lock()
    ctx.prepared = model.prepare_variants(
        recipe["model.variants"],
        model.prepare_model(ctx.options.model or recipe["model.path"], ctx.workdir,
                            ctx.progress), ctx.progress)
    ctx.runtime = model.choose_runtime(
        recipe["runtime"], ctx.prepared.card,
        [r for r in model.RUNTIME_PREFERENCE if wheels.wheel_for(r, lock, ctx.wheel_target)],
        ctx.wheel_target.python)
    ctx.progress.say(f"      runtime {ctx.runtime.name} ({ctx.runtime.reason})")
    ctx.wheels = wheels.select_wheels([ctx.runtime.name, *recipe["wheels"]], lock,
                                      ctx.wheel_target)


def make_base(ctx: BuildContext) -> None:
    ctx.base.make(ctx)


def download_wheels(ctx: BuildContext) -> None:
    assert ctx.wheel_target is not None
    ctx.wheel_dir = wheels.download_wheels(ctx.wheels, ctx.wheel_target, ctx.progress)


def install_all(ctx: BuildContext) -> None:
    assert ctx.wheel_dir is not None and ctx.wheel_target is not None
    if ctx.tarball is None:
        ctx.rootfs.mkdir(parents=True)
    else:
        install.extract_base(ctx.tarball, ctx.rootfs, ctx.progress)
    ctx.base.after_install(ctx)
    install.install_runtime(ctx.rootfs)
    wheels.install_wheels(ctx.wheels, ctx.wheel_dir,
                          rootfs_tree.inside(ctx.rootfs, install.SITE_DIR), ctx.wheel_target,
                          ctx.progress)
    ctx.model_path = install.install_model(ctx.model, ctx.rootfs)
    ctx.card_path = install.MODEL_DIR / ctx.model.card_path.name


def render_overlays(ctx: BuildContext) -> None:
    recipe = ctx.recipe
    context = {"recipe": recipe.as_nested(), "target": ctx.options.target,
               "model": ctx.model.card,
               "model_path": str(ctx.model_path), "card_path": str(ctx.card_path),
               "app_config": app_config_for(recipe, ctx.model_path, ctx.card_path),
               "partuuids": ctx.disk_ids.partuuids(),
               "state_binds": overlays.state_binds(ctx.rootfs)}
    overlays.apply_overlays(recipe["overlays"], ctx.rootfs, context)
    units.check_units(ctx.rootfs, ["edgebake"], recipe["systemd.version"])
    ctx.output.configure(ctx)


def verify_model(ctx: BuildContext) -> None:
    if not ctx.base.has_rootfs:
        ctx.progress.say("      skipped: no target rootfs to run in (apply-overlay --verify "
                         "runs it in the real one)")
    elif ctx.recipe["verify.enabled"]:
        ctx.verified = verify.verify_on_target(ctx.rootfs, ctx.model_path, ctx.card_path,
                                               ctx.progress)
        folder = variants_folder(ctx.model_path)
        for variant in ctx.model.variants:  # each must also be right on the target
            verify.verify_on_target(ctx.rootfs, folder / variant.model.name,
                                    folder / variant.card_path.name, ctx.progress)
    else:
        ctx.progress.say("      skipped (verify.enabled: false)")


def plan(ctx: BuildContext) -> list[Step]:
    """The build's steps in order, with the titles its progress shows."""
    return [
        ("preflight: host tools, binfmt, disk space", check_host),
        ("model: fetch, inspect, card, golden outputs, runtime", prepare_model),
        (ctx.base.title, make_base),
        ("wheels: download pinned aarch64 wheels by hash", download_wheels),
        ("install: runtime, wheels, model, users", install_all),
        ("overlays: render templates, enable units, first-boot state", render_overlays),
        ("verify: run the model in the target rootfs (qemu-user)", verify_model),
        (ctx.output.assemble_title, ctx.output.assemble),
        (ctx.output.publish_title, ctx.output.publish),
    ]


def start(options: BuildOptions) -> BuildContext:
    """Everything checked that can be before any work, and the build's folders made."""
    vendor = variants.vendor_image(options.base_image, options.base_sha256)
    recipe = load_recipe(options.target, options.recipe_file, base_image=vendor is not None)
    if options.version:
        recipe = recipe.with_setting("version", options.version, "--version")
    check_app_config(recipe)
    out_dir, workdir, staging = BuildContext.make_dirs(options)
    ctx = BuildContext(options=options, recipe=recipe,
                       base=variants.choose_base(recipe["base"], vendor),
                       output=variants.choose_output(recipe["output"]), out_dir=out_dir,
                       workdir=workdir, staging=staging,
                       epoch=options.source_date_epoch or default_source_date_epoch(),
                       progress=Progress(1))
    ctx.progress = Progress(len(plan(ctx)), log_path=out_dir / "build.log")
    return ctx


def build_image(options: BuildOptions, step_seconds: dict[str, float] | None = None
                ) -> dict[str, Any]:
    """Build the target; `step_seconds`, when given, gets each step's time by its name."""
    ctx = start(options)
    try:
        ctx.progress.say(f"edgebake {__version__}: target {options.target}, recipe "
                         f"{ctx.recipe.sha256()[:12]}, SOURCE_DATE_EPOCH {ctx.epoch}")
        for title, run in plan(ctx):
            began = time.monotonic()
            with ctx.progress.step(title):
                run(ctx)
            if step_seconds is not None:
                name = title.split(":")[0].split(" (")[0]
                step_seconds[name] = round(time.monotonic() - began, 1)
        ctx.progress.say(ctx.output.summary(ctx))
        return ctx.manifest
    finally:
        ctx.cleanup()
