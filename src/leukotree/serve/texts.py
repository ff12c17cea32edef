"""The rules for text that clients send to ``leukotree serve``, and for text it sends out.

- An id or name (patient, reviewer, label, model) is one line of at most
  :data:`MAX_ID` characters with no control, format or separator character: no NUL,
  tab or newline, no U+2028/U+2029, no bidi override (U+202E) or zero-width character,
  which would make one id look like another in pages and exported files.
- A note (an amendment's reason) may span lines but is at most :data:`MAX_NOTE`
  characters and holds no other control or format character.
- A file name the client chose is shown, never refused: the characters above are
  replaced by ``\\uXXXX`` escapes before it is stored.
- A CSV cell that a spreadsheet would read as a formula (its first character one of
  ``= + - @``, tab or carriage return) is prefixed with ``'`` (the OWASP rule).
"""

from __future__ import annotations

import unicodedata

from leukotree.errors import LeukotreeError

#: Longest id or name, in characters.
MAX_ID = 200
#: Longest note (an amendment's reason), in characters.
MAX_NOTE = 2000
#: Longest file name kept for display, in characters.
MAX_NAME = 500
#: Unicode categories refused in ids: control, format (bidi, zero-width), line and
#: paragraph separators, surrogates, private use, unassigned.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
#: First characters that make a spreadsheet evaluate a cell.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _unsafe(ch: str) -> bool:
    return unicodedata.category(ch) in UNSAFE_CATEGORIES


def check_id(value: object, what: str, *, required: bool = True) -> str:
    """``value`` stripped, if it is a safe one-line id; else a :class:`LeukotreeError` that
    names ``what``, the rule and what was found."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise LeukotreeError(f"The {what} must be text, not {type(value).__name__}.")
    text = value.strip()
    if required and not text:
        raise LeukotreeError(f"The {what} is empty; give it.")
    if len(text) > MAX_ID:
        raise LeukotreeError(f"The {what} has {len(text):,} characters; at most {MAX_ID} "
                             "are allowed.")
    bad = sorted({ch for ch in text if _unsafe(ch)})
    if bad:
        found = ", ".join(f"U+{ord(ch):04X}" for ch in bad)
        raise LeukotreeError(f"The {what} holds control or invisible characters ({found}); "
                             "use one line of visible characters.")
    return text


def check_note(value: object, what: str) -> str:
    """A free-text note: lines allowed, at most :data:`MAX_NOTE` characters, no other
    control or format character."""
    if not isinstance(value, str):
        raise LeukotreeError(f"The {what} must be text, not {type(value).__name__}.")
    text = value.strip()
    if not text:
        raise LeukotreeError(f"The {what} is empty; say why.")
    if len(text) > MAX_NOTE:
        raise LeukotreeError(f"The {what} has {len(text):,} characters; at most {MAX_NOTE} "
                             "are allowed.")
    bad = sorted({ch for ch in text if _unsafe(ch) and ch != "\n"})
    if bad:
        found = ", ".join(f"U+{ord(ch):04X}" for ch in bad)
        raise LeukotreeError(f"The {what} holds control or invisible characters ({found}).")
    return text


def shown_name(name: str) -> str:
    """A client's file name made safe to show: unsafe characters as ``\\uXXXX``, at most
    :data:`MAX_NAME` characters (a longer one ends in ``...``)."""
    text = "".join(f"\\u{ord(ch):04x}" if _unsafe(ch) else ch for ch in name)
    return text if len(text) <= MAX_NAME else text[:MAX_NAME - 3] + "..."


def csv_cell(value: object) -> str:
    """``value`` as a CSV cell no spreadsheet evaluates: ``'`` before a leading
    ``= + - @``, tab or carriage return."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(FORMULA_START) else text
