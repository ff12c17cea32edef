"""Exceptions that tell the user what was wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LeukotreeError(ValueError):
    """Base class of every error raised for bad user input.

    The CLI prints the message of these errors without a traceback; anything else
    is a bug and keeps its traceback.
    """


class TaxonomyError(LeukotreeError):
    """A taxonomy definition breaks a rule (duplicate name, cycle, empty tree...)."""


class UnknownLabelError(LeukotreeError):
    """A label is not a node of the taxonomy."""


class DataError(LeukotreeError):
    """A data folder, manifest or image cannot be used as given."""


class UnreadableImagesError(DataError):
    """Several images cannot be decoded; ``errors`` holds one message per image."""

    def __init__(self, message: str, errors: list[str]) -> None:
        super().__init__(message)
        self.errors = errors


class MissingDependencyError(LeukotreeError):
    """An optional dependency is not installed; the message gives the install command."""


class ImageReadError(DataError):
    """One image file cannot be decoded; the message names the file."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = display_path(path)
        self.reason = reason
        super().__init__(f"Cannot read image '{self.path}': {reason}")


def display_path(path: object) -> str:
    """``path`` as printable text: bytes of a file name that are not UTF-8 are shown as
    ``\\xNN`` escapes instead of breaking the output."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def did_you_mean(value: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choices, or ``""``.

    A case-insensitive exact match is always proposed first.
    """
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    hits: list[str] = []
    if value.lower() in lowered:
        hits.append(lowered[value.lower()])
    for cand in difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.6):
        if lowered[cand] not in hits:
            hits.append(lowered[cand])
    if not hits:
        return ""
    quoted = " or ".join(f"'{h}'" for h in hits[:n])
    return f" Did you mean {quoted}?"
