"""Conformal answers on the tree: hand-computed critical masses, thresholds and answers,
and the promised risk checked on simulated exchangeable cells."""

import numpy as np
import pytest

from leukotree.errors import LeukotreeError
from leukotree.inference.conformal import (
    ConformalAnswers,
    achievable_alpha,
    answer_nodes,
    answer_text,
    covered,
    critical_masses,
    fit_conformal,
    min_cells,
)
from leukotree.taxonomy import load_taxonomy

TAX = load_taxonomy("leukemia7")  # Normal Reactive ALL AML APML CLL CML
ALL_CELL = [0.0, 0.0, 0.5, 0.3, 0.1, 0.1, 0.0]  # ALL .5 < Acute .9 < Leukemia 1.0


def test_critical_masses_are_the_masses_just_below_the_common_ancestor():
    c = critical_masses(TAX, np.array([ALL_CELL]))[0]
    # ALL itself: never missed; AML/APML: missed while lam <= P(ALL) = .5; CLL/CML: while
    # lam <= P(Acute) = .9; Normal/Reactive: while lam <= P(Leukemia) = 1.
    assert c.tolist() == [1.0, 1.0, -np.inf, 0.5, 0.5, 0.9, 0.9]


@pytest.mark.parametrize(("lam", "node"), [(0.0, "ALL"), (0.5, "ALL"), (0.51, "Acute"),
                                           (0.9, "Acute"), (0.95, "Leukemia"),
                                           (1.0, "Leukemia"), (1.01, "root")])
def test_the_answer_is_the_deepest_node_on_the_path_with_mass_at_least_lam(lam, node):
    answers = ConformalAnswers(0.1, "marginal", dict.fromkeys(TAX.leaves, lam), 10)
    assert answer_nodes(TAX, np.array([ALL_CELL]), answers) == [node]


def test_the_threshold_follows_conformal_risk_control_by_hand():
    # 19 cells, alpha 0.1: K = floor(20 * 0.1 - 1) = 1 miss allowed; the critical masses
    # of the cells whose leaf is wrong are .9 (true CLL) and .5 (true AML): lam just
    # above the second largest, .5.
    probs = np.array([ALL_CELL] * 19)
    truth = ["ALL"] * 17 + ["CLL", "AML"]
    fitted = fit_conformal(TAX, truth, probs, alpha=0.1)
    lam = fitted.thresholds["ALL"]
    assert lam == np.nextafter(0.5, 1) and fitted.n == 19
    nodes = answer_nodes(TAX, probs, fitted)
    assert set(nodes) == {"Acute"}
    assert covered(TAX, truth, nodes).tolist() == [True] * 17 + [False, True]  # CLL missed
    # with alpha 0.2 (K = 3) no cell needs more than its leaf
    assert fit_conformal(TAX, truth, probs, alpha=0.2).thresholds["ALL"] == 0.0


def test_an_inner_label_is_covered_only_by_a_node_holding_all_of_it():
    c = fit_conformal(TAX, ["Acute"] * 9, np.array([ALL_CELL] * 9), alpha=0.1)
    # K = 0: lam above the largest critical mass of the label's leaves (.5, APML/AML)
    assert c.thresholds["AML"] == np.nextafter(0.5, 1)
    assert covered(TAX, ["Acute", "Acute"], ["ALL", "Leukemia"]).tolist() == [False, True]


def test_too_few_cells_say_how_many_are_needed_and_what_they_allow():
    assert min_cells(0.05) == 19 and achievable_alpha(9) == pytest.approx(0.1)
    with pytest.raises(LeukotreeError, match=r"at least 19 .* got 10.*coverage 0\.909"):
        fit_conformal(TAX, ["ALL"] * 10, np.array([ALL_CELL] * 10), alpha=0.05)


def test_mondrian_names_the_classes_with_too_few_cells():
    probs = np.array([ALL_CELL] * 12)
    with pytest.raises(LeukotreeError, match=r"Normal \(0\).*ALL \(12\)|Normal \(0\)"):
        fit_conformal(TAX, ["ALL"] * 12, probs, alpha=0.1, mode="mondrian")


def test_the_promised_risk_holds_on_new_exchangeable_cells():
    rng = np.random.default_rng(0)
    n_leaves = len(TAX.leaves)

    def cells(n):
        truth = rng.integers(0, n_leaves, n)
        logits = rng.normal(size=(n, n_leaves)) + 2.0 * np.eye(n_leaves)[truth]
        p = np.exp(logits)
        return [TAX.leaves[t] for t in truth], p / p.sum(1, keepdims=True)

    misses = []
    for _ in range(40):
        truth, probs = cells(200)
        fitted = fit_conformal(TAX, truth, probs, alpha=0.1)
        new_truth, new_probs = cells(500)
        misses.append(1 - covered(TAX, new_truth, answer_nodes(TAX, new_probs, fitted)).mean())
    assert np.mean(misses) <= 0.1 + 0.01  # the guarantee is on average over draws
    assert np.mean(misses) >= 0.05  # and not vacuous: answers are not all the root


def test_answers_round_trip_and_unreadable_rows_get_none():
    fitted = fit_conformal(TAX, ["ALL"] * 19, np.array([ALL_CELL] * 19), alpha=0.05)
    again = ConformalAnswers.from_dict(fitted.to_dict())
    assert again == fitted
    probs = np.array([ALL_CELL, [np.nan] * 7])
    assert answer_nodes(TAX, probs, again) == ["ALL", ""]


def test_an_answer_reads_as_its_node_and_its_most_probable_leaves():
    tax = load_taxonomy("pbc")
    probs = np.zeros(len(tax.leaves))
    for leaf, p in {"neutrophil": .55, "ig": .31, "eosinophil": .04, "basophil": .06,
                    "lymphocyte": .04}.items():
        probs[tax.leaf_index[leaf]] = p
    # leaves of the node by probability, those under 0.05 left out, at most `top`
    assert answer_text(tax, probs, "granulocyte") == \
        "granulocyte (neutrophil 0.55 / ig 0.31 / basophil 0.06)"
    assert answer_text(tax, probs, "granulocyte", top=2) == \
        "granulocyte (neutrophil 0.55 / ig 0.31)"
    assert answer_text(tax, probs, "mononuclear") == "mononuclear"  # none reaches 0.05
    assert answer_text(tax, probs, "neutrophil") == "neutrophil"
    assert answer_text(tax, probs, "") == ""


def test_patients_are_the_units_when_the_cells_carry_patient_ids():
    from leukotree.inference.conformal import _threshold, _units

    inf = -np.inf
    critical = np.array([0.9, inf, 0.8, 0.7, inf, inf, 0.6, inf])
    units = _units(["A", "A", "B", "B", "C", "C", "D", "D"], 8)
    # m = 4 patients, each cell 1/8 of R; allowed R = ((4 + 1) * 0.25 - 1) / 4 = 0.0625:
    # no miss at all -> just above the largest critical mass
    assert _threshold(critical, 0.25, units) == np.nextafter(0.9, np.inf)
    # the same cells as 8 units: K = floor(9 * 0.25 - 1) = 1 miss -> above the second
    assert _threshold(critical, 0.25) == np.nextafter(0.8, np.inf)
    # alpha 0.5: allowed (2.5 - 1) / 4 = 0.375 = 3 of the 4 possible misses
    assert _threshold(critical, 0.5, units) == np.nextafter(0.6, np.inf)
    # alpha 0.6: allowed (3 - 1) / 4 = 0.5 = every possible miss -> every answer a leaf
    assert _threshold(critical, 0.6, units) == 0.0


def test_one_cell_per_patient_is_the_rule_over_cells():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(7), size=60)
    truth = [TAX.leaves[i] for i in rng.integers(0, 7, 60)]
    plain = fit_conformal(TAX, truth, probs, 0.1)
    each = fit_conformal(TAX, truth, probs, 0.1, groups=[f"p{i}" for i in range(60)])
    assert plain.thresholds == each.thresholds and (plain.patients, each.patients) == (0, 60)
    assert ConformalAnswers.from_dict(each.to_dict()) == each


def test_too_few_patients_leave_the_cells_as_the_units():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(7), size=40)
    truth = [TAX.leaves[i] for i in rng.integers(0, 7, 40)]
    # 4 patients cannot carry alpha 0.05 (19 needed): the 40 cells are the units
    few = fit_conformal(TAX, truth, probs, 0.05, groups=[f"p{i % 4}" for i in range(40)])
    assert few.patients == 0 and few.thresholds == fit_conformal(TAX, truth, probs,
                                                                 0.05).thresholds
    # 20 patients of 2 cells can: fitted over them (more cautious than over the cells)
    over = fit_conformal(TAX, truth, probs, 0.05, groups=[f"p{i // 2}" for i in range(40)])
    assert over.patients == 20
    assert over.thresholds["ALL"] >= few.thresholds["ALL"]
