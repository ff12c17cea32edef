"""Decisions from tree probabilities: per cell (with referral), per patient (aggregation
and referral), and referral thresholds set on validation data.

A cell's prediction walks the tree from the root and stops where the model is not
confident enough: at each inner node the most probable child is taken if its
conditional probability ``P(child | node) = P(child) / P(node)`` reaches that
level's threshold; otherwise the cell is *referred* and the deepest confident
node is reported ("Leukemia > Acute, subtype uncertain") instead of a guess.

A patient's diagnosis comes from one path, :func:`decide_patients`: the run's fitted
patient model, or else the unfitted one ``--aggregate`` names (a majority vote or the
mean), referred by the same walk down the diagnosed leaf's path, plus, for a majority
vote, when the winning leaf's vote share is below the last level's threshold. A two-leaf
patient model with a promised miss rate (:mod:`leukotree.patients.guarantee`) calls a
patient negative only when ``P(positive) < min(t_miss, threshold)``: between that and the
threshold the patient is referred, the evidence being too thin to rule the positive
diagnosis out at the stated miss rate. Each decision's ``call`` is ``positive``,
``negative`` or ``referred`` for a two-leaf patient model.
``predict --by-patient``, ``report``, ``evaluate``, ``cv`` and ``serve`` all call it.

Cells whose out-of-distribution score exceeds the model's threshold are
*unclassifiable* (:mod:`leukotree.models.calibration`): reported as such and left out
of every patient's aggregation; when a whole input holds many more of them than the
model flags on its own validation cells, :func:`domain_shift` raises the alarm.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.patients.bags import Bag, make_bags
from leukotree.patients.models import PatientModel, aggregation_model, vote_shares
from leukotree.taxonomy import Taxonomy
from leukotree.tree import greedy_leaf, node_choices, node_level, node_probabilities

if TYPE_CHECKING:
    from leukotree.patients.fit import FittedPatientModel
    from leukotree.patients.guarantee import MissRateThreshold

DECODERS = ("argmax", "greedy")


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


@dataclass(frozen=True)
class PatientDecision:
    """The diagnosis of one patient and whether it should be referred, with the reason."""

    patient: str
    n_cells: int
    leaf: str | None  # None: insufficient (too few classified cells)
    reported_node: str  # the deepest confident node (the root when nothing is)
    refer: bool
    reason: str
    vote_shares: np.ndarray
    mean_probs: np.ndarray
    node_probs: np.ndarray  # patient-level probability of every node (taxonomy.nodes order)
    probs: np.ndarray | None = None  # the leaf probabilities the diagnosis is made from
    #: The patient model's ``predict_proba`` row, what patient metrics rank by (a vote's
    #: shares with its tie-break); None for a patient without a classified cell.
    scores: np.ndarray | None = None
    model: str = ""  # the patient model's name, or the aggregation (majority, mean)
    threshold: float | None = None  # a two-leaf patient model's threshold on P(positive)
    cell_weights: np.ndarray | None = None  # each classified cell's weight in the decision
    #: positive | negative | referred for a two-leaf patient model with a positive leaf,
    #: else "" (the diagnosis is ``leaf``, the referral ``refer``)
    call: str = ""
    miss_rate: MissRateThreshold | None = None  # the miss rate promised, if any

    @property
    def insufficient(self) -> bool:
        return self.leaf is None


def decide_patients(
    taxonomy: Taxonomy,
    patients: Sequence[str | None],
    leaf_probs: np.ndarray,
    *,
    thresholds: Sequence[float],
    classified: np.ndarray | None = None,
    features: np.ndarray | None = None,
    cell_probs: np.ndarray | None = None,
    extras: dict[str, np.ndarray] | None = None,
    model: FittedPatientModel | None = None,
    aggregate: str = "majority",
    min_cells: int = 1,
    cell_weights: bool = False,
) -> list[PatientDecision]:
    """One decision per patient id of ``patients`` (one entry per cell), the only path from
    cells to patient diagnoses (``predict``, ``report``, ``evaluate``, ``serve``, ``cv``).

    A patient's bag holds its ``classified`` cells (readable and classifiable; all by
    default): cells without a patient id are left out. The diagnosis is ``model``'s, the
    run's fitted patient model (its threshold decides two leaves), else that of the
    unfitted patient model ``aggregate`` names (:func:`~.patients.models.aggregation_model`:
    ``majority`` votes, ties to the higher mean probability; ``mean``). Referral walks the
    diagnosis's path from the root while ``P(child | parent)`` reaches each level's
    threshold, on the model's probabilities, or for an aggregation on the mean cell
    probabilities, where a vote is also referred when the winner's share is below the
    last level's threshold. Fewer than ``min_cells`` cells: no diagnosis, referred.

    Patients with cells come first (sorted), then those left without a classified cell.
    ``cell_weights``: also each cell's weight in its patient's decision (a fitted model's
    :meth:`~.patients.models.PatientModel.cell_weights`; for an aggregation the cell's
    probability of the diagnosis).
    """
    keep = np.ones(len(patients), bool) if classified is None else np.asarray(classified)
    ids = [p if k else None for p, k in zip(patients, keep, strict=True)]
    if features is None:
        features = np.zeros((len(patients), 0), np.float32)
    bags = make_bags(ids, leaf_probs, features, cell_probs, extras=extras)
    rule = None if model is not None else aggregation_model(aggregate, taxonomy)
    if model is not None and bags:
        scores = model.predict_proba(bags)
        diagnoses = model.diagnose(scores)
    else:
        scores = rule.predict_proba(bags) if bags else np.zeros((0, len(taxonomy.leaves)))
        diagnoses = [taxonomy.leaves[rule.diagnose(bag)] for bag in bags]
    common = {"model": model.model.name if model is not None else aggregate,
              "threshold": None if model is None else model.threshold,
              "miss_rate": None if model is None else model.miss_rate}
    out = [_decide_bag(taxonomy, bag, row, leaf, thresholds, min_cells, model, rule,
                       cell_weights, common)
           for bag, row, leaf in zip(bags, scores, diagnoses, strict=True)]
    empty = np.zeros(len(taxonomy.leaves))
    for patient in sorted({p for p in patients if p is not None} - {b.patient for b in bags}):
        out.append(PatientDecision(  # every cell unreadable or unclassifiable
            patient, 0, None, taxonomy.root, True, "insufficient: no readable, classifiable "
            "cell", empty, empty, node_probabilities(taxonomy, empty[None])[0], empty,
            call=_call(model, None, True), **common))
    return out


def _decide_bag(taxonomy: Taxonomy, bag: Bag, scores: np.ndarray, leaf: str,
                thresholds: Sequence[float], min_cells: int,
                model: FittedPatientModel | None, rule: PatientModel | None,
                with_weights: bool, common: dict[str, Any]) -> PatientDecision:
    """The decision for one bag: ``scores`` (its ``predict_proba`` row) and the ``leaf``
    diagnosed, referred as :func:`decide_patients` says."""
    mean = bag.leaf_probs.mean(0)
    probs = scores if rule is None else rule.aggregate_probs(bag)
    node_p = node_probabilities(taxonomy, np.asarray(probs if rule is None else mean)[None])[0]
    k = taxonomy.leaf_index[leaf]
    weights = None
    if with_weights:
        weights = (model.model.cell_weights(bag) if model is not None
                   else bag.leaf_probs[:, k if len(bag) >= min_cells else int(mean.argmax())])
    fields = {"patient": bag.patient, "n_cells": len(bag), "vote_shares": vote_shares(
        bag.leaf_probs), "mean_probs": mean, "node_probs": node_p, "probs": np.asarray(probs),
        "scores": scores, "cell_weights": weights, **common}
    if len(bag) < min_cells:
        return PatientDecision(
            leaf=None, reported_node=taxonomy.root, refer=True,
            reason=f"insufficient: {len(bag)} cell(s), at least {min_cells} needed",
            call=_call(model, None, True), **fields)
    confident, _ = confident_node(taxonomy, node_p, leaf, thresholds)
    weak = None if rule is None else rule.weak_support(bag, k, thresholds[-1])
    thin = None if model is None else _thin_evidence(taxonomy, model, scores, confident)
    refer = confident != leaf or weak is not None or thin is not None
    if not refer:
        reason = ""
    elif thin is not None:
        reason, confident = thin
    elif weak is not None and confident == leaf:
        reason = weak
    else:
        reason = _uncertain_reason(taxonomy, confident)
    return PatientDecision(leaf=leaf, reported_node=confident, refer=refer, reason=reason,
                           call=_call(model, leaf, refer), **fields)


def _call(model: FittedPatientModel | None, leaf: str | None, refer: bool) -> str:
    """``positive``, ``negative`` or ``referred`` for a two-leaf patient model, else ``""``."""
    if model is None or model.positive is None:
        return ""
    if refer or leaf is None:
        return "referred"
    return "positive" if leaf == model.positive else "negative"


def _thin_evidence(taxonomy: Taxonomy, model: FittedPatientModel, scores: np.ndarray,
                   confident: str) -> tuple[str, str] | None:
    """With a promised miss rate, a patient below the threshold but not below
    ``min(t_miss, threshold)``: the reason for referring it and the node reported (the
    deepest common ancestor of the two leaves, or the shallower node the walk stopped at);
    None otherwise."""
    if model.miss_rate is None or model.calls(scores[None])[0] != "referred":
        return None
    positive, promise = str(model.positive), model.miss_rate
    other = next(leaf for leaf in taxonomy.leaves if leaf != positive)
    common = [a for a, b in zip(taxonomy.path(positive), taxonomy.path(other), strict=False)
              if a == b]
    node = common[-1] if common else taxonomy.root
    if len(taxonomy.path(confident)) < len(common):
        node = confident
    p = float(scores[taxonomy.leaf_index[positive]])
    return (f"the evidence is too thin to rule out {positive} at the stated miss rate "
            f"(at most {100 * promise.alpha:g}% of {positive} patients missed, with "
            f"{100 * promise.confidence:g}% confidence): P({positive}) {p:.3f} is between "
            f"{model.negative_below():.3f} and the threshold {model.threshold:.3f}"), node


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
