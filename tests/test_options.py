"""The option() machinery shared by training and inference options."""

import argparse
from dataclasses import dataclass, fields

import pytest

from leukotree.errors import LeukotreeError
from leukotree.options import add_field_arguments, check_field, option, rule


@dataclass
class Toy:
    rate: float = option(0.5, "a rate", low=0, high=1, low_open=True)
    count: int = option(3, "a count", low=1)
    below: float = option(0.0, "at most 2", high=2, high_open=True)
    mode: str = option("a", "a mode", choices=lambda: ("a", "b"))
    names: list[str] = option(help="some names", factory=lambda: ["x"])
    quiet: bool = option(False, "be quiet")
    hidden: int = option(1, "files only", cli=False)


F = {f.name: f for f in fields(Toy)}


def test_rules_read_as_intervals():
    assert rule(F["rate"]) == "in (0, 1]"
    assert rule(F["count"]) == "in [1, inf]"
    assert rule(F["below"]) == "in [-inf, 2)"
    assert rule(F["mode"]) == ""


def test_check_field_converts_and_refuses_with_the_rule():
    assert check_field(F["rate"], "0.25") == 0.25
    assert check_field(F["names"], "p, q") == ["p", "q"]
    with pytest.raises(LeukotreeError, match=r"'rate' parameter must be in \(0, 1\]; got 0.0"):
        check_field(F["rate"], 0.0)
    with pytest.raises(LeukotreeError, match=r"'below' parameter must be in \[-inf, 2\)"):
        check_field(F["below"], 2)
    with pytest.raises(LeukotreeError, match="one of a, b; got 'c'"):
        check_field(F["mode"], "c")
    with pytest.raises(LeukotreeError, match="'count' parameter needs a value"):
        check_field(F["count"], None)


def test_flags_carry_defaults_or_none_and_switches_flip():
    parser = argparse.ArgumentParser()
    add_field_arguments(parser, Toy)
    args = parser.parse_args(["--quiet"])
    assert (args.rate, args.count, args.quiet, args.names) == (0.5, 3, True, ["x"])
    assert not hasattr(args, "hidden")
    unset = argparse.ArgumentParser()
    add_field_arguments(unset, Toy, unset=True, skip={"names"})
    args = unset.parse_args([])
    assert args.rate is None and args.quiet is None and not hasattr(args, "names")
    picked = argparse.ArgumentParser()
    add_field_arguments(picked, Toy, names=["count"], defaults={"count": 7})
    assert vars(picked.parse_args([])) == {"count": 7}
    assert "in [1, inf]; default 7" in " ".join(picked.format_help().split())
