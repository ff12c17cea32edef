"""Tree arithmetic: node probabilities, decoding, per-node choices (hand-computed)."""


import numpy as np
import pytest

from conftest import LEUKEMIA7_LEAVES, leaf_row
from leukotree.tree import (
    decode_argmax,
    decode_greedy,
    node_choices,
    node_probabilities,
)

LEAVES = LEUKEMIA7_LEAVES
row = leaf_row


# --------------------------------------------------------------- node probabilities, decoding

# Row A: argmax Normal (0.35). Greedy: root children Normal 0.35, Reactive 0.05,
#   Leukemia 0.25+0.20+0.15 = 0.60 -> Leukemia; Acute 0.60 vs Chronic 0 -> Acute;
#   ALL 0.25 > AML 0.20 > APML 0.15 -> ALL.
ROW_A = row(Normal=0.35, Reactive=0.05, ALL=0.25, AML=0.20, APML=0.15)
# Row B: argmax ALL (0.32). Greedy: Leukemia = 0.32+0.04+0.04+0.23+0.21 = 0.84 -> Leukemia;
#   Acute 0.40 vs Chronic 0.44 -> Chronic; CLL 0.23 vs CML 0.21 -> CLL.
ROW_B = row(Normal=0.10, Reactive=0.06, ALL=0.32, AML=0.04, APML=0.04, CLL=0.23, CML=0.21)


def test_node_probabilities_are_sums_of_leaves(leukemia7):
    probs = np.array([ROW_A, ROW_B])
    node_p = node_probabilities(leukemia7, probs)
    assert node_p.shape == (2, len(leukemia7.nodes)) == (2, 10)

    def col(name):
        return node_p[:, leukemia7.node_index[name]]

    assert col("Leukemia") == pytest.approx([0.60, 0.84])
    assert col("Acute") == pytest.approx([0.60, 0.40])
    assert col("Chronic") == pytest.approx([0.00, 0.44])
    for k, leaf in enumerate(LEAVES):  # a leaf's node probability is its own
        assert col(leaf) == pytest.approx(probs[:, k])
    # the root's children sum to 1
    assert col("Normal") + col("Reactive") + col("Leukemia") == pytest.approx([1.0, 1.0])


def test_argmax_and_greedy_decoding_differ_where_expected(leukemia7):
    probs = np.array([ROW_A, ROW_B])
    assert decode_argmax(leukemia7, probs) == ["Normal", "ALL"]
    assert decode_greedy(leukemia7, probs) == ["ALL", "CLL"]
    # On a confident row both agree.
    sure = np.array([row(APML=0.9, AML=0.1)])
    assert decode_argmax(leukemia7, sure) == decode_greedy(leukemia7, sure) == ["APML"]




def test_node_choices_hand_computed(leukemia7):
    # Row A is an ALL cell, row B a CLL cell (see above).
    choices = {c.node: c for c in node_choices(leukemia7, ["ALL", "CLL"],
                                              np.array([ROW_A, ROW_B]))}
    assert set(choices) == {"root", "Leukemia", "Acute", "Chronic"}
    root = choices["root"]  # children Normal, Reactive, Leukemia
    assert root.cond == pytest.approx(np.array([[0.35, 0.05, 0.60], [0.10, 0.06, 0.84]]))
    assert root.target.tolist() == [2, 2] and root.hit.tolist() == [True, True]
    acute = choices["Acute"]  # only row A goes below Acute: ALL .25, AML .20, APML .15 / .60
    assert acute.rows.tolist() == [0]
    assert acute.cond[0] == pytest.approx([0.25 / 0.6, 0.2 / 0.6, 0.15 / 0.6])
    chronic = choices["Chronic"]  # row B: CLL .23 vs CML .21, true CLL
    assert chronic.cond[0] == pytest.approx([0.23 / 0.44, 0.21 / 0.44])
    assert chronic.hit.tolist() == [True]
