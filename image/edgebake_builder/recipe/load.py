"""Loads a target with its layers and an optional user recipe, validates and merges them."""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgebake_runtime.merge import deep_merge
from edgebake_runtime.yamlfile import TextFileError, read_yaml

from ..errors import BuildError, RecipeError
from .schema import BY_PATH, GROUPS, defaults
from .validators import Invalid, Mapping, StrList

RECIPES_DIR = Path(__file__).resolve().parents[3] / "recipes"


@dataclass
class Recipe:
    """A resolved recipe: every setting by dotted path, plus where it came from."""

    target: str
    values: dict[str, Any]
    sources: list[str] = field(default_factory=list)
    base_image: bool = False  # built on a vendor image (--base), not bootstrapped

    def __getitem__(self, path: str) -> Any:
        return self.values[path]

    def sha256(self) -> str:
        """Stable content hash of the resolved settings (file locations excluded)."""
        blob = json.dumps(self.values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def with_setting(self, path: str, value: Any, source: str) -> Recipe:
        """This recipe with one setting replaced (a command-line option), checked like a
        recipe file's."""
        try:
            checked = BY_PATH[path].validator.validate(value)
        except Invalid as exc:
            raise RecipeError(source, path, str(exc), value) from None
        return Recipe(self.target, {**self.values, path: checked}, self.sources,
                      self.base_image)

    def base_values(self) -> dict[str, Any]:
        """Only the settings that determine the bootstrapped base rootfs."""
        return {p: v for p, v in self.values.items() if BY_PATH[p].base}

    def as_nested(self) -> dict[str, Any]:
        nested: dict[str, Any] = {}
        for path, value in self.values.items():
            node = nested
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return nested


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BuildError(f"{path}: recipe file not found")
    try:
        data = read_yaml(path)
    except TextFileError as exc:
        raise BuildError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), "(top level)", "a mapping of settings",
                          type(data).__name__)
    return data


def _flatten(source: str, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn nested YAML into dotted paths, validating each value against its setting."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str):
            raise RecipeError(source, path, "string keys", key)
        if path in BY_PATH:
            setting = BY_PATH[path]
            try:
                flat[path] = setting.validator.validate(value)
            except Invalid as exc:
                raise RecipeError(source, path, str(exc), value) from None
        elif path in GROUPS:
            if not isinstance(value, dict):
                raise RecipeError(source, path, "a mapping", value)
            flat.update(_flatten(source, value, path + "."))
        else:
            known = sorted(BY_PATH) + sorted(GROUPS)
            close = difflib.get_close_matches(path, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            shown = path if path.isprintable() and path.strip() == path and path else repr(path)
            raise BuildError(f"{source}: {shown}: unknown setting{hint} "
                             f"(see `invoke recipe-schema`)")
    return flat


def _merge_list(current: list[str], update: list[str]) -> list[str]:
    merged = list(current)
    for item in update:
        if item.startswith("-"):
            merged = [x for x in merged if x != item[1:]]
        elif item not in merged:
            merged.append(item)
    return merged


def _apply(values: dict[str, Any], flat: dict[str, Any]) -> None:
    for path, value in flat.items():
        validator = BY_PATH[path].validator
        if isinstance(validator, StrList):
            values[path] = _merge_list(values[path], value)
        elif isinstance(validator, Mapping):
            values[path] = deep_merge(values[path], value)
        else:
            values[path] = value


def _split_layers(source: str, data: dict[str, Any], key: str = "layers") -> list[str]:
    layers = data.pop(key, [])
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        raise RecipeError(source, key, "a list of layer names", layers)
    return layers


def _apply_file(values: dict[str, Any], path: Path, sources: list[str],
                recipes_dir: Path, allow_layers: bool, base_image: bool = False) -> None:
    data = _read_yaml(path)
    layers = _split_layers(str(path), data) if allow_layers else []
    if allow_layers:
        # a target built on a vendor image (--base) has its own layer list
        image_layers = _split_layers(str(path), data, "base_image_layers")
        if base_image:
            layers = image_layers
    for layer in layers:
        layer_path = recipes_dir / "layers" / f"{layer}.yaml"
        if not layer_path.is_file():
            available = sorted(p.stem for p in (recipes_dir / "layers").glob("*.yaml"))
            raise RecipeError(str(path), "layers", "one of " + ", ".join(available), layer)
        _apply_file(values, layer_path, sources, recipes_dir, allow_layers=False)
    flat = _flatten(str(path), data)
    model = flat.get("model.path")
    if model:
        flat["model.path"] = str((path.parent / model).resolve())
    variants = flat.get("model.variants")
    if isinstance(variants, list):
        flat["model.variants"] = [str((path.parent / str(v)).resolve()) for v in variants]
    _apply(values, flat)
    sources.append(str(path))


def available_targets(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    return sorted(p.stem for p in (recipes_dir / "targets").glob("*.yaml"))


def load_recipe(target: str, user_recipe: Path | None = None,
                recipes_dir: Path = RECIPES_DIR, base_image: bool = False) -> Recipe:
    """Resolve `target` (a name under recipes/targets) plus an optional user recipe on top.

    With `base_image`, the target's `base_image_layers` are used instead of its `layers`: the
    build starts from a vendor image (`--base`) rather than from Debian packages."""
    target_path = recipes_dir / "targets" / f"{target}.yaml"
    if not target_path.is_file():
        raise BuildError(f"unknown target {target!r}; available: "
                         + ", ".join(available_targets(recipes_dir)))
    declared = _read_yaml(target_path)
    if base_image and "base_image_layers" not in declared:
        raise BuildError(f"target {target}: cannot be built on a vendor image (--base); it "
                         f"has no base_image_layers in {target_path}")
    if not base_image and "layers" not in declared:
        raise BuildError(f"target {target}: needs a vendor image: --base raspios-lite.img[.xz] "
                         "--base-sha256 H (it has no layers of its own in "
                         f"{target_path})")
    values = defaults()
    sources: list[str] = []
    _apply_file(values, target_path, sources, recipes_dir, allow_layers=True,
                base_image=base_image)
    if user_recipe is not None:
        _apply_file(values, user_recipe, sources, recipes_dir, allow_layers=True)
    return Recipe(target=target, values=values, sources=sources, base_image=base_image)
