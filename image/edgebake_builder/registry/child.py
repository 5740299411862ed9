"""The mlflow toolchain's side of the registry: log a converted model as a new registered
version, and download a registered version's files. Runs as `python -m` in the mlflow
toolchain venv (MLflow and its server stack stay out of the main venv) and answers one JSON
line; an answer with "error" is the user's one line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

EXPERIMENT = "edgebake"


class RegistryInputError(Exception):
    """Something the registry says no to; the message is the user's one line."""


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


def _experiment_id(client: Any) -> str:
    found = client.get_experiment_by_name(EXPERIMENT)
    return str(found.experiment_id) if found else str(client.create_experiment(EXPERIMENT))


def register(payload: dict[str, Any]) -> dict[str, Any]:
    """A run holding the files under `model/`, with the gate's figures as metrics, and a
    new version of the registered model whose source is that folder."""
    from mlflow.exceptions import MlflowException

    client = _client(payload["uri"])
    name = payload["name"]
    run = client.create_run(_experiment_id(client), run_name=payload.get("run_name") or name,
                            tags={"edgebake.kind": "converted-model"})
    run_id = run.info.run_id
    for path in payload["files"]:
        client.log_artifact(run_id, path, "model")
    for key, value in payload.get("metrics", {}).items():
        client.log_metric(run_id, key, float(value))
    for key, value in payload.get("params", {}).items():
        client.log_param(run_id, key, str(value)[:500])
    client.set_terminated(run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    version = client.create_model_version(name, source, run_id=run_id,
                                          tags=payload.get("tags", {}))
    for alias in payload.get("aliases", []):
        client.set_registered_model_alias(name, alias, version.version)
    return {"name": name, "version": str(version.version), "run_id": run_id,
            "source": source}


def fetch(payload: dict[str, Any]) -> dict[str, Any]:
    """The registered version's files, downloaded into `out`, and where they came from."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = _client(payload["uri"])
    name, alias, number = payload["name"], payload.get("alias"), payload.get("version")
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else \
            client.get_model_version(name, number)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else f"version {number}"
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryInputError(f"the registry has no model {name!r} with {what}: "
                                     f"{_first_line(exc)}") from None
        raise
    out = Path(payload["out"])
    out.mkdir(parents=True, exist_ok=True)
    local = download_artifacts(artifact_uri=f"models:/{name}/{found.version}",
                               dst_path=str(out))
    return {"name": name, "version": str(found.version), "run_id": found.run_id or "",
            "source": found.source, "path": local}


def log_dataset(payload: dict[str, Any]) -> dict[str, Any]:
    """A run in the `edgebake` experiment holding a dataset file under `dataset/`."""
    client = _client(payload["uri"])
    run = client.create_run(_experiment_id(client), run_name=payload["name"],
                            tags={"edgebake.kind": "field-samples"})
    client.log_artifact(run.info.run_id, payload["file"], "dataset")
    for key, value in payload.get("params", {}).items():
        client.log_param(run.info.run_id, key, str(value)[:500])
    client.set_terminated(run.info.run_id)
    return {"run_id": run.info.run_id}


ACTIONS = {"register": register, "fetch": fetch, "log_dataset": log_dataset}


def main() -> None:
    action, payload = sys.argv[1], json.loads(sys.argv[2])
    try:
        answer = ACTIONS[action](payload)
    except RegistryInputError as exc:
        answer = {"error": str(exc)}
    except Exception as exc:  # the registry's own errors: one line for the user
        answer = {"error": f"registry {payload.get('uri')}: {_first_line(exc)}"}
    print(json.dumps(answer))


if __name__ == "__main__":
    main()
