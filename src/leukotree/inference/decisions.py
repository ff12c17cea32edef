"""Decisions from tree probabilities: per cell (with referral), per patient (aggregation
and referral), and referral thresholds set on validation data.

A cell's prediction walks the tree from the root and stops where the model is not
confident enough: at each inner node the most probable child is taken if its
conditional probability ``P(child | node) = P(child) / P(node)`` reaches that
level's threshold; otherwise the cell is *referred* and the deepest confident
node is reported ("Leukemia > Acute, subtype uncertain") instead of a guess.

A patient's diagnosis aggregates its cells (:func:`aggregate_patients`) and is
referred by the same rule applied to the patient's mean probabilities, plus, for a
majority vote, when the winning leaf's vote share is below the last level's
threshold (:func:`decide_patient`); the path walked is that of the diagnosed leaf.
``predict --by-patient``, ``report`` and the evaluation all use these functions.

Cells whose out-of-distribution score exceeds the model's threshold are
*unclassifiable* (:mod:`leukotree.models.calibration`): reported as such and left out
of every patient's aggregation; when a whole input holds many more of them than the
model flags on its own validation cells, :func:`domain_shift` raises the alarm.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy
from leukotree.tree import greedy_leaf, node_choices, node_level, node_probabilities

DECODERS = ("argmax", "greedy")
AGGREGATES = ("majority", "mean")


def parse_thresholds(spec: str | None, depth: int) -> list[float]:
    """``"0.8"`` for every level or ``"0.9,0.8,0.7"`` per level (root's choice first)."""
    if spec is None:
        return [0.0] * depth
    try:
        values = [float(v) for v in str(spec).split(",")]
    except ValueError:
        raise LeukotreeError(f"--confidence must be a number or comma-separated numbers; "
                             f"got {spec!r}.") from None
    if any(not 0 <= v <= 1 for v in values):
        raise LeukotreeError(f"--confidence values must be in [0, 1]; got {spec!r}.")
    if len(values) == 1:
        return values * depth
    if len(values) != depth:
        raise LeukotreeError(f"--confidence needs 1 or {depth} values (one per level); got "
                             f"{len(values)}.")
    return values


def decide(taxonomy: Taxonomy, node_p: np.ndarray, thresholds: Sequence[float],
           decode: str = "argmax") -> tuple[str, str, bool, list[float]]:
    """Pick a leaf, then walk its path from the root while each step is confident.

    ``decode``: ``argmax`` (the most probable leaf) or ``greedy`` (top-down, the
    most probable child at each node). Returns ``(leaf, deepest confident node,
    refer, conditional probabilities along the path)``.
    """
    if decode == "argmax":
        leaf_p = [node_p[taxonomy.node_index[leaf]] for leaf in taxonomy.leaves]
        leaf = taxonomy.leaves[int(np.argmax(leaf_p))]
    elif decode == "greedy":
        leaf = greedy_leaf(taxonomy, node_p)
    else:
        raise LeukotreeError(f"The 'decode' parameter must be argmax or greedy; got {decode!r}.")
    confident, conds = confident_node(taxonomy, node_p, leaf, thresholds)
    return leaf, confident, confident != leaf, conds


def confident_node(taxonomy: Taxonomy, node_p: np.ndarray, leaf: str,
                   thresholds: Sequence[float]) -> tuple[str, list[float]]:
    """Walk ``leaf``'s path from the root while ``P(child | parent)`` reaches the level's
    threshold; returns the deepest confident node and the conditional probabilities."""
    confident, p_parent, stopped = taxonomy.root, 1.0, False
    conds: list[float] = []
    for level, node in enumerate(taxonomy.path(leaf)):
        p = float(node_p[taxonomy.node_index[node]])
        cond = p / p_parent if p_parent > 0 else 0.0
        conds.append(cond)
        if not stopped and cond >= thresholds[level]:
            confident = node
        else:
            stopped = True
        p_parent = p
    return confident, conds


def referral_message(taxonomy: Taxonomy, leaf: str, confident: str, refer: bool) -> str:
    """``Leukemia > Acute > ALL``, or ``Leukemia > Acute, subtype uncertain`` when referred."""
    if not refer:
        return " > ".join(taxonomy.path(leaf))
    if confident == taxonomy.root:
        return "no level, class uncertain"
    return " > ".join(taxonomy.path(confident)) + ", subtype uncertain"


def calibrate_thresholds(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                         target_error: float) -> list[float]:
    """Per level, the lowest threshold keeping the error of accepted decisions <= target.

    Decisions at a level are the choices among the children of the nodes at that
    depth, on images whose true path continues below them.
    """
    confs: dict[int, list[float]] = defaultdict(list)
    hits: dict[int, list[bool]] = defaultdict(list)
    for choice in node_choices(taxonomy, truth, leaf_probs):
        level = node_level(taxonomy, choice.node)
        confs[level].extend(choice.cond.max(1).tolist())
        hits[level].extend(choice.hit.tolist())
    out = []
    for level in range(taxonomy.max_depth):
        if not confs[level]:
            out.append(0.0)
            continue
        order = np.argsort(confs[level])[::-1]
        conf_sorted, hit_sorted = np.array(confs[level])[order], np.array(hits[level])[order]
        errors = np.cumsum(~hit_sorted) / np.arange(1, len(order) + 1)
        ok = np.flatnonzero(errors <= target_error)
        out.append(float(conf_sorted[ok[-1]]) if len(ok) else 1.0)
    return out


def aggregate_patients(
    patients: Sequence[str | None],
    leaf_probs: np.ndarray,
    *,
    method: str = "majority",
    min_cells: int = 1,
) -> dict[str, dict[str, Any]]:
    """One diagnosis per patient from its cells.

    - ``majority``: the most frequent predicted leaf (the seed paper's slide-level
      vote); ties go to the leaf with the higher mean probability;
    - ``mean``: the leaf with the highest mean probability.

    Patients with fewer than ``min_cells`` cells get the decision ``None``
    ("insufficient") instead of a guess. Images without a patient id are skipped.
    """
    if method not in AGGREGATES:
        raise LeukotreeError(f"The 'method' parameter must be majority or mean; got {method!r}.")
    rows: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(patients):
        if p is not None:
            rows[p].append(i)
    out: dict[str, dict[str, Any]] = {}
    for patient, idx in sorted(rows.items()):
        probs = leaf_probs[idx]
        mean = probs.mean(0)
        votes = Counter(probs.argmax(1).tolist())
        shares = np.zeros(leaf_probs.shape[1])
        for leaf, count in votes.items():
            shares[leaf] = count / len(idx)
        if len(idx) < min_cells:
            decision = None
        elif method == "majority":
            decision = int(max(votes, key=lambda leaf: (votes[leaf], mean[leaf])))
        else:
            decision = int(mean.argmax())
        out[patient] = {"n_cells": len(idx), "decision": decision, "vote_shares": shares,
                        "mean_probs": mean}
    return out


@dataclass(frozen=True)
class PatientDecision:
    """The diagnosis of one patient and whether it should be referred, with the reason."""

    patient: str
    n_cells: int
    leaf: str | None  # None: too few cells
    reported_node: str  # the deepest confident node (the root when nothing is)
    refer: bool
    reason: str
    vote_shares: np.ndarray
    mean_probs: np.ndarray
    node_probs: np.ndarray  # patient-level probability of every node (taxonomy.nodes order)
    probs: np.ndarray | None = None  # the leaf probabilities the diagnosis is made from


def decide_patient(taxonomy: Taxonomy, patient: str, aggregate: dict[str, Any],
                   thresholds: Sequence[float], method: str, min_cells: int,
                   ) -> PatientDecision:
    """The referral rule for a patient, from one entry of :func:`aggregate_patients`."""
    node_p = node_probabilities(taxonomy, np.asarray(aggregate["mean_probs"])[None])[0]
    common = {"patient": patient, "n_cells": aggregate["n_cells"],
              "vote_shares": aggregate["vote_shares"], "mean_probs": aggregate["mean_probs"],
              "node_probs": node_p,
              "probs": aggregate["vote_shares" if method == "majority" else "mean_probs"]}
    if aggregate["decision"] is None:
        return PatientDecision(
            leaf=None, reported_node=taxonomy.root, refer=True,
            reason=f"insufficient: {aggregate['n_cells']} cell(s), at least {min_cells} needed",
            **common)
    leaf = taxonomy.leaves[aggregate["decision"]]
    share = float(aggregate["vote_shares"][aggregate["decision"]])
    confident, _ = confident_node(taxonomy, node_p, leaf, thresholds)
    weak_vote = method == "majority" and share < thresholds[-1]
    refer = confident != leaf or weak_vote
    if not refer:
        reason = ""
    elif weak_vote and confident == leaf:
        reason = f"{share:.0%} of the cells vote {leaf}, below {thresholds[-1]:.0%}"
    else:
        reason = _uncertain_reason(taxonomy, confident)
    return PatientDecision(leaf=leaf, reported_node=confident, refer=refer, reason=reason,
                           **common)


def decide_patient_probs(taxonomy: Taxonomy, patient: str, probs: np.ndarray, diagnosis: str,
                         n_cells: int, thresholds: Sequence[float], min_cells: int,
                         vote_shares: np.ndarray, mean_probs: np.ndarray) -> PatientDecision:
    """The referral rule for a patient-level model's probabilities ``probs`` and its
    ``diagnosis`` (which a decision threshold may have chosen): walk the diagnosis's path
    while each level is confident."""
    node_p = node_probabilities(taxonomy, np.asarray(probs)[None])[0]
    common = {"patient": patient, "n_cells": n_cells, "vote_shares": vote_shares,
              "mean_probs": mean_probs, "node_probs": node_p, "probs": np.asarray(probs)}
    if n_cells < min_cells:
        return PatientDecision(
            leaf=None, reported_node=taxonomy.root, refer=True,
            reason=f"insufficient: {n_cells} cell(s), at least {min_cells} needed", **common)
    confident, _ = confident_node(taxonomy, node_p, diagnosis, thresholds)
    refer = confident != diagnosis
    return PatientDecision(leaf=diagnosis, reported_node=confident, refer=refer,
                           reason=_uncertain_reason(taxonomy, confident) if refer else "",
                           **common)


def _uncertain_reason(taxonomy: Taxonomy, confident: str) -> str:
    if confident == taxonomy.root:
        return "not confident at any level of the tree"
    return f"confident down to {' > '.join(taxonomy.path(confident))} only"


def domain_shift(unclassifiable: np.ndarray, expected: float, alpha: float = 1e-3,
                 ) -> str | None:
    """The alarm when the input as a whole is unlike the training cells, else None.

    Raised when the share of unclassifiable cells is more than twice ``expected`` (the
    share flagged on the model's validation cells) and a one-sided binomial test of
    ``k`` flagged among ``n`` cells against ``expected`` gives ``p < alpha``.
    """
    from scipy.stats import binomtest

    n, k = len(unclassifiable), int(np.sum(unclassifiable))
    expected = max(expected, 0.01)  # a tiny validation split may have flagged none
    if n == 0 or k / n <= 2 * expected:
        return None
    if binomtest(k, n, expected, alternative="greater").pvalue >= alpha:
        return None
    return (f"domain shift: {k} of {n} cells ({k / n:.0%}) are unlike the cells this model "
            f"was trained on (it flags {expected:.0%} of its own validation cells); its "
            "accuracy is not guaranteed on these images, and its probabilities were "
            "calibrated on its own lab's cells (on another lab's they run over-confident). "
            "Check the stain, magnification and crop, or train (or fine-tune) on labelled "
            "cells of this lab.")
