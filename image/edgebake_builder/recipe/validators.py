"""One small validator per kind of recipe value: `validate()` checks, `describe()` documents."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


class Invalid(ValueError):
    """Raised by a validator; the message is what was expected."""


@dataclass(frozen=True)
class Str:
    pattern: str | None = None
    hint: str = ""

    def validate(self, value: Any) -> Any:
        if not isinstance(value, str):
            raise Invalid(self.describe())
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        return f"a string {self.hint}".strip() if self.hint else "a string"


@dataclass(frozen=True)
class Int:
    minimum: int | None = None
    maximum: int | None = None

    def validate(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(self.describe())
        if self.minimum is not None and value < self.minimum:
            raise Invalid(self.describe())
        if self.maximum is not None and value > self.maximum:
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        bounds = []
        if self.minimum is not None:
            bounds.append(f">= {self.minimum}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum}")
        return "an integer" + (" " + " and ".join(bounds) if bounds else "")


@dataclass(frozen=True)
class Bool:
    def validate(self, value: Any) -> Any:
        if not isinstance(value, bool):
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Enum:
    choices: tuple[str, ...]

    def validate(self, value: Any) -> Any:
        if value not in self.choices:
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)


@dataclass(frozen=True)
class StrList:
    """A list of strings; an item `-x` in a later layer removes `x` added by an earlier one."""

    item: Str = field(default_factory=Str)

    def validate(self, value: Any) -> Any:
        if not isinstance(value, list):
            raise Invalid(self.describe())
        for item in value:
            if not isinstance(item, str):
                raise Invalid(self.describe())
            self.item.validate(item[1:] if item.startswith("-") else item)
        return list(value)

    def describe(self) -> str:
        inner = self.item.describe()
        return f"a list of {inner[2:] if inner.startswith('a ') else inner}s"


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
