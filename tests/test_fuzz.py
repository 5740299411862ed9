"""Hypothesis fuzzes the three loaders users feed by hand: recipes, seeds and app configs.
Any exception other than the declared error type is a failure. CI runs a few hundred cases
each; `invoke bench-fuzz` runs 10,000 or more (EDGEBAKE_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from edgebake_builder.errors import BuildError
from edgebake_builder.recipe.schema import SETTINGS
from edgebake_runtime.config import DEFAULTS, ConfigError, read_yaml_mapping, validate
from edgebake_runtime.seedcheck import SEED_KEYS, SeedError, check_seed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("EDGEBAKE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize="CI" in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _config_keys(defaults: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in defaults.items():
        keys.append(key)
        if isinstance(value, dict):
            keys.extend(_config_keys(value, f"{prefix}{key}."))
    return keys


RECIPE_KEYS = sorted({part for s in SETTINGS for part in s.path.split(".")} | {"layers"})
CONFIG_KEYS = sorted(set(_config_keys(DEFAULTS)) | {"name", "kind", "url", "path", "device"})
SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
           | st.sampled_from(["pi4", "trixie", "v4l2", "rtsp://x/y", "ed25519 " + "a" * 64,
                              "ssh-ed25519 AAAA", "/dev/video0", "../..", "+", "#", "\x00"]))


def documents(keys: list[str]) -> st.SearchStrategy[Any]:
    """YAML-shaped values whose keys are mostly ones the loader knows, so the fuzzing gets
    past the unknown-key check and into the field validators."""
    key = st.sampled_from(keys) | st.text(max_size=12)
    return st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(key, inner, max_size=6), max_leaves=25)


def yaml_text(keys: list[str]) -> st.SearchStrategy[bytes]:
    """Bytes of a file: a dumped document, or plain garbage, sometimes in UTF-16."""
    dumped = documents(keys).map(lambda d: yaml.safe_dump(d, allow_unicode=True))
    text = dumped | st.text(max_size=200)
    return st.one_of(text.map(str.encode), text.map(lambda t: t.encode("utf-16")),
                     st.binary(max_size=200))


@FUZZ
@given(data=yaml_text(RECIPE_KEYS))
def test_the_recipe_loader_only_raises_its_error(tmp_path: Path, data: bytes) -> None:
    from edgebake_builder.recipe import load_recipe

    recipe = tmp_path / "fuzz.yaml"
    recipe.write_bytes(data)
    try:
        load_recipe("pi4", recipe)
    except BuildError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip()


@FUZZ
@given(document=documents(sorted(SEED_KEYS | set(CONFIG_KEYS))))
def test_the_seed_checker_only_raises_its_error(tmp_path: Path, document: Any) -> None:
    if not isinstance(document, dict):
        document = {"app": document}
    try:
        check_seed(document, "fuzz-seed.yaml", tmp_path / "no-app.yaml")
    except SeedError as exc:
        assert "fuzz-seed.yaml" in str(exc)


@FUZZ
@given(data=yaml_text(sorted(SEED_KEYS)))
def test_seed_files_only_raise_the_declared_errors(tmp_path: Path, data: bytes) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_bytes(data)
    try:
        check_seed(read_yaml_mapping(seed), str(seed), tmp_path / "no-app.yaml")
    except (SeedError, ConfigError) as exc:
        assert str(seed) in str(exc)


@FUZZ
@given(document=documents(CONFIG_KEYS))
def test_the_app_config_validator_only_raises_its_error(document: Any) -> None:
    try:
        validate(document, "fuzz-app.yaml")
    except ConfigError as exc:
        assert "fuzz-app.yaml" in str(exc)
