"""Comma-separated numbers on the command line (--mean 0.485,0.456,0.406)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..errors import BuildError

Number = TypeVar("Number", int, float)


def number_list(option: str, text: str, kind: Callable[[str], Number]
                ) -> tuple[Number, ...] | None:
    """None for an empty option; a clear line for anything that is not a list of numbers."""
    if not text.strip():
        return None
    try:
        return tuple(kind(part) for part in text.split(","))
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise BuildError(f"{option}: expected comma-separated {what}, like "
                         f"{'1,3,320,320' if kind is int else '0.485,0.456,0.406'}; "
                         f"found {text!r}") from None
