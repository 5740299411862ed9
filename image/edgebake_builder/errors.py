"""One exception type for problems the user can fix, so callers print one line, not a traceback."""

from __future__ import annotations


class BuildError(Exception):
    """A problem with the build's inputs or host; the message says what to do about it."""


class RecipeError(BuildError):
    """A recipe file that does not match the schema."""

    def __init__(self, source: str, field: str, expected: str, found: object) -> None:
        self.source = source
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(f"{source}: {field}: expected {expected}, found {found!r}")
