"""The model card: what the runtime needs to feed and decode a model, written at build time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

TASKS = ("classification", "ssd", "blazeface", "yolo", "raw")
CARD_FORMAT = 1


class CardError(Exception):
    """A card that is missing, unreadable or inconsistent; the message names the field."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float
    zero_point: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        quant = data.get("quantization") or {}
        return cls(name=str(data["name"]), shape=tuple(int(x) for x in data["shape"]),
                   dtype=str(data["dtype"]), scale=float(quant.get("scale", 0.0)),
                   zero_point=int(quant.get("zero_point", 0)))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "quantization": {"scale": self.scale, "zero_point": self.zero_point}}


@dataclass(frozen=True)
class Card:
    data: dict[str, Any]
    path: Path

    @property
    def task(self) -> str:
        return str(self.data["task"])

    @property
    def sha256(self) -> str:
        return str(self.data["sha256"])

    @cached_property  # read per frame by the decoders
    def inputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.data["inputs"]]

    @cached_property  # read per frame by the decoders
    def outputs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(t) for t in self.data["outputs"]]

    @cached_property  # read per frame by the decoders
    def labels(self) -> list[str]:
        return [str(x) for x in self.data.get("labels") or []]

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.data.get("preprocessing") or {})

    @property
    def postprocessing(self) -> dict[str, Any]:
        return dict(self.data.get("postprocessing") or {})

    @property
    def version(self) -> str:
        return str(self.data.get("version") or self.data.get("name") or "unknown")


def load_card(path: Path) -> Card:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"{path}: model card not found") from None
    except (OSError, ValueError) as exc:
        raise CardError(f"{path}: not a readable JSON model card: {exc}") from None
    if not isinstance(data, dict):
        raise CardError(f"{path}: expected a JSON object")
    for key in ("task", "sha256", "inputs", "outputs"):
        if key not in data:
            raise CardError(f"{path}: {key}: missing")
    if data["task"] not in TASKS:
        raise CardError(f"{path}: task: expected one of {', '.join(TASKS)}, "
                        f"found {data['task']!r}")
    if not isinstance(data["inputs"], list) or len(data["inputs"]) != 1:
        raise CardError(f"{path}: inputs: expected exactly one input tensor")
    return Card(data=data, path=path)


def card_path_for(model: Path) -> Path:
    """`m.tflite` -> `m.card.json`, the convention shared by converter, builder and runtime."""
    return model.with_name(model.stem + ".card.json")
