"""Step: copy overlay trees onto the rootfs, rendering `.j2` files with Jinja2."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ..errors import BuildError

OVERLAYS_DIR = Path(__file__).resolve().parents[3] / "overlays"


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, default_flow_style=False).rstrip("\n")


def make_environment(overlay_root: Path) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(overlay_root)),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
    env.filters["to_yaml"] = _to_yaml
    return env


def apply_overlays(names: list[str], rootfs: Path, context: dict[str, Any],
                   overlays_dir: Path = OVERLAYS_DIR) -> list[str]:
    """Copy each overlay in order; return the target paths written (for the manifest/log)."""
    written: list[str] = []
    env = make_environment(overlays_dir)
    for name in names:
        tree = overlays_dir / name
        if not tree.is_dir():
            raise BuildError(f"recipe: overlays: no folder {tree}")
        for source in sorted(p for p in tree.rglob("*") if p.is_file() or p.is_symlink()):
            relative = source.relative_to(tree)
            if relative.name == "README.md" and len(relative.parts) == 1:
                continue
            target_rel = relative.with_suffix("") if source.suffix == ".j2" else relative
            target = rootfs / target_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()
            if source.is_symlink():
                os.symlink(os.readlink(source), target)
            elif source.suffix == ".j2":
                template_name = source.relative_to(overlays_dir).as_posix()
                try:
                    text = env.get_template(template_name).render(**context)
                except jinja2.TemplateError as exc:
                    raise BuildError(f"{source}: template error: {exc}") from None
                target.write_text(text, encoding="utf-8")
                shutil.copymode(source, target)
            else:
                shutil.copy2(source, target)
            os.chown(target, 0, 0, follow_symlinks=False)
            written.append("/" + target_rel.as_posix())
    return written
