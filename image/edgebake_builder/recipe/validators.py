"""The validators only recipes need: lists that layers add to and take from, and free-form
mappings; the rest are the runtime's (`edgebake_runtime.validators`), shared with the unit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgebake_runtime.validators import Bool, Enum, Int, Invalid, Network, Str

__all__ = ["Bool", "Enum", "Int", "Invalid", "Mapping", "Network", "Str", "StrList",
           "Validator"]


@dataclass(frozen=True)
class StrList:
    """A list of strings; an item `-x` in a later layer removes `x` added by an earlier one."""

    item: Str | Network = field(default_factory=Str)

    def validate(self, value: Any) -> Any:
        if not isinstance(value, list):
            raise Invalid(self.describe())
        for item in value:
            if not isinstance(item, str):
                raise Invalid(self.describe())
            self.item.validate(item[1:] if item.startswith("-") else item)
        return list(value)

    def describe(self) -> str:
        return f"a list of items, each {self.item.describe()}"


@dataclass(frozen=True)
class Mapping:
    """A free-form mapping, deep-merged across layers (its contents are checked by its consumer)."""

    def validate(self, value: Any) -> Any:
        if not isinstance(value, dict):
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        return "a mapping"


Validator = Str | Int | Bool | Enum | StrList | Mapping
