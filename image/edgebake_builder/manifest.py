"""manifest.json: what a build made, from what, and how long it took."""

from __future__ import annotations

import os
from typing import Any

from . import __version__
from .context import REPO_ROOT, BuildContext
from .sizes import size_table


def build(ctx: BuildContext, output_fields: dict[str, Any]) -> dict[str, Any]:
    """The manifest of a finished build: recipe, wheels and model, then what the output
    adds (`output_fields`), then the rootfs size, where its bytes go, and the build time."""
    recipe, prepared, runtime = ctx.recipe, ctx.model, ctx.runtime
    assert runtime is not None
    verified = ctx.verified
    return {
        "edgebake_version": __version__, "target": ctx.options.target, "name": recipe["name"],
        "recipe_sha256": recipe.sha256(),
        "recipe_sources": [os.path.relpath(s, REPO_ROOT) if s.startswith(str(REPO_ROOT))
                           else s for s in recipe.sources],
        "recipe": recipe.as_nested(),
        "python_wheels": [{"name": w.name, "version": w.version, "sha256": w.sha256}
                          for w in ctx.wheels],
        "model": {"path": str(ctx.model_path), "card_path": str(ctx.card_path),
                  "sha256": prepared.card["sha256"], "card": prepared.card,
                  "variants": [{"file": v.model.name, "sha256": v.card["sha256"],
                                "quantization": v.card.get("quantization"),
                                "accuracy": v.card.get("accuracy")} for v in prepared.variants],
                  "verified_on_target": bool(verified.get("ok")),
                  "target_runtime": {k: verified.get(k) for k in
                                     ("runtime", "runtime_version", "max_deviation")},
                  "runtime": {"name": runtime.name, "reason": runtime.reason,
                              "version": next(w.version for w in ctx.wheels
                                              if w.name == runtime.name)}},
        "source_date_epoch": ctx.epoch,
        **output_fields,
        "rootfs_bytes": ctx.rootfs_bytes,
        "sizes": size_table(ctx.rootfs),
        "build_seconds": ctx.seconds(),
    }
