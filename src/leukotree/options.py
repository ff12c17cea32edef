"""Options declared once: a dataclass field's metadata (help, choices, bounds, flag) drives
both the command line and validation, so the two cannot drift apart (as scikit-learn's
``_parameter_constraints`` do).

:func:`option` declares a field; :func:`check_field` converts a value to the field's type
and checks it against its rule; :func:`add_field_arguments` adds one flag per field to an
argparse parser, whose ``type`` applies the same check. Training options
(:class:`~leukotree.engine.config.TrainConfig`) and inference options
(:class:`~leukotree.inference.options.InferenceOptions`) are both declared this way.
This module imports neither torch nor the rest of the package.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, Field, field, fields
from typing import Any

from leukotree.errors import LeukotreeError, did_you_mean

#: Choices given as a tuple, or as a function returning one (read when first needed, so
#: that declaring an option imports nothing heavy).
Choices = tuple[str, ...] | Callable[[], Iterable[str]] | None


def option(default: Any = None, help: str = "", *, choices: Choices = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, flag: str | None = None, cli: bool = True,
           factory: Callable[[], Any] | None = None, metavar: str | None = None) -> Any:
    """A dataclass field with what the command line and validation need.

    ``low``/``high`` bound numbers (``*_open``: the bound itself is excluded);
    ``flag`` overrides the flag name (``--foo-bar`` for ``foo_bar``); ``cli=False``
    keeps an option to config files; ``metavar`` names the value in ``--help``.
    """
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "high_open": high_open, "flag": flag, "cli": cli, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def choices_of(f: Field) -> tuple[str, ...] | None:
    """The field's choices (None: any value of its type)."""
    choices = f.metadata["choices"]
    return tuple(choices()) if callable(choices) else choices


def rule(f: Field) -> str:
    """The rule of a numeric field in words: ``in (0, 1]``, ``in [1, inf]``."""
    m = f.metadata
    if m["low"] is None and m["high"] is None:
        return ""
    low = "-inf" if m["low"] is None else f"{m['low']:g}"
    high = "inf" if m["high"] is None else f"{m['high']:g}"
    return (f"in {'(' if m['low_open'] else '['}{low}, {high}"
            f"{')' if m['high_open'] else ']'}")


def kind(f: Field) -> str:
    """The base type of a field: ``str``, ``int``, ``float``, ``bool``, ``list[str]`` or
    ``list[float]`` (``| None`` removed)."""
    spelled = f.type.__name__ if isinstance(f.type, type) else str(f.type)
    return spelled.replace(" | None", "")


def default_of(f: Field) -> Any:
    """The field's default value (its factory's value for lists)."""
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def check_field(f: Field, value: Any) -> Any:
    """``value`` converted to field ``f``'s type and checked against its rule; a
    :class:`~leukotree.errors.LeukotreeError` names the parameter, the rule and the value."""
    name, what, m = f.name, kind(f), f.metadata
    if value is None:
        if "None" in str(f.type):
            return None
        raise LeukotreeError(f"The '{name}' parameter needs a value ({what}); got nothing.")
    value = _convert(name, what, value)
    choices = choices_of(f)
    if choices and value not in choices:
        raise LeukotreeError(f"The '{name}' parameter must be one of {', '.join(choices)};"
                             f" got {value!r}." + did_you_mean(str(value), choices))
    if what in {"int", "float"}:
        low, high = m["low"], m["high"]
        bad = (not math.isfinite(value)
               or (low is not None and (value < low or (m["low_open"] and value == low)))
               or (high is not None and (value > high or (m["high_open"] and value == high))))
        if bad:
            raise LeukotreeError(f"The '{name}' parameter must be {rule(f)}; got {value!r}.")
    return value


def check_fields(obj: Any) -> None:
    """Check (and convert in place) every field of the dataclass instance ``obj``."""
    for f in fields(obj):
        setattr(obj, f.name, check_field(f, getattr(obj, f.name)))


def _convert(name: str, what: str, value: Any) -> Any:
    try:
        if what == "bool":
            if isinstance(value, bool):
                return value
            raise TypeError
        if what == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if what == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if what.startswith("list"):
            items = value.split(",") if isinstance(value, str) else list(value)
            conv = float if "float" in what else str
            return [conv(v.strip() if isinstance(v, str) else v) for v in items]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `patient_threshold: 0.5` or a leaf named 1 as numbers
        if not isinstance(value, str):
            raise TypeError
        return value
    except (TypeError, ValueError):
        raise LeukotreeError(f"The '{name}' parameter must be {what.replace('list', 'a list')}"
                             f"; got {value!r} ({type(value).__name__}).") from None


def arg_type(f: Field) -> Callable[[str], Any]:
    """An argparse ``type`` that converts and checks with the field's own rule."""

    def parse(text: str) -> Any:
        what = kind(f)
        value: Any = text
        if what in {"int", "float"}:
            try:
                value = int(text) if what == "int" else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
        try:
            return check_field(f, value)
        except LeukotreeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = kind(f)
    return parse


def add_field_arguments(parser: argparse.ArgumentParser, cls: type, *,
                        names: Iterable[str] | None = None, skip: Iterable[str] = (),
                        short: dict[str, str] | None = None,
                        defaults: dict[str, Any] | None = None,
                        unset: bool = False, helps: dict[str, str] | None = None) -> None:
    """One flag per field of the dataclass ``cls`` (those in ``names``, in that order,
    else every field with ``cli``, less ``skip``). A boolean is a switch that flips its
    default. Each flag's default is the field's (``defaults`` overrides it per command);
    with ``unset`` every default is None, so that unset flags override nothing. ``helps``
    replaces a field's help for this command (what the option does there); the rule and
    default are still appended from the field."""
    short, defaults, skip = short or {}, defaults or {}, set(skip)
    helps = helps or {}
    by_name = {f.name: f for f in fields(cls)}
    chosen = ([by_name[n] for n in names] if names is not None
              else [f for f in by_name.values() if f.metadata["cli"] and f.name not in skip])
    for f in chosen:
        m = f.metadata
        help_of = helps.get(f.name, m["help"])
        flags = [m["flag"] or "--" + f.name.replace("_", "-")]
        if f.name in short:
            flags.append(short[f.name])
        default = defaults.get(f.name, default_of(f))
        if kind(f) == "bool":
            parser.add_argument(*flags, dest=f.name, action="store_const",
                                const=not default_of(f),
                                default=None if unset else default, help=help_of)
            continue
        choices = choices_of(f)
        extra = [f"choices: {', '.join(choices)}"] if choices else []
        extra += [rule(f)] if rule(f) else []
        if default is not None:
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            extra.append(f"default {shown}")
        help_text = help_of + (f" ({'; '.join(extra)})" if extra else "")
        parser.add_argument(*flags, dest=f.name, type=arg_type(f),
                            default=None if unset else default,
                            metavar=m["metavar"] or flags[0].lstrip("-").upper().replace("-", "_"),
                            help=help_text.strip().replace("%", "%%"))
