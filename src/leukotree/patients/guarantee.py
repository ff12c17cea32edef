"""A patient miss rate one can state: Learn-then-Test (Angelopoulos et al. 2021) on the
patients' ``P(positive)``.

A two-diagnosis patient model (APL vs other AML) calls a patient *negative* when
``P(positive) < t``. Its miss rate is ``FNR(t) = P(called negative | positive)``. For a
risk ``alpha`` and a confidence ``1 - delta``, Learn-then-Test picks ``t`` on scored
patients with known diagnoses (out-of-fold training patients, so the scores are those of
models that never saw them) so that ``P(FNR(t) <= alpha) >= 1 - delta``:

- each candidate ``t`` is a null hypothesis ``H_t: FNR(t) > alpha``; with ``k(t)`` of the
  ``n`` positive patients below ``t``, its p-value is the binomial tail
  ``p(t) = P(Binom(n, alpha) <= k(t))`` (valid: under ``H_t`` fewer misses are even less
  likely);
- the candidates are tested in a fixed sequence from the safest (lowest ``t``: no positive
  patient below it) upwards, rejecting while ``p(t) <= delta`` and stopping at the first
  that is not rejected (fixed-sequence testing controls the family-wise error at
  ``delta``, so every rejected ``t`` is valid together);
- the highest rejected ``t`` is kept: the most patients called negative while the miss
  rate stays promised. Since misses change only at the positive patients' scores, the
  candidates are those scores, sorted: ``t_k = s_(k+1)`` allows ``k`` misses.

Zero misses among ``n`` positives give ``p = (1 - alpha) ** n``, so ``n`` positive patients
can promise at best ``alpha = 1 - delta ** (1 / n)`` (22 APL patients at 90% confidence:
9.9%); a smaller ``alpha`` is refused, naming what they support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom, binomtest

from leukotree.errors import LeukotreeError


def achievable_miss_rate(n_positive: int, confidence: float) -> float:
    """The smallest miss rate ``n_positive`` positive patients can promise with
    ``confidence``: ``1 - (1 - confidence) ** (1 / n)`` (1 without any)."""
    if n_positive < 1:
        return 1.0
    return 1 - (1 - confidence) ** (1 / n_positive)


def binomial_p_value(misses: int, n: int, alpha: float) -> float:
    """``P(Binom(n, alpha) <= misses)``: how likely so few misses are at miss rate
    ``alpha``."""
    return float(binom.cdf(misses, n, alpha))


@dataclass(frozen=True)
class MissRateThreshold:
    """The threshold below which a patient is called negative, with the evidence."""

    threshold: float
    alpha: float
    confidence: float
    n_positive: int
    misses: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "alpha": self.alpha,
                "confidence": self.confidence, "n_positive": self.n_positive,
                "misses": self.misses, "p_value": self.p_value}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> MissRateThreshold:
        return cls(float(doc["threshold"]), float(doc["alpha"]), float(doc["confidence"]),
                   int(doc["n_positive"]), int(doc["misses"]), float(doc["p_value"]))


def miss_rate_threshold(p_positive: np.ndarray, is_positive: np.ndarray, alpha: float,
                        confidence: float, positive: str = "positive") -> MissRateThreshold:
    """The highest threshold ``t`` with ``P(miss rate <= alpha) >= confidence`` by
    Learn-then-Test (module docstring), from scored patients of known diagnosis."""
    if not 0 < alpha < 1:
        raise LeukotreeError(f"The 'patient_miss_rate' parameter must be in (0, 1); got "
                             f"{alpha!r}.")
    if not 0 < confidence < 1:
        raise LeukotreeError(f"The 'patient_miss_confidence' parameter (--confidence, the "
                             f"confidence of the miss-rate promise) must be in (0, 1); got "
                             f"{confidence!r}.")
    scores = np.sort(np.asarray(p_positive, dtype=np.float64)[np.asarray(is_positive, bool)])
    n = len(scores)
    check_miss_rate_support(n, alpha, confidence, positive)  # so t = s_(1) is rejected
    delta = 1 - confidence
    best = MissRateThreshold(float(scores[0]), alpha, confidence, n, 0,
                             binomial_p_value(0, n, alpha))
    for k in range(1, n):  # t = s_(k+1): the scores below it are missed
        t = float(scores[k])
        misses = int((scores < t).sum())
        p = binomial_p_value(misses, n, alpha)
        if p > delta:
            break
        best = MissRateThreshold(t, alpha, confidence, n, misses, p)
    return best


def check_miss_rate_support(n_positive: int, alpha: float, confidence: float,
                            positive: str = "positive") -> None:
    """Refuse a miss rate ``n_positive`` positive patients cannot promise even with none
    missed (``(1 - alpha) ** n > 1 - confidence``), naming the rate they support."""
    if binomial_p_value(0, n_positive, alpha) <= 1 - confidence:
        return
    can = achievable_miss_rate(n_positive, confidence)
    raise LeukotreeError(
        f"{n_positive} {positive} patient(s) cannot promise a miss rate of at most "
        f"{alpha:.1%} with {confidence:.0%} confidence: even with none missed, that needs "
        f"{_patients_needed(alpha, confidence)} {positive} patients. These support a "
        f"miss rate of {math.ceil(can * 1000) / 10:.1f}% or more; ask for that, or "
        f"train on more {positive} patients.")


def _patients_needed(alpha: float, confidence: float) -> int:
    """The fewest positive patients for which no miss proves ``alpha``:
    ``(1 - alpha) ** n <= 1 - confidence``."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - alpha) - 1e-12)


def miss_rate_metrics(calls: Sequence[str], is_positive: np.ndarray, alpha: float,
                      confidence: float) -> dict[str, Any]:
    """What a promise held to on patients of known diagnosis, from their ``calls``
    (positive, negative, referred): the observed miss rate ``missed / n_positive`` (positive
    patients called negative, over all positive patients) with its exact binomial
    (Clopper-Pearson) 95% interval, and the referred share ``referred / n_patients``, beside
    the promised ``alpha`` and ``confidence``."""
    calls = list(calls)
    y = np.asarray(is_positive, bool)
    if len(calls) != len(y):
        raise ValueError(f"{len(calls)} calls for {len(y)} patients")
    said = np.array(calls, dtype=object)
    n_pos = int(y.sum())
    missed = int(((said == "negative") & y).sum())
    referred = int((said == "referred").sum())
    out: dict[str, Any] = {"alpha": alpha, "confidence": confidence, "n_patients": len(y),
                           "n_positive": n_pos, "missed": missed, "referred": referred,
                           "referred_share": referred / len(y) if len(y) else float("nan")}
    if n_pos:
        ci = binomtest(missed, n_pos).proportion_ci(0.95)
        out |= {"observed_miss_rate": missed / n_pos,
                "observed_miss_rate_ci95": (float(ci.low), float(ci.high)),
                "within_promise": missed / n_pos <= alpha}
    else:
        out |= {"observed_miss_rate": float("nan"),
                "observed_miss_rate_ci95": (float("nan"), float("nan")),
                "within_promise": None}
    return out
