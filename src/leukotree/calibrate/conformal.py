"""Fitting conformal answers on labelled cells (the rule itself, which every output
applies, is :mod:`leukotree.inference.conformal`; its docstring states it).

``lam`` is fitted by conformal risk control (Angelopoulos et al., ICLR 2024) for the miss
loss: the smallest ``lam`` with ``n / (n + 1) * R(lam) + 1 / (n + 1) <= alpha``; with
``K = floor((n + 1) * alpha - 1)``, just above the ``(K + 1)``-th largest critical mass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.inference.conformal import (
    MODES,
    ConformalAnswers,
    achievable_alpha,
    answer_nodes,
    covered,
    critical_masses,
    min_cells,
)
from leukotree.taxonomy import Taxonomy

__all__ = ["MODES", "ConformalAnswers", "achievable_alpha", "answer_nodes", "covered",
           "critical_masses", "fit_conformal", "min_cells"]


def _threshold(critical: np.ndarray, alpha: float) -> float:
    """The smallest ``lam`` with at most ``K = floor((n + 1) alpha - 1)`` of the critical
    masses ``>= lam``: just above the ``(K + 1)``-th largest (0 when fewer misses are
    possible: every answer a leaf)."""
    n = len(critical)
    k = math.floor((n + 1) * alpha - 1 + 1e-12)
    finite = np.sort(critical[np.isfinite(critical)])[::-1]
    if k >= len(finite):
        return 0.0
    return float(np.nextafter(finite[k], np.inf))


def fit_conformal(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                  alpha: float, mode: str = "marginal") -> ConformalAnswers:
    """Fit the answer thresholds on labelled cells (module docstring). ``truth`` may hold
    inner nodes (a cell labelled only "granulocyte"): its answer misses unless the answer
    node holds that whole node. ``mondrian`` fits one threshold per leaf on the cells
    labelled with that leaf (inner-labelled cells then count for no class)."""
    if not 0 < alpha < 1:
        raise LeukotreeError(f"The 'alpha' parameter (1 - coverage) must be in (0, 1); got "
                             f"{alpha!r}.")
    if mode not in MODES:
        raise LeukotreeError(f"The conformal mode must be one of {', '.join(MODES)}; got "
                             f"{mode!r}.")
    truth = list(truth)
    if len(truth) != len(leaf_probs):
        raise ValueError(f"{len(truth)} labels for {len(leaf_probs)} rows of probabilities")
    critical = _critical_for_labels(taxonomy, truth, leaf_probs)
    need = min_cells(alpha)
    if mode == "marginal":
        if len(truth) < need:
            raise LeukotreeError(
                f"Conformal answers at coverage {1 - alpha:g} need at least {need} labelled "
                f"calibration cells; got {len(truth)}. Label more cells, or ask for coverage "
                f"{1 - achievable_alpha(len(truth)):.3f} or less.")
        lam = _threshold(critical, alpha)
        return ConformalAnswers(alpha, mode, dict.fromkeys(taxonomy.leaves, lam), len(truth))
    counts = {leaf: sum(t == leaf for t in truth) for leaf in taxonomy.leaves}
    short = {leaf: c for leaf, c in counts.items() if c < need}
    if short:
        listed = ", ".join(f"{leaf} ({c})" for leaf, c in short.items())
        raise LeukotreeError(
            f"Class-conditional (Mondrian) answers at coverage {1 - alpha:g} need at least "
            f"{need} labelled calibration cells of every class; too few of: {listed}. Label "
            "more cells of those classes, lower the coverage, or use marginal answers.")
    thresholds = {leaf: _threshold(critical[[t == leaf for t in truth]], alpha)
                  for leaf in taxonomy.leaves}
    return ConformalAnswers(alpha, mode, thresholds, len(truth), counts)


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


