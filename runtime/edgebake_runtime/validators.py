"""One small validator per kind of setting: `validate()` checks, `describe()` documents.

Shared by the recipe schema (on the host) and the unit's app config, so a value is judged and
described the same way wherever it is written.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
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
        if self.minimum is not None and self.maximum is not None:
            return f"an integer between {self.minimum} and {self.maximum}"
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
class Float:
    minimum: float
    maximum: float

    def validate(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not self.minimum <= value <= self.maximum:
            raise Invalid(self.describe())
        return float(value)

    def describe(self) -> str:
        return f"a number between {float(self.minimum)!r} and {float(self.maximum)!r}"


@dataclass(frozen=True)
class Band:
    """[low, high]: two numbers from 0 to 1, the first not above the second."""

    def validate(self, value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise Invalid(self.describe())
        low, high = (Float(0.0, 1.0).validate(v) for v in value)
        if low > high:
            raise Invalid(self.describe())
        return (low, high)

    def describe(self) -> str:
        return "[low, high]: two scores from 0 to 1, low not above high"


@dataclass(frozen=True)
class Optional:
    """A value, or null for "not set"."""

    inner: Float

    def validate(self, value: Any) -> Any:
        return None if value is None else self.inner.validate(value)

    def describe(self) -> str:
        return f"{self.inner.describe()}, or null"


@dataclass(frozen=True)
class Url:
    """A URL whose scheme is one of `schemes` ("" allowed where `optional`)."""

    schemes: tuple[str, ...]
    optional: bool = False

    def validate(self, value: Any) -> Any:
        if self.optional and value == "":
            return value
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9+.-]+://[^\s\x00-\x1f\x7f]+",
                                                          value):
            raise Invalid(self.describe())
        if value.split("://", 1)[0] not in self.schemes:
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        schemes = " or ".join(f"{s}://" for s in self.schemes)
        return f"a {schemes} URL without spaces" + (", or empty" if self.optional else "")


@dataclass(frozen=True)
class Origins:
    """A list of URL origins (scheme://host[:port], nothing after it) a download may use."""

    schemes: tuple[str, ...] = ("http", "https")

    def validate(self, value: Any) -> Any:
        if not isinstance(value, list) or not all(
                isinstance(v, str) and re.fullmatch(r"([a-z]+)://[A-Za-z0-9.:\[\]-]+", v)
                and v.split("://")[0] in self.schemes for v in value):
            raise Invalid(self.describe())
        return tuple(value)

    def describe(self) -> str:
        return "a list of origins like https://updates.example.com:8443 (no path)"


@dataclass(frozen=True)
class Address:
    """An IP address to listen on (a host name could resolve to one the unit does not have)."""

    def validate(self, value: Any) -> Any:
        try:
            ipaddress.ip_address(value if isinstance(value, str) else "")
        except ValueError:
            raise Invalid(self.describe()) from None
        return value

    def describe(self) -> str:
        return "an IP address to listen on, like 0.0.0.0, 127.0.0.1 or ::"


@dataclass(frozen=True)
class Network:
    """One network or address, like 10.0.0.0/8 or 192.168.1.20."""

    def validate(self, value: Any) -> Any:
        try:
            ipaddress.ip_network(value if isinstance(value, str) else "", strict=False)
        except ValueError:
            raise Invalid(f"{self.describe()} ({value!r} is not one)") from None
        return value

    def describe(self) -> str:
        return "a network like 10.0.0.0/8 or an address"


class Networks:
    """A list of client networks, like 10.0.0.0/8."""

    def validate(self, value: Any) -> Any:
        if not isinstance(value, list):
            raise Invalid(self.describe())
        for item in value:
            try:
                Network().validate(item)
            except Invalid:
                raise Invalid(f"{self.describe()} ({item!r} is not one)") from None
        return tuple(value)

    def describe(self) -> str:
        return "a list of client networks like 10.0.0.0/8 or addresses"


@dataclass(frozen=True)
class WritablePath:
    """An absolute path under one of the folders the service may write to (its unit has
    ProtectSystem=strict: /data, and its private /tmp)."""

    roots: tuple[str, ...] = ("/data", "/tmp")

    def validate(self, value: Any) -> Any:
        if not isinstance(value, str) or not value.startswith("/") or "\x00" in value \
                or "/../" in f"{value}/" or not any(
                    value == root or value.startswith(root + "/") for root in self.roots):
            raise Invalid(self.describe())
        return value

    def describe(self) -> str:
        return "an absolute path under " + " or ".join(self.roots) + \
            " (where the service may write)"


Validator = Str | Int | Bool | Enum | Float | Optional | Url | Origins | Address | Networks | \
    WritablePath | Band
