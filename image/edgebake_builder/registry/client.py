"""The model registry (MLflow) from the builder's side: register a converted model as a new
version, and fetch a registered version to bundle it.

MLflow runs in a toolchain venv of its own (`registry/child.py`); this side checks what the
user typed and that the registry answers before starting it, so each of those mistakes is one
line and no unit is touched."""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cache import sha256_file
from ..convert.toolchain import call
from ..errors import BuildError

MODEL_REF = re.compile(r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"
                       r"(?:@(?P<alias>[A-Za-z0-9_-]{1,64})|/(?P<version>[0-9]{1,9}))")
REGISTRY_URI = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(?::[0-9]+)?(/[^\s]*)?")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# What convert-model takes, by suffix (a SavedModel is a folder with saved_model.pb).
SOURCE_SUFFIXES = (".keras", ".h5", ".pt2", ".onnx")


@dataclass(frozen=True)
class ModelRef:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` on one registry."""

    uri: str
    name: str
    alias: str = ""
    version: str = ""


def parse_ref(text: str, uri: str) -> ModelRef:
    match = MODEL_REF.fullmatch(text)
    if match is None:
        raise BuildError(f"--model {text!r}: expected models:/<name>@<alias> or "
                         "models:/<name>/<version>")
    return ModelRef(checked_uri(uri), match["name"], match["alias"] or "",
                    match["version"] or "")


def checked_uri(uri: str) -> str:
    if not REGISTRY_URI.fullmatch(uri or ""):
        raise BuildError(f"--registry {uri!r}: expected the MLflow server's http(s) URL, "
                         "like http://127.0.0.1:5000")
    return uri.rstrip("/")


def check_answers(uri: str, timeout: float = 10.0) -> None:
    """BuildError in one line unless the MLflow server answers its /health."""
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as reply:
            if reply.status == 200:
                return
            reason = f"HTTP {reply.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise BuildError(f"registry {uri} does not answer ({reason}); is `invoke registry-serve` "
                     "or your MLflow server running?")


def register(uri: str, name: str, files: list[Path], metrics: dict[str, float],
             params: dict[str, str], tags: dict[str, str], aliases: list[str],
             say: Any = print) -> dict[str, str]:
    """A new version of `name` whose files are `files`; returns name, version, run_id."""
    uri = checked_uri(uri)
    if not NAME.fullmatch(name):
        raise BuildError(f"--name {name!r}: expected letters, digits, '.', '_' or '-'")
    check_answers(uri)
    return call("mlflow", "edgebake_builder.registry.child", "register",
                {"uri": uri, "name": name, "files": [str(f) for f in files],
                 "metrics": metrics, "params": params, "tags": tags, "aliases": aliases},
                say)


def log_dataset(uri: str, name: str, file: Path, params: dict[str, str],
                say: Any = print) -> str:
    """The dataset file as an artifact of a new run; returns the run id."""
    uri = checked_uri(uri)
    check_answers(uri)
    answer = call("mlflow", "edgebake_builder.registry.child", "log_dataset",
                  {"uri": uri, "name": name, "file": str(file), "params": params}, say)
    return str(answer["run_id"])


@dataclass(frozen=True)
class FetchedModel:
    """A registered version's model file (a .tflite, or a source convert-model takes) and
    where it came from, as bundles and cards record it."""

    path: Path
    origin: dict[str, str]

    @property
    def is_tflite(self) -> bool:
        return self.path.suffix == ".tflite"


def fetch(ref: ModelRef, out: Path, say: Any = print) -> FetchedModel:
    check_answers(ref.uri)
    shutil.rmtree(out, ignore_errors=True)
    answer = call("mlflow", "edgebake_builder.registry.child", "fetch",
                  {"uri": ref.uri, "name": ref.name, "alias": ref.alias,
                   "version": ref.version, "out": str(out)}, say)
    where = f"{ref.name} version {answer['version']}"
    model = pick_model(Path(answer["path"]), where)
    digest = sha256_file(model / "saved_model.pb" if model.is_dir() else model)
    return FetchedModel(model, {"uri": ref.uri, "name": ref.name,
                                "version": str(answer["version"]),
                                "run_id": str(answer.get("run_id") or ""),
                                "source_sha256": digest})


def pick_model(folder: Path, where: str) -> Path:
    """The one model among a version's files: a .tflite first, else one source."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    tflite = [p for p in files if p.suffix == ".tflite"]
    sources = [p for p in files if p.suffix in SOURCE_SUFFIXES] + \
        [p.parent for p in files if p.name == "saved_model.pb"]
    for found in (tflite, sources):
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(str(p.relative_to(folder)) for p in found[:4])
            raise BuildError(f"registered {where} holds more than one model ({names}); "
                             "register one model per version")
    names = ", ".join(str(p.relative_to(folder)) for p in files[:6]) or "no files"
    raise BuildError(f"registered {where} holds neither a .tflite nor a model convert-model "
                     f"takes ({', '.join(SOURCE_SUFFIXES)}, a SavedModel); found {names}")
