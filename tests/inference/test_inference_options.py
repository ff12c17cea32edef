"""Inference options declared once: each field's bounds and choices are refused alike on
the command line and in the library."""

import argparse
import subprocess
import sys
from dataclasses import fields

import pytest

from leukotree.cli import build_parser
from leukotree.errors import LeukotreeError
from leukotree.inference.options import (
    ENGINES,
    InferenceOptions,
    add_inference_arguments,
    check_option,
)
from leukotree.options import choices_of
from leukotree.patients.models import aggregates


def _parser(*names, **kw):
    parser = argparse.ArgumentParser(prog="x", exit_on_error=False)
    add_inference_arguments(parser, names, **kw)
    return parser


@pytest.mark.parametrize(("name", "value", "rule"), [
    ("batch_size", 0, r"in \[1, inf\]; got 0"),
    ("workers", -2, r"in \[1, inf\]; got -2"),
    ("min_cells", 0, r"in \[1, inf\]; got 0"),
    ("max_pixels", 0, r"in \[1, inf\]; got 0"),
    ("pixel_size", 0.0, r"in \(0, 1000\]; got 0.0"),
    ("pixel_size", 1000.5, r"in \(0, 1000\]; got 1000.5"),
    ("crop_mode", "nucleus", "one of centre, cell, auto; got 'nucleus'"),
    ("aggregate", "majorty", "one of majority, mean; got 'majorty'. Did you mean 'majority'"),
    ("engine", "tensorrt", "one of auto, torch, onnx; got 'tensorrt'"),
    ("coverage", 1.0, r"in \(0, 1\); got 1.0"),
    ("coverage", 0.0, r"in \(0, 1\); got 0.0"),
    ("conformal", "mondrain", "one of marginal, mondrian; got 'mondrain'"),
    ("min_informative_cells", -1, r"in \[0, inf\]; got -1"),
    ("patient_interval", 1.0, r"in \[0, 1\); got 1.0"),
])
def test_a_bound_is_refused_in_the_library_and_on_the_command_line(name, value, rule):
    with pytest.raises(LeukotreeError, match=f"The '{name}' parameter must be {rule}"):
        InferenceOptions(**{name: value})
    with pytest.raises(LeukotreeError, match=rule):
        check_option(name, value)
    flag = "--" + name.replace("_", "-")
    with pytest.raises(argparse.ArgumentError, match=rule):
        _parser(name).parse_args([flag, str(value)])


def test_the_edges_of_a_rule_are_accepted_and_values_converted():
    options = InferenceOptions(pixel_size=1000, batch_size=1, crop_mode="auto")
    assert options.pixel_size == 1000.0 and isinstance(options.pixel_size, float)
    assert InferenceOptions().to_dict() == {
        "crop_mode": None, "pixel_size": None, "tta": False, "batch_size": 64, "workers": 2,
        "max_pixels": 60_000_000, "engine": "auto", "confidence": None,
        "aggregate": "majority", "min_cells": 1, "informative_cells": None,
        "min_informative_cells": 5, "patient_interval": 0.95, "coverage": None,
        "conformal": None}
    with pytest.raises(LeukotreeError, match=r"'batch_size' parameter must be int; got 2\.5"):
        InferenceOptions(batch_size=2.5)
    with pytest.raises(LeukotreeError, match="'tta' parameter must be bool"):
        InferenceOptions(tta="yes")


def test_choices_come_from_where_they_live():
    by_name = {f.name: f for f in fields(InferenceOptions)}
    assert choices_of(by_name["aggregate"]) == aggregates() == ("majority", "mean")
    assert choices_of(by_name["engine"]) == ENGINES
    from leukotree.data.images import CROP_MODES, DEFAULT_MAX_PIXELS

    assert choices_of(by_name["crop_mode"]) == CROP_MODES
    assert InferenceOptions().max_pixels == DEFAULT_MAX_PIXELS


def test_each_command_takes_its_fields_with_its_own_defaults():
    parser = build_parser()
    predict = parser.parse_args(["predict", "r", "x"])
    report = parser.parse_args(["report", "r", "x", "--out", "o"])
    serve = parser.parse_args(["serve", "r"])
    assert predict.confidence is None and report.confidence == serve.confidence == "0.6"
    assert (predict.batch_size, predict.workers, predict.engine, predict.tta) == (64, 2,
                                                                                 "auto", False)
    assert InferenceOptions.from_args(predict).to_dict() == InferenceOptions().to_dict()
    explain = parser.parse_args(["explain", "r", "i.png", "--out", "o", "--pixel-size", "0.5"])
    assert InferenceOptions.from_args(explain).pixel_size == 0.5
    assert not hasattr(explain, "batch_size")  # a command takes only the fields it uses
    for argv in (["cv", "d", "--out", "o"], ["evaluate", "r", "--out", "o"], ["serve", "r"]):
        assert parser.parse_args([*argv, "--aggregate", "mean"]).aggregate == "mean"


def test_a_bad_flag_stops_the_command_with_the_rule(capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["evaluate", "r", "--out", "o", "--pixel-size", "0"])
    assert stop.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--pixel-size" in err and "in (0, 1000]; got 0.0" in err


def test_the_options_module_imports_no_torch():
    code = ("import sys; import leukotree.inference.options; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_evaluate_settings_hold_only_what_evaluate_decides():
    from leukotree.evaluation.evaluate import EvalSettings

    own = {f.name for f in fields(EvalSettings)}
    assert own == {"threshold", "target_sensitivity", "positive", "progress"}
    assert own.isdisjoint(f.name for f in fields(InferenceOptions))


def test_cv_and_serve_read_only_their_inference_flags():
    from leukotree.cli import CV_INFERENCE, SERVE_INFERENCE

    parser = build_parser()
    # cv's --pixel-size and --batch-size are training options: not the evaluation's
    cv = parser.parse_args(["cv", "d", "--out", "o", "--pixel-size", "0.5", "--batch-size",
                            "8", "--min-cells", "3", "--aggregate", "mean"])
    assert (cv.pixel_size, cv.batch_size) == (0.5, 8)
    assert InferenceOptions.from_args(cv, CV_INFERENCE) == InferenceOptions(
        aggregate="mean", min_cells=3)
    # serve's --max-pixels is its upload limit (default None), not the option's
    serve = parser.parse_args(["serve", "r", "--crop-mode", "auto"])
    assert serve.max_pixels is None
    assert InferenceOptions.from_args(serve, SERVE_INFERENCE) == InferenceOptions(
        crop_mode="auto", confidence="0.6")


def test_a_command_gives_an_option_its_own_help_and_keeps_its_rule(capsys):
    parser = _parser("batch_size", helps={"batch_size": "cells per batch here"})
    text = " ".join(parser.format_help().split())
    assert "cells per batch here (in [1, inf]; default 64)" in text
    assert "images per batch" not in text
    adapt = build_parser()._subparsers._group_actions[0].choices["adapt"]
    text = " ".join(adapt.format_help().split())
    assert "batch-norm: micrometres per pixel of the new lab's images" in text
    assert "(in (0, 1000])" in text and "the fine-tune keeps the run's own batch size" in text
    args = build_parser().parse_args(["adapt", "r", "x", "--out", "o", "--pixel-size", "2",
                                      "--workers", "3"])
    assert (args.pixel_size, args.workers, args.batch_size) == (2.0, 3, 64)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["adapt", "r", "x", "--out", "o", "--pixel-size", "0"])
    assert "in (0, 1000]; got 0.0" in " ".join(capsys.readouterr().err.split())
