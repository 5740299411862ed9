"""Between the registry and the bundle: a `models:/` reference becomes a local .tflite (a
registered source model goes through convert-model and its gate first), and a converted
model becomes a registered version with its card and figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BuildError
from ..progress import Progress
from ..steps.model import PreparedModel, prepare_model
from .client import fetch, parse_ref, register


@dataclass(frozen=True)
class ModelSource:
    """What `make-bundle --model` names, ready for prepare_model."""

    path: str  # "" for the project's default model
    registry: dict[str, str] | None  # the registered version it came from


def resolve(model: str, registry_uri: str, workdir: Path, progress: Progress) -> ModelSource:
    """A file path stays as it is; `models:/…` is fetched from the registry (and converted
    when it is a source model)."""
    if not model.startswith("models:/"):
        if registry_uri:
            raise BuildError("--registry: goes with --model models:/<name>@<alias> or "
                             "models:/<name>/<version>")
        return ModelSource(model, None)
    if not registry_uri:
        raise BuildError(f"--model {model}: needs --registry with the MLflow server's URL")
    ref = parse_ref(model, registry_uri)
    fetched = fetch(ref, workdir / "registered", progress.say)
    progress.say(f"      {model}: version {fetched.origin['version']} "
                 f"(run {fetched.origin['run_id'][:12]}), {fetched.path.name}")
    if fetched.is_tflite:
        return ModelSource(str(fetched.path), fetched.origin)
    from ..convert.converter import ConvertOptions, convert_model

    converted = workdir / "converted" / f"{ref.name}.tflite"
    converted.parent.mkdir(parents=True, exist_ok=True)
    convert_model(ConvertOptions(model=fetched.path, output=converted))
    return ModelSource(str(converted), fetched.origin)


def register_converted(model: Path, uri: str, name: str, aliases: list[str], workdir: Path,
                       progress: Progress) -> dict[str, str]:
    """The model, its card and golden outputs as a new version of `name`, with the card's
    figures (size, host latency, the gate's accuracy) as the run's metrics."""
    from edgebake_runtime.update import measure_latency_ms

    if model.suffix != ".tflite":
        raise BuildError(f"--model {model}: expected a .tflite (convert-model writes one with "
                         "its card)")
    prepared = prepare_model(str(model), workdir, progress)
    answer = register(uri, name, [prepared.model, prepared.card_path, prepared.golden_path],
                      _metrics(prepared, measure_latency_ms(prepared.model,
                                                            prepared.card_path)),
                      _params(prepared), {"edgebake.sha256": str(prepared.card["sha256"]),
                                          "edgebake.task": str(prepared.card["task"])},
                      aliases, progress.say)
    return answer


def _metrics(prepared: PreparedModel, latency_ms: float) -> dict[str, float]:
    card = prepared.card
    figures = {"size_bytes": float(card["size_bytes"]), "host_latency_ms": latency_ms}
    accuracy = card.get("accuracy") or {}
    for key, value in accuracy.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            figures[f"gate_{key}"] = float(value)
    return figures


def _params(prepared: PreparedModel) -> dict[str, str]:
    card = prepared.card
    source = card.get("source") or {}
    return {"task": str(card["task"]), "sha256": str(card["sha256"]),
            "file": prepared.model.name, "source_format": str(source.get("format", "tflite")),
            "converter": str(source.get("converter", "")),
            "quantization": str(card.get("quantization", "none"))}
