"""The ``conformal`` section of evaluate's metrics, on hand-computed cases."""

import numpy as np
import pytest

from leukotree.evaluation.coverage import (
    conformal_metrics,
    coverage_curve,
    shift_note,
    wilson_interval,
)
from leukotree.inference.conformal import ConformalAnswers
from leukotree.report.tables import metrics_document
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")  # Normal Reactive ALL AML APML CLL CML
# Every cell predicts ALL: masses P(ALL) 0.5, P(Acute) 0.8, P(Leukemia) 0.9, root 1.
PROBS = [0.05, 0.05, 0.5, 0.2, 0.1, 0.05, 0.05]


def test_wilson_interval_of_8_in_10():
    # p 0.8, z 1.96: centre 0.8 + 3.8416 / 20, half 1.96 sqrt(0.016 + 3.8416 / 400),
    # both over 1 + 3.8416 / 10
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert np.isnan(wilson_interval(0, 0)).all()


def test_section_figures_by_hand():
    # lam 0.6: P(ALL) 0.5 < 0.6 <= P(Acute) 0.8: every answer is Acute (depth 2, 3 leaves)
    answers = ConformalAnswers(0.1, "marginal", dict.fromkeys(TAX.leaves, 0.6), 40)
    truth = ["ALL", "AML", "CLL", "Normal"]
    m = conformal_metrics(TAX, truth, np.tile(PROBS, (4, 1)), answers)
    assert m["coverage"] == 0.5 and m["ci_method"] == "Wilson (binomial)"
    assert m["coverage_ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert (m["mean_depth"], m["mean_leaves"], m["leaf_share"]) == (2, 3, 0)
    assert m["per_class"] == {"ALL": {"n": 1, "coverage": 1.0},
                              "AML": {"n": 1, "coverage": 1.0},
                              "CLL": {"n": 1, "coverage": 0.0},
                              "Normal": {"n": 1, "coverage": 0.0}}
    assert m["target_coverage"] == pytest.approx(0.9) and m["fitted_on"] == 40
    assert "note" not in m
    # with patient ids the interval resamples patients; a shifted domain adds the note
    shifted = conformal_metrics(TAX, truth, np.tile(PROBS, (4, 1)), answers,
                                ["p1", "p1", "p2", "p2"], shifted=True)
    assert shifted["ci_method"] == "patient bootstrap"
    assert shifted["coverage_ci95"] == [0.0, 1.0]  # two patients: all or nothing covered
    assert shifted["note"] == shift_note() and "leukotree calibrate" in shift_note()
    text = metrics_document({"conformal": shifted}).to_markdown()
    assert "## Conformal answers (marginal, coverage asked 0.9000, fitted on 40 cells)" in text
    assert "> The domain-shift alarm is raised on these cells" in text
    assert "| 0.5000 | 0.0000-1.0000 (patient bootstrap) | 2.0000 | 3.0000 | 0.0000 |" in text


def test_coverage_curve_refits_at_each_alpha_the_cells_support():
    # 9 validation cells of ALL and one of CLL (n = 10): alpha 0.1 and up; alpha 0.1 gives
    # K = floor(11 * 0.1 - 1) = 0: lam just above P(Acute) 0.8, answers Leukemia
    val = ["ALL"] * 9 + ["CLL"]
    points = coverage_curve(TAX, val, np.tile(PROBS, (10, 1)), ["CLL", "Normal"],
                            np.tile(PROBS, (2, 1)), "marginal", alphas=(0.01, 0.1, 0.3))
    assert [p["alpha"] for p in points] == [0.1, 0.3]
    assert points[0]["coverage"] == 0.5 and points[0]["leaf_share"] == 0
    # alpha 0.3: K = floor(11 * 0.3 - 1) = 2 > the one possible miss: lam 0, every
    # answer the predicted leaf
    assert points[1] == {"alpha": 0.3, "coverage": 0.0, "leaf_share": 1.0}
