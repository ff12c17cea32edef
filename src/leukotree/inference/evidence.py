"""How much evidence stands behind each patient's diagnosis, and when it is too thin.

For every patient :func:`patient_evidence` gives

- an **interval** for each patient-level probability ``p_<leaf>``: the patient's
  classified cells are resampled with replacement ``n_boot`` times (seeded, so the same
  input gives the same interval), each resample scored by the same patient model (or
  aggregation) the diagnosis used, and the interval is the ``(1 - level) / 2`` and
  ``(1 + level) / 2`` percentiles of the resampled probabilities, widened where needed to
  hold the probability itself (a percentile bootstrap of a vote or a fitted model need
  not). An ensemble's members are resampled with their cells, so the interval holds the
  spread of its averaged output over the cells the patient might have had. Cells that
  all agree give an interval of width 0: the bootstrap measures how many cells there are
  and how much they disagree, not how right the model is (the calibration and the
  cohort-shift estimate of ``leukotree cv --protocol cluster`` say that);
- the number of **informative cells**: readable cells not flagged unclassifiable
  (out of distribution) and, when the model has a cell-type head and an informative set
  is known, whose most probable cell type lies in that set (:data:`INFORMATIVE_CELLS`:
  the cells that carry the disease, e.g. blasts and promyelocytes for ``jhh-cells``;
  ``--informative-cells`` names another set, ``all`` counts every classified cell);
- the **patient-level domain alarm**: the rule of the whole-input alarm
  (:func:`~leukotree.inference.decisions.domain_shift`) on the patient's own readable
  cells: more than twice the share the model flags on its validation cells, and a
  one-sided binomial test at ``p < 0.001``.

:func:`refer_thin` then refers a diagnosed patient whose evidence is too thin, with the
reason: fewer informative cells than ``min_informative`` (``--min-informative-cells``,
default 5), or, for a two-leaf patient model with a decision threshold, an interval of
``P(positive)`` that straddles the threshold (``low < threshold <= high``: the cells the
patient might have had would have decided either way). The domain alarm does not refer
by itself (the flagged cells are already left out of the diagnosis; too few cells left
is the first rule); it is reported beside the diagnosis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.inference.decisions import PatientDecision, domain_shift
from leukotree.patients.bags import Bag, make_bags
from leukotree.patients.models import INFORMATIVE_CELLS, PatientModel, aggregation_model
from leukotree.taxonomy import Taxonomy

if TYPE_CHECKING:
    from leukotree.patients.fit import FittedPatientModel



@dataclass(frozen=True)
class EvidenceSettings:
    """What :func:`patient_evidence` and :func:`refer_thin` use (the inference options
    ``informative_cells``, ``min_informative_cells`` and ``patient_interval``)."""

    informative: str | None = None  # comma list of cell types, "all"; None: the default
    min_informative: int = 5
    level: float = 0.95  # 0: no interval (nor its referral)
    n_boot: int = 200
    seed: int = 0


@dataclass(frozen=True)
class Evidence:
    """One patient's evidence (see the module docstring)."""

    low: np.ndarray | None  # per leaf; None without an interval
    high: np.ndarray | None
    n_informative: int
    informative: str  # what counted, e.g. "blast, promyelocyte cells" or "cells"
    n_readable: int
    n_flagged: int
    alarm: str | None


def informative_types(cell_taxonomy: Taxonomy | None, spec: str | None,
                      ) -> tuple[str, ...] | None:
    """The cell types whose cells are informative; None: every classified cell is.

    ``spec`` None: :data:`INFORMATIVE_CELLS` of the cell taxonomy (None for others or
    without a cell-type head); ``all``: None; else a comma list of nodes of the cell
    taxonomy (a node counts the cell types below it)."""
    if spec is None:
        return None if cell_taxonomy is None else INFORMATIVE_CELLS.get(cell_taxonomy.name)
    if spec.strip() == "all":
        return None
    if cell_taxonomy is None:
        raise LeukotreeError(f"--informative-cells {spec!r} names cell types, but the model "
                             "has no cell-type head (--cell-taxonomy); leave it out or use "
                             "'all'.")
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise LeukotreeError("--informative-cells must name cell types (comma list) or "
                             f"'all'; got {spec!r}.")
    return tuple(cell_taxonomy.resolve(n, where="--informative-cells") for n in names)


def bootstrap_interval(score: np.ndarray, resampled: np.ndarray, level: float = 0.95,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of ``resampled`` (``(n_boot, k)`` scores of resamples) at
    ``level``, widened to hold ``score`` (the ``(k,)`` scores of the sample itself)."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(resampled, [tail, 100 - tail], axis=0)
    return np.minimum(low, score), np.maximum(high, score)


def _resample(bag: Bag, pick: np.ndarray) -> Bag:
    return Bag(bag.patient, bag.leaf_probs[pick], bag.features[pick],
               None if bag.cell_probs is None else bag.cell_probs[pick], [], bag.label,
               {k: v[pick] for k, v in bag.extras.items()})


def _is_informative(cell_taxonomy: Taxonomy | None, types: tuple[str, ...] | None,
                    cell_probs: np.ndarray | None, n: int) -> np.ndarray:
    """Per cell: whether its most probable cell type lies under one of ``types``."""
    if types is None or cell_taxonomy is None or cell_probs is None:
        return np.ones(n, bool)
    leaves = [cell_taxonomy.leaves[i] for i in np.asarray(cell_probs).argmax(1)]
    return np.array([any(t in cell_taxonomy.path(leaf) for t in types) for leaf in leaves],
                    dtype=bool)


def patient_evidence(
    taxonomy: Taxonomy,
    patients: Sequence[str | None],
    leaf_probs: np.ndarray,
    *,
    readable: np.ndarray,
    flagged: np.ndarray,
    features: np.ndarray | None = None,
    cell_probs: np.ndarray | None = None,
    extras: dict[str, np.ndarray] | None = None,
    model: FittedPatientModel | None = None,
    aggregate: str = "majority",
    cell_taxonomy: Taxonomy | None = None,
    expected_ood: float = 0.05,
    settings: EvidenceSettings | None = None,
) -> dict[str, Evidence]:
    """Per patient id: its :class:`Evidence` (one entry of ``patients`` per cell, as
    :func:`~leukotree.inference.decisions.decide_patients` takes them; ``readable`` and
    ``flagged``: per cell, decoded, and unclassifiable)."""
    settings = settings or EvidenceSettings()
    types = informative_types(cell_taxonomy, settings.informative)
    what = f"{', '.join(types)} cells" if types else "cells"
    n = len(patients)
    readable, flagged = np.asarray(readable, bool), np.asarray(flagged, bool)
    classified = readable & ~flagged
    useful = classified & _is_informative(cell_taxonomy, types, cell_probs, n)
    if features is None:
        features = np.zeros((n, 0), np.float32)
    bags = {b.patient: b for b in make_bags(
        [p if k else None for p, k in zip(patients, classified, strict=True)],
        np.nan_to_num(leaf_probs), features, cell_probs, extras=extras)}
    score = (model.predict_proba if model is not None
             else _aggregation(aggregation_model(aggregate, taxonomy)))
    out = {}
    for patient in sorted({p for p in patients if p is not None}):
        mine = np.array([p == patient for p in patients])
        low = high = None
        bag = bags.get(patient)
        if bag is not None and settings.level > 0:
            rng = np.random.default_rng(settings.seed)
            picks = [rng.integers(0, len(bag), len(bag)) for _ in range(settings.n_boot)]
            low, high = bootstrap_interval(score([bag])[0],
                                           score([_resample(bag, p) for p in picks]),
                                           settings.level)
        cells = flagged[mine & readable]
        out[patient] = Evidence(
            low, high, int(useful[mine].sum()), what, len(cells), int(cells.sum()),
            domain_shift(cells, expected_ood) if len(cells) else None)
    return out


def _aggregation(rule: PatientModel) -> Callable[[Sequence[Bag]], np.ndarray]:
    """What an aggregation reports for each bag (the vote shares, the mean)."""
    def score(bags: Sequence[Bag]) -> np.ndarray:
        return np.array([rule.aggregate_probs(b) for b in bags])
    return score


def refer_thin(taxonomy: Taxonomy, decision: PatientDecision, evidence: Evidence,
               settings: EvidenceSettings | None = None,
               positive: str | None = None) -> PatientDecision:
    """``decision`` referred when its evidence is too thin (see the module docstring),
    the reasons added to its own; unchanged otherwise, and for a patient without a
    diagnosis (already referred). ``positive``: the positive leaf of a two-leaf patient
    model whose ``decision.threshold`` decides."""
    settings = settings or EvidenceSettings()
    if decision.leaf is None:
        return decision
    reasons = []
    if evidence.n_informative < settings.min_informative:
        reasons.append(f"too few informative cells: {evidence.n_informative} "
                       f"({evidence.informative} not flagged unclassifiable), at least "
                       f"{settings.min_informative} needed")
    t = decision.threshold
    if positive is not None and t is not None and evidence.low is not None \
            and evidence.high is not None:
        k = taxonomy.leaf_index[positive]
        lo, hi = float(evidence.low[k]), float(evidence.high[k])
        if lo < t <= hi:
            reasons.append(f"the {100 * settings.level:g}% interval of P({positive}) over "
                           f"its cells, [{lo:.3f}, {hi:.3f}], straddles the threshold "
                           f"{t:.3f}")
    if not reasons:
        return decision
    reason = "; ".join(([decision.reason] if decision.reason else []) + reasons)
    path = taxonomy.path(decision.leaf)
    node = decision.reported_node if decision.refer else (
        path[-2] if len(path) > 1 else taxonomy.root)
    return replace(decision, refer=True, reason=reason, reported_node=node,
                   call="referred" if decision.call else "")
