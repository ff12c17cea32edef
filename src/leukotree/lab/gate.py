"""The gate: may a candidate model replace the active one? (pure functions)

The rule, on the lab's audit cells (reviewed, never trained on) and on the source run's
validation images:

1. **Enough audit cells.** At least ``min_audit`` audit cells scored by both models
   (default 10): with fewer, nothing can be shown.
2. **Not worse on the audit cells** (paired, the same cells): among the cells exactly one
   model gets right, let ``b`` be those only the active model gets right and ``c`` those
   only the candidate gets right. If the two were equally accurate, ``b`` would follow
   Binomial(b + c, 1/2); the one-sided exact sign (McNemar) test gives
   ``p = P(X >= b) = sum_{k=b}^{b+c} C(b+c, k) / 2^(b+c)``. The candidate is refused when
   ``p < alpha`` (default 0.05): it is wrong on significantly more audit cells than the
   active model.
3. **No forgetting.** Its accuracy on the source run's validation images is at least the
   active model's minus ``tolerance`` (default 0.02, two points).

A forced promotion skips the gate and is recorded with who forced it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from leukotree.errors import LeukotreeError

#: Defaults of the rule (module docstring).
ALPHA = 0.05
TOLERANCE = 0.02
MIN_AUDIT = 10


def sign_test_p(b: int, c: int) -> float:
    """One-sided exact sign test: ``P(X >= b)`` for ``X ~ Binomial(b + c, 1/2)``, the
    chance of at least ``b`` discordant cells against the candidate if both models were
    equally accurate (1.0 when there is no discordant cell)."""
    if b < 0 or c < 0:
        raise LeukotreeError(f"Discordant counts must be >= 0; got b={b}, c={c}.")
    n = b + c
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2 ** n


def discordant(active_correct: Sequence[bool], candidate_correct: Sequence[bool],
               ) -> tuple[int, int]:
    """``(b, c)``: cells only the active model gets right, and only the candidate."""
    a = np.asarray(active_correct, dtype=bool)
    k = np.asarray(candidate_correct, dtype=bool)
    if a.shape != k.shape:
        raise LeukotreeError(f"The gate compares the two models on the same cells; got "
                             f"{a.size} and {k.size} results.")
    return int((a & ~k).sum()), int((~a & k).sum())


@dataclass(frozen=True)
class GateRule:
    """The gate's parameters (module docstring)."""

    alpha: float = ALPHA
    tolerance: float = TOLERANCE
    min_audit: int = MIN_AUDIT

    def describe(self) -> str:
        return (f"promote only if at least {self.min_audit} audit cells are scored, the "
                f"candidate is not worse on them (one-sided exact sign test on the cells "
                f"where the models disagree, refused at p < {self.alpha:g}), and its "
                f"accuracy on the source run's validation images is at most "
                f"{100 * self.tolerance:g} points below the active model's")


@dataclass(frozen=True)
class GateResult:
    """The decision, the figures it rests on and a sentence for each failed part."""

    passed: bool
    rule: str
    figures: dict[str, Any]
    refusals: list[str] = field(default_factory=list)

    @property
    def message(self) -> str:
        """The rule, then the numbers: what refused it, or that it passed."""
        if self.passed:
            return f"Passed: {self.rule}. " + _figures_text(self.figures)
        return f"Refused: {'; '.join(self.refusals)}. Rule: {self.rule}."

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rule": self.rule, "figures": self.figures,
                "refusals": list(self.refusals), "message": self.message}


def _figures_text(f: dict[str, Any]) -> str:
    text = (f"Audit cells: {f['n_audit']}, active {_pct(f['audit_active'])}, candidate "
            f"{_pct(f['audit_candidate'])} (b={f['b']}, c={f['c']}, p={f['p']:.3g}).")
    if f.get("source_active") is not None:
        text += (f" Source validation: active {_pct(f['source_active'])}, candidate "
                 f"{_pct(f['source_candidate'])}.")
    return text


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def decide(active_correct: Sequence[bool], candidate_correct: Sequence[bool],
           source_active: float | None, source_candidate: float | None,
           rule: GateRule | None = None) -> GateResult:
    """Apply the gate (module docstring) to the per-cell correctness of both models on the
    same audit cells and to their accuracies on the source run's validation images
    (None: the source run keeps no validation images, and that part is refused)."""
    rule = rule or GateRule()
    b, c = discordant(active_correct, candidate_correct)
    n = len(active_correct)
    p = sign_test_p(b, c)
    figures: dict[str, Any] = {
        "n_audit": n, "b": b, "c": c, "p": p,
        "audit_active": float(np.mean(active_correct)) if n else None,
        "audit_candidate": float(np.mean(candidate_correct)) if n else None,
        "source_active": source_active, "source_candidate": source_candidate}
    refusals = []
    if n < rule.min_audit:
        refusals.append(f"only {n} reviewed audit cells, the gate needs at least "
                        f"{rule.min_audit}: review more cells of the review queue")
    elif p < rule.alpha:
        refusals.append(f"on the {n} audit cells the candidate is worse: {b} cells only the "
                        f"active model gets right against {c} only the candidate gets right "
                        f"(one-sided sign test p = {p:.3g} < {rule.alpha:g}; accuracy "
                        f"{_pct(figures['audit_candidate'])} against "
                        f"{_pct(figures['audit_active'])})")
    if source_active is None or source_candidate is None:
        refusals.append("the source run's validation images could not be scored, so "
                        "forgetting cannot be ruled out")
    elif source_candidate < source_active - rule.tolerance - 1e-12:
        refusals.append(f"on the source run's validation images the candidate's accuracy "
                        f"fell from {_pct(source_active)} to {_pct(source_candidate)}, more "
                        f"than the {100 * rule.tolerance:g} points allowed")
    return GateResult(not refusals, rule.describe(), figures, refusals)


def accuracy_ci(correct: Sequence[bool], resamples: int = 1000, seed: int = 0,
                level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the accuracy ``mean(correct)``: the
    ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the means of ``resamples``
    resamples with replacement (None without cells)."""
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)
