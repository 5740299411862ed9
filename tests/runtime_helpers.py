"""Helpers for runtime tests: configs, a replay folder, and a threaded Service runner."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from edgebake_runtime.config import AppConfig, validate
from edgebake_runtime.service import Service
from PIL import Image

ASTRONAUT_BOX = [0.346, 0.157, 0.531, 0.342]  # the face in scikit-image's astronaut.png


def astronaut_path() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / "astronaut.png"


def china_image() -> np.ndarray[Any, Any]:
    from sklearn.datasets import load_sample_image

    return np.asarray(load_sample_image("china.jpg"))


def replay_folder(tmp: Path, corrupt: int = 0) -> Path:
    folder = tmp / "replay"
    folder.mkdir(exist_ok=True)
    shutil.copy(astronaut_path(), folder / "a_astronaut.png")
    Image.fromarray(china_image()).save(folder / "b_china.jpg")
    for i in range(corrupt):
        (folder / f"c_corrupt{i}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    return folder


def make_config(tmp: Path, model: Path, sources: list[dict[str, Any]],
                **sections: dict[str, Any]) -> AppConfig:
    data: dict[str, Any] = {
        "model": {"path": str(model), "card": ""},
        "sources": sources,
        "journal": {"dir": str(tmp / "results"), "fsync_interval_sec": 0.2},
        "http": {"enabled": True, "bind": "127.0.0.1", "port": 0},
        "inference": {"num_threads": 1},
        "update": {"dir": str(tmp / "models")},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return validate(data, "test config")


def write_config(tmp: Path, config: AppConfig) -> Path:
    import yaml

    path = tmp / "app.yaml"
    path.write_text(yaml.safe_dump(config.raw))
    return path


class RunningApp:
    """Runs Service.run() in a thread; stops it cleanly on exit."""

    def __init__(self, app: Service) -> None:
        self.app = app
        self.thread = threading.Thread(target=app.run, daemon=True)

    def __enter__(self) -> RunningApp:
        self.app.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.app.request_stop()
        self.thread.join(10)
        self.app.stop()

    def get(self, path: str) -> tuple[int, bytes]:
        assert self.app.http is not None
        url = f"http://127.0.0.1:{self.app.http.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def health(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/health")[1]))


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
