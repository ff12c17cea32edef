"""The differential count of a case's cells, by hand."""

import pytest

from leukotree.errors import LeukotreeError
from leukotree.patients.differential import differential_count

LEAVES = ("neutrophil", "lymphocyte", "monocyte")


def test_counts_and_shares_over_the_classified_cells_only():
    labels = ["neutrophil", "neutrophil", "lymphocyte", "neutrophil", None, "monocyte",
              "lymphocyte"]
    flagged = [False, False, False, False, False, False, True]
    d = differential_count(LEAVES, labels, flagged)
    assert d.counts == (3, 1, 1)
    assert (d.n_classified, d.n_unclassifiable, d.n_unreadable) == (5, 1, 1)
    assert d.percent() == pytest.approx((60.0, 20.0, 20.0))
    assert d.to_dict() == {
        "rows": [{"leaf": "neutrophil", "count": 3, "percent": 60.0},
                 {"leaf": "lymphocyte", "count": 1, "percent": 20.0},
                 {"leaf": "monocyte", "count": 1, "percent": 20.0}],
        "n_classified": 5, "n_unclassifiable": 1, "n_unreadable": 1}


def test_thirds_round_to_a_tenth_and_no_classified_cell_gives_zeros():
    d = differential_count(LEAVES, ["neutrophil", "lymphocyte", "monocyte"])
    assert [r["percent"] for r in d.to_dict()["rows"]] == [33.3, 33.3, 33.3]
    empty = differential_count(LEAVES, [None, "monocyte"], [False, True])
    assert empty.percent() == (0.0, 0.0, 0.0) and empty.n_classified == 0


def test_a_label_that_is_no_leaf_is_refused():
    with pytest.raises(LeukotreeError, match="'granulocyte' is not a leaf"):
        differential_count(LEAVES, ["granulocyte"])
    with pytest.raises(LeukotreeError, match="2 unclassifiable flags for 1 cells"):
        differential_count(LEAVES, ["monocyte"], [False, True])
