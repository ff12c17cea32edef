"""Conformal answers on the class tree: instead of a forced leaf, each cell is answered
with the deepest node of the tree that is safe at a stated risk.

The answer rule climbs from the predicted leaf ``l = argmax P(leaf)`` towards the root and
stops at the first (deepest) node ``v`` on that path with ``P(v) >= lam``, where
``P(v)`` is the sum of the probabilities of the leaves below ``v``. A cell's answer
*misses* when its true class is not below the answer node.

Along the path ``l = v_0, v_1, ..., v_D = root`` the masses never decrease, so the
answer misses the true class ``y`` exactly when ``lam <= c(x, y)``, with the *critical
mass* ``c(x, y) = P(v_{k-1})``, ``v_k`` the lowest common ancestor of ``l`` and ``y``
(``c = -inf`` when ``y`` is ``l`` itself: ``k = 0``, never missed).
Equivalently, the answer is the lowest common ancestor of the leaves ``y`` with
``c(x, y) < lam`` (a prediction *set* whose leaves always form one subtree).

``lam`` is fitted on labelled calibration cells by conformal risk control
(Angelopoulos et al., ICLR 2024) for the miss loss, which is bounded by 1 and
non-increasing in ``lam``: the smallest ``lam`` with
``n / (n + 1) * R(lam) + 1 / (n + 1) <= alpha``, ``R`` the share of the ``n`` cells whose
answer misses. Then, for a new cell exchangeable with them,
``P(answer misses) <= alpha``. With ``K = floor((n + 1) * alpha - 1)`` this is the
smallest ``lam`` for which at most ``K`` calibration cells have ``c >= lam``: just above
the ``(K + 1)``-th largest critical mass. It needs ``n >= 1 / alpha - 1`` cells.

Cells of one patient are not exchangeable with another patient's cells: a threshold
fitted on cells of some patients under-covers new patients that differ. When the cells
carry patient ids (``groups``), the *patients* are taken as the exchangeable units
(conformal risk control over clusters): with ``m`` patients, patient ``g``'s loss is the
share of its cells whose answer misses, ``L_g(lam)`` (bounded by 1, non-increasing), and
``lam`` is the smallest with ``m / (m + 1) * mean_g L_g(lam) + 1 / (m + 1) <= alpha``, so
that for a new patient exchangeable with them the expected share of its cells missed is at
most ``alpha``. It needs ``m >= 1 / alpha - 1`` patients: with fewer, the cells are the
units (as without patient ids; ``ConformalAnswers.patients`` is then 0). One cell per
patient is the rule above.

The class-conditional (Mondrian) variant fits one threshold per true leaf on that
leaf's cells, so that ``P(miss | class y) <= alpha`` for every class; the answer is the
lowest common ancestor of the predicted leaf and every leaf ``y`` with
``c(x, y) < lam_y``.

The rule and its fit live with inference, as the referral thresholds do: ``predict
--coverage`` re-fits on a run's validation split; the calibration stage
(:func:`leukotree.calibrate.stages.fit_calibration`) fits the threshold a model stores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy

#: How a conformal threshold is fitted: one for all cells, or one per true class.
MODES = ("marginal", "mondrian")


def min_cells(alpha: float) -> int:
    """The fewest calibration cells for which risk ``alpha`` can be promised:
    ``n >= 1 / alpha - 1`` (so that ``(n + 1) * alpha >= 1``)."""
    return max(1, math.ceil(1 / alpha - 1 - 1e-9))


def achievable_alpha(n: int) -> float:
    """The smallest risk ``n`` calibration cells can promise: ``1 / (n + 1)``."""
    return 1 / (n + 1)


def _path_positions(taxonomy: Taxonomy) -> np.ndarray:
    """``(n_leaves, n_leaves)``: for predicted leaf ``l`` (row) and true leaf ``y``
    (column), the position on ``l``'s path to the root (0 = ``l`` itself) of their lowest
    common ancestor."""
    leaves = taxonomy.leaves
    out = np.zeros((len(leaves), len(leaves)), dtype=np.int64)
    for i, a in enumerate(leaves):
        up = (*taxonomy.path(a)[::-1], taxonomy.root)  # a, parent, ..., root
        for j, b in enumerate(leaves):
            out[i, j] = up.index(taxonomy.lowest_common_ancestor(a, b))
    return out


def _path_masses(taxonomy: Taxonomy, leaf_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predicted leaf of each cell and ``(N, D + 1)`` masses along its path to the
    root (position 0: the leaf; padded with 1 above the root)."""
    node_p = leaf_probs @ taxonomy.node_leaf_matrix().T.astype(np.float64)
    pred = leaf_probs.argmax(1)
    depth = taxonomy.max_depth + 1
    cols = np.full((len(taxonomy.leaves), depth), -1, dtype=np.int64)
    for i, leaf in enumerate(taxonomy.leaves):
        up = [taxonomy.node_index[n] for n in taxonomy.path(leaf)[::-1]]
        cols[i, :len(up)] = up
    idx = cols[pred]
    masses = np.where(idx >= 0, np.take_along_axis(node_p, np.maximum(idx, 0), 1), 1.0)
    return pred, masses


def critical_masses(taxonomy: Taxonomy, leaf_probs: np.ndarray) -> np.ndarray:
    """``(N, n_leaves)``: ``c(x, y)``, the threshold at or below which the answer of cell
    ``x`` misses leaf ``y`` (``-inf``: never, ``y`` is the predicted leaf)."""
    probs = np.asarray(leaf_probs, dtype=np.float64)
    pred, masses = _path_masses(taxonomy, probs)
    k = _path_positions(taxonomy)[pred]  # (N, n_leaves)
    below = np.take_along_axis(masses, np.maximum(k - 1, 0), 1)
    return np.where(k > 0, below, -np.inf)


@dataclass
class ConformalAnswers:
    """Fitted conformal thresholds: ``lam`` per leaf (all equal when ``mode`` is
    ``marginal``), the risk ``alpha`` and the number of cells they were fitted on."""

    alpha: float
    mode: str
    thresholds: dict[str, float]
    n: int
    per_class_n: dict[str, int] = field(default_factory=dict)
    #: The patients the risk was controlled over (0: the cells were the units).
    patients: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "mode": self.mode, "thresholds": dict(self.thresholds),
                "n": self.n, "per_class_n": dict(self.per_class_n), "patients": self.patients}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ConformalAnswers:
        return cls(float(doc["alpha"]), str(doc["mode"]),
                   {str(k): float(v) for k, v in doc["thresholds"].items()}, int(doc["n"]),
                   {str(k): int(v) for k, v in doc.get("per_class_n", {}).items()},
                   int(doc.get("patients", 0)))

    def vector(self, taxonomy: Taxonomy) -> np.ndarray:
        return np.array([self.thresholds[leaf] for leaf in taxonomy.leaves])


def _units(groups: Sequence[str | None] | None, n: int) -> np.ndarray:
    """The exchangeable unit of each cell: its patient, or itself without one."""
    if groups is None:
        return np.arange(n)
    names: dict[object, int] = {}
    return np.array([names.setdefault(("patient", g) if g else ("cell", i), len(names))
                     for i, g in enumerate(groups)])


def _threshold(critical: np.ndarray, alpha: float, units: np.ndarray | None = None) -> float:
    """The smallest ``lam`` with ``m / (m + 1) * R(lam) + 1 / (m + 1) <= alpha``, ``R`` the
    mean over the ``m`` units (cells, or patients: ``units``) of the share of their cells
    with critical mass ``>= lam``; 0 when even every possible miss is allowed (every
    answer a leaf). One cell per unit: at most ``K = floor((n + 1) alpha - 1)`` misses,
    just above the ``(K + 1)``-th largest critical mass."""
    units = np.arange(len(critical)) if units is None else np.asarray(units)
    _, inverse, sizes = np.unique(units, return_inverse=True, return_counts=True)
    m = len(sizes)
    weight = 1.0 / (m * sizes[inverse])  # each cell's share of R when it misses
    allowed = ((m + 1) * alpha - 1) / m + 1e-12
    finite = np.isfinite(critical)
    c, w = critical[finite], weight[finite]
    if w.sum() <= allowed:
        return 0.0
    order = np.argsort(-c, kind="stable")  # largest first: the last to stop missing
    c, w = c[order], w[order]
    values, first = np.unique(-c, return_index=True)  # distinct masses, largest first
    above = np.concatenate([[0.0], np.cumsum(w)])[first]  # R at lam just above each value
    ok = np.flatnonzero(above <= allowed)
    return float(np.nextafter(-values[ok[-1]], np.inf))


def fit_conformal(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                  alpha: float, mode: str = "marginal", cells: str = "calibration",
                  groups: Sequence[str | None] | None = None) -> ConformalAnswers:
    """Fit the answer thresholds on labelled cells (module docstring). ``truth`` may hold
    inner nodes (a cell labelled only "granulocyte"): its answer misses unless the answer
    node holds that whole node. ``mondrian`` fits one threshold per leaf on the cells
    labelled with that leaf (inner-labelled cells then count for no class). ``groups``:
    each cell's patient id (None: none), the units the risk is controlled over. Too few
    cells or patients (:func:`check_cells`, which calls the cells ``cells``) are
    refused."""
    if not 0 < alpha < 1:
        raise LeukotreeError(f"The 'alpha' parameter (1 - coverage) must be in (0, 1); got "
                             f"{alpha!r}.")
    if mode not in MODES:
        raise LeukotreeError(f"The 'conformal' parameter (--conformal) must be one of "
                             f"{', '.join(MODES)}; got {mode!r}.")
    truth = list(truth)
    if len(truth) != len(leaf_probs):
        raise ValueError(f"{len(truth)} labels for {len(leaf_probs)} rows of probabilities")
    critical = _critical_for_labels(taxonomy, truth, leaf_probs)
    check_cells(taxonomy, truth, alpha, mode, cells)
    grouped = groups is not None and any(groups)
    units = _units(groups if grouped else None, len(truth))
    if mode == "marginal":
        patients = len(np.unique(units)) if grouped else 0
        if patients < min_cells(alpha):  # too few patients (or none): the cells are the units
            units, patients = np.arange(len(truth)), 0
        lam = _threshold(critical, alpha, units)
        return ConformalAnswers(alpha, mode, dict.fromkeys(taxonomy.leaves, lam), len(truth),
                                patients=patients)
    counts = {leaf: sum(t == leaf for t in truth) for leaf in taxonomy.leaves}
    thresholds, patients = {}, 0
    for leaf in taxonomy.leaves:
        rows = np.flatnonzero([t == leaf for t in truth])
        mine = units[rows]
        if not grouped or len(np.unique(mine)) < min_cells(alpha):
            mine = np.arange(len(rows))
        else:
            patients += len(np.unique(mine))
        thresholds[leaf] = _threshold(critical[rows], alpha, mine)
    return ConformalAnswers(alpha, mode, thresholds, len(truth), counts, patients)


def check_cells(taxonomy: Taxonomy, truth: Sequence[str], alpha: float,
                mode: str = "marginal", cells: str = "calibration") -> None:
    """Refuse too few labelled ``cells`` for risk ``alpha``: ``min_cells(alpha)`` in all
    (marginal) or of every leaf (mondrian), naming the classes short and what coverage
    the cells can support."""
    need, truth = min_cells(alpha), list(truth)
    if mode == "marginal":
        if len(truth) < need:
            raise LeukotreeError(
                f"Conformal answers at coverage {1 - alpha:g} need at least {need} labelled "
                f"{cells} cells; got {len(truth)}. Label more cells, or ask for coverage "
                f"{1 - achievable_alpha(len(truth)):.3f} or less.")
        return
    counts = {leaf: sum(t == leaf for t in truth) for leaf in taxonomy.leaves}
    short = {leaf: c for leaf, c in counts.items() if c < need}
    if short:
        listed = ", ".join(f"{leaf} ({c})" for leaf, c in short.items())
        fewest = min(short.values())
        raise LeukotreeError(
            f"Class-conditional (Mondrian) answers at coverage {1 - alpha:g} need at least "
            f"{need} labelled {cells} cells of every class; too few of: {listed}. Label "
            "more cells of those classes, ask for coverage "
            f"{1 - achievable_alpha(fewest):.3f} or less, or use marginal answers.")


def _critical_for_labels(taxonomy: Taxonomy, truth: Sequence[str],
                         leaf_probs: np.ndarray) -> np.ndarray:
    """``c(x_i, y_i)`` of each labelled cell; for an inner-node label, the largest over
    its leaves (the answer must hold all of them)."""
    critical = critical_masses(taxonomy, leaf_probs)
    out = np.empty(len(truth))
    for i, label in enumerate(truth):
        cols = [taxonomy.leaf_index[leaf] for leaf in taxonomy.descendant_leaves(label)]
        out[i] = critical[i, cols].max()
    return out




def answer_nodes(taxonomy: Taxonomy, leaf_probs: np.ndarray,
                 answers: ConformalAnswers) -> list[str]:
    """The answer node of each cell: the lowest common ancestor of its predicted leaf and
    of every leaf ``y`` with ``c(x, y) < lam_y``. Rows of NaN (unreadable) give ``""``."""
    probs = np.asarray(leaf_probs, dtype=np.float64)
    bad = ~np.isfinite(probs).all(1)
    critical = critical_masses(taxonomy, np.nan_to_num(probs))
    inside = critical < answers.vector(taxonomy)[None, :]
    out = []
    for row, ok in zip(inside, ~bad, strict=True):
        if not ok:
            out.append("")
            continue
        node = None
        for j in np.flatnonzero(row):
            leaf = taxonomy.leaves[j]
            node = leaf if node is None else taxonomy.lowest_common_ancestor(node, leaf)
        out.append(node if node is not None else "")
    return out


def covered(taxonomy: Taxonomy, truth: Sequence[str], nodes: Sequence[str]) -> np.ndarray:
    """Whether each answer node holds the cell's true class (all of it, for an inner
    label)."""
    return np.array([bool(n) and set(taxonomy.descendant_leaves(t))
                     <= set(taxonomy.descendant_leaves(n))
                     for t, n in zip(truth, nodes, strict=True)])


def answer_leaves(taxonomy: Taxonomy, nodes: Sequence[str], sep: str = "|") -> list[str]:
    """The leaves below each answer node joined by ``sep`` (``""`` for no answer)."""
    return [sep.join(taxonomy.descendant_leaves(n)) if n else "" for n in nodes]


def answer_text(taxonomy: Taxonomy, leaf_probs: np.ndarray, node: str, *, top: int = 3,
                min_p: float = 0.05) -> str:
    """The answer as a technologist reads it: the node, and for an inner node the ``top``
    most probable of its leaves with ``P >= min_p``, e.g. ``granulocyte (neutrophil 0.55 /
    ig 0.31)``. A leaf answer is the leaf's name; no answer (``""``) gives ``""``."""
    if not node or taxonomy.is_leaf(node):
        return node
    leaves = taxonomy.descendant_leaves(node)
    probs = np.asarray(leaf_probs, dtype=np.float64)
    shown = sorted(((float(probs[taxonomy.leaf_index[leaf]]), leaf) for leaf in leaves),
                   key=lambda pair: -pair[0])
    named = [f"{leaf} {p:.2f}" for p, leaf in shown[:top] if p >= min_p]
    return f"{node} ({' / '.join(named)})" if named else node
