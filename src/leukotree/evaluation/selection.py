"""Model selection by the one-standard-error rule (Hastie, Tibshirani & Friedman, *The
Elements of Statistical Learning*, 2nd ed., section 7.10).

Given each candidate's cross-validation fold scores and the candidates ordered from the
simplest to the most complex: the best candidate has the best mean fold score ``m*``
and the standard error ``se* = sd(scores*) / sqrt(n*)`` (``sd`` with ``ddof=1``); the
rule picks the *simplest* candidate whose mean is within one standard error of it,
``mean >= m* - se*`` (``<= m* + se*`` when lower is better). A few test patients per fold
make fold scores noisy; the rule does not pay for complexity that noise may explain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from leukotree.errors import LeukotreeError

#: Fold metrics of ``leukotree cv`` where lower is better.
LOWER_IS_BETTER = frozenset({"ece", "brier", "ece_uncalibrated", "unclassifiable"})


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`one_standard_error`."""

    chosen: str
    best: str
    bound: float  # m* - se* (higher is better) or m* + se*
    means: dict[str, float]
    standard_errors: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return {"chosen": self.chosen, "best": self.best, "bound": self.bound,
                "means": self.means, "standard_errors": self.standard_errors}


def one_standard_error(scores: Mapping[str, Sequence[float]], order: Sequence[str], *,
                       higher_is_better: bool = True) -> Selection:
    """The simplest candidate of ``order`` (simplest first) whose mean fold score is
    within one standard error of the best mean (see the module docstring). NaN fold
    scores are left out; a candidate with one score has a standard error of 0."""
    if not order or sorted(order) != sorted(scores) or len(set(order)) != len(order):
        raise LeukotreeError(f"The one-standard-error rule needs every candidate once in the "
                             f"complexity order; got scores of {sorted(scores)} and the order "
                             f"{list(order)}.")
    means, ses = {}, {}
    for name in order:
        values = np.array([v for v in scores[name] if not math.isnan(v)], dtype=float)
        if len(values) == 0:
            raise LeukotreeError(f"Candidate '{name}' has no fold score to select by.")
        means[name] = float(values.mean())
        ses[name] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 \
            else 0.0
    return select_within_one_se(means, ses, order, higher_is_better=higher_is_better)


def select_within_one_se(means: Mapping[str, float], ses: Mapping[str, float],
                         order: Sequence[str], *, higher_is_better: bool = True) -> Selection:
    """The rule on estimates and standard errors known otherwise (e.g. a pooled AUROC and
    its patient-bootstrap standard error): the simplest candidate of ``order`` with
    ``mean >= m* - se*`` (``<= m* + se*`` when lower is better)."""
    if not order or sorted(order) != sorted(means) or sorted(means) != sorted(ses):
        raise LeukotreeError(f"The one-standard-error rule needs an estimate and a standard "
                             f"error of every candidate of the order {list(order)}; got "
                             f"{sorted(means)} and {sorted(ses)}.")
    means, ses = dict(means), dict(ses)
    sign = 1.0 if higher_is_better else -1.0
    best = max(order, key=lambda n: (sign * means[n], -order.index(n)))
    bound = means[best] - sign * ses[best]
    chosen = next(n for n in order if sign * (means[n] - bound) >= -1e-12)
    return Selection(chosen, best, bound, means, ses)
