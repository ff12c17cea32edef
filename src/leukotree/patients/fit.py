"""Fitting a patient-level model, choosing its decision threshold, and scoring patients.

For a diagnosis tree with two leaves the model's ``P(positive)`` is compared with a
threshold chosen *inside* the training data, never on the patients it is judged on:
the training patients are split into stratified folds, the model is fitted on all but
one and scores the left-out one, and the threshold is chosen on these out-of-fold
scores by the rule (``youden``: the largest ``sensitivity + specificity - 1``;
``sensitivity:0.95``: the highest threshold reaching that sensitivity). The threshold
then travels unchanged with the model to new patients.

With a promised miss rate (``miss_rate``, :mod:`leukotree.patients.guarantee`), a second
threshold ``t_miss`` is chosen on the same out-of-fold scores by Learn-then-Test: a
patient is called negative only when ``P(positive) < min(t_miss, threshold)``, positive
when ``P(positive) >= threshold``, and referred in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold

from leukotree.errors import LeukotreeError
from leukotree.metrics import binary_metrics, threshold_for_sensitivity
from leukotree.patients.bags import Bag, label_index
from leukotree.patients.guarantee import MissRateThreshold, miss_rate_threshold
from leukotree.patients.models import PatientModel, build_patient_model
from leukotree.taxonomy import Taxonomy


def check_threshold_rule(rule: str) -> str:
    """``youden``, ``sensitivity:<x>`` with x in (0, 1], or a fixed number in [0, 1]."""
    try:
        if rule == "youden":
            return rule
        if rule.startswith("sensitivity:") and 0 < float(rule.split(":", 1)[1]) <= 1:
            return rule
        if 0 <= float(rule) <= 1:
            return rule
    except ValueError:
        pass
    raise LeukotreeError(f"The 'patient_threshold' parameter must be youden, "
                         f"sensitivity:<x> (e.g. sensitivity:0.95) or a number in [0, 1]; "
                         f"got {rule!r}.")


def choose_threshold(p_positive: np.ndarray, is_positive: np.ndarray, rule: str) -> float:
    """The decision threshold on ``P(positive)`` by ``rule`` (see the module docstring)."""
    check_threshold_rule(rule)
    y = is_positive.astype(bool)
    if rule.startswith("sensitivity:"):
        return threshold_for_sensitivity(p_positive, y, float(rule.split(":", 1)[1]))
    if rule != "youden":
        return float(rule)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p_positive)
    best = int(np.argmax(np.round(tpr - fpr, 12)))  # ties: the highest threshold
    return float(min(1.0, thresholds[best]))


@dataclass
class FittedPatientModel:
    """A patient-level model with its positive leaf and its chosen threshold."""

    model: PatientModel
    positive: str | None  # the positive leaf of a two-leaf diagnosis tree
    threshold: float | None
    rule: str
    params: dict[str, Any]
    #: With a promised miss rate: the threshold below which a patient may be called negative.
    miss_rate: MissRateThreshold | None = None

    @property
    def taxonomy(self) -> Taxonomy:
        return self.model.taxonomy

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        return self.model.predict_proba(bags)

    def diagnose(self, probs: np.ndarray) -> list[str]:
        """The diagnosis of each row: ``P(positive) >= threshold`` for two leaves, else the
        most probable leaf."""
        tax = self.taxonomy
        if self.positive is None or self.threshold is None:
            return [tax.leaves[i] for i in probs.argmax(1)]
        k = tax.leaf_index[self.positive]
        other = next(leaf for leaf in tax.leaves if leaf != self.positive)
        return [self.positive if row[k] >= self.threshold else other for row in probs]

    def negative_below(self) -> float | None:
        """``P(positive)`` below which a patient is called negative with the promised miss
        rate, ``min(t_miss, threshold)``; None without a promise."""
        if self.miss_rate is None or self.threshold is None:
            return None
        return min(self.miss_rate.threshold, self.threshold)

    def promise(self) -> str | None:
        """The miss rate this model states, in words, with the thresholds it is made at;
        None without a promise."""
        low, promise = self.negative_below(), self.miss_rate
        if low is None or promise is None:
            return None
        pos = self.positive
        return (f"Stated miss rate: at most {100 * promise.alpha:g}% of {pos} patients are "
                f"called negative, with {100 * promise.confidence:g}% confidence (chosen on "
                f"{promise.n_positive} out-of-fold training {pos} patients). Negative when "
                f"P({pos}) < {low:.3f}, positive at P({pos}) >= {self.threshold:.3f}, "
                "referred in between.")

    def calls(self, probs: np.ndarray) -> list[str]:
        """Each row's call on ``P(positive)`` for two leaves: ``positive`` at or above the
        threshold, ``negative`` below :meth:`negative_below` (the threshold without a
        promised miss rate), ``referred`` in between; empty without a positive leaf."""
        if self.positive is None or self.threshold is None:
            return [""] * len(probs)
        k = self.taxonomy.leaf_index[self.positive]
        low = self.negative_below()
        low = self.threshold if low is None else low
        return ["positive" if row[k] >= self.threshold else "negative" if row[k] < low
                else "referred" for row in probs]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.model.name, "params": self.params, "positive": self.positive,
                "threshold": self.threshold, "rule": self.rule,
                "miss_rate": None if self.miss_rate is None else self.miss_rate.to_dict(),
                "state": self.model.state_dict()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], taxonomy: Taxonomy,
                  cell_taxonomy: Taxonomy | None) -> FittedPatientModel:
        model = build_patient_model(doc["name"], taxonomy, cell_taxonomy, **doc["params"])
        model.load_state_dict(doc["state"])
        miss = doc.get("miss_rate")  # None in models saved before miss rates existed
        return cls(model, doc["positive"], doc["threshold"], doc["rule"], doc["params"],
                   None if miss is None else MissRateThreshold.from_dict(miss))


def fit_patient_model(name: str, taxonomy: Taxonomy, cell_taxonomy: Taxonomy | None,
                      bags: Sequence[Bag], *, rule: str = "youden",
                      positive: str | None = None, seed: int = 0,
                      miss_rate: float | None = None, miss_confidence: float = 0.9,
                      **params: Any) -> FittedPatientModel:
    """Fit ``name`` on the labelled ``bags``; choose the threshold on out-of-fold scores,
    and with ``miss_rate`` the miss-rate threshold on the same scores (promised with
    ``miss_confidence``; two leaves only)."""
    if miss_rate is not None and len(taxonomy.leaves) != 2:
        raise LeukotreeError(
            f"A patient miss rate needs a taxonomy of two diagnoses; '{taxonomy.name}' has "
            f"{len(taxonomy.leaves)} leaves. Leave out the miss rate or use a two-leaf tree.")
    y = label_index(taxonomy, bags)
    model = build_patient_model(name, taxonomy, cell_taxonomy, **params).fit(bags, y, seed)
    if len(taxonomy.leaves) != 2:
        return FittedPatientModel(model, None, None, rule, params)
    positive = taxonomy.resolve(positive) if positive else taxonomy.leaves[0]
    k = taxonomy.leaf_index[positive]
    oof = out_of_fold(name, taxonomy, cell_taxonomy, bags, y, seed, **params)[:, k]
    miss = None if miss_rate is None else miss_rate_threshold(
        oof, y == k, miss_rate, miss_confidence, positive)
    return FittedPatientModel(model, positive, choose_threshold(oof, y == k, rule), rule,
                              params, miss)


def out_of_fold(name: str, taxonomy: Taxonomy, cell_taxonomy: Taxonomy | None,
                bags: Sequence[Bag], y: np.ndarray, seed: int, **params: Any) -> np.ndarray:
    """Scores of every bag from a model fitted without it (stratified folds)."""
    probe = build_patient_model(name, taxonomy, cell_taxonomy, **params)
    if not probe.needs_fit:
        return probe.predict_proba(bags)
    folds = min(5, int(np.bincount(y).min()))
    if folds < 2:
        raise LeukotreeError("Choosing a threshold needs at least two training patients of "
                             "each diagnosis.")
    out = np.zeros((len(bags), len(taxonomy.leaves)))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(np.zeros(len(y)), y):
        part = build_patient_model(name, taxonomy, cell_taxonomy, **params)
        part.fit([bags[i] for i in train], y[train], seed)
        out[test] = part.predict_proba([bags[i] for i in test])
    return out


def bootstrap_aurocs(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     ) -> np.ndarray:
    """The AUROC of each of ``n_boot`` resamples of the patients with replacement (the
    resamples holding one class only left out)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            values.append(roc_auc_score(y[pick], scores[pick]))
    return np.array(values, dtype=float)


def bootstrap_auroc(y: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                    ) -> tuple[float, float]:
    """95% interval of the AUROC when patients are resampled with replacement."""
    values = bootstrap_aurocs(y, scores, n_boot, seed)
    if not len(values):
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def patient_metrics(taxonomy: Taxonomy, truth: Sequence[str], probs: np.ndarray,
                    diagnoses: Sequence[str], *, positive: str | None = None,
                    threshold: float | None = None, n_boot: int = 1000) -> dict[str, Any]:
    """Accuracy of the diagnoses; for two leaves also AUROC of ``P(positive)`` with a
    patient-bootstrap 95% CI and the binary block at the threshold used."""
    truth = list(truth)
    out: dict[str, Any] = {
        "n_patients": len(truth),
        "accuracy": float(np.mean([t == d for t, d in zip(truth, diagnoses, strict=True)]))
        if truth else float("nan"),
    }
    if positive is not None and len(taxonomy.leaves) == 2:
        k = taxonomy.leaf_index[positive]
        y = np.array([t == positive for t in truth])
        out["positive"] = positive
        if 0 < y.sum() < len(y):
            out["auroc"] = float(roc_auc_score(y, probs[:, k]))
            out["auroc_ci95"] = bootstrap_auroc(y, probs[:, k], n_boot)
        out["binary"] = binary_metrics(probs[:, k], y, 0.5 if threshold is None else threshold)
    return out


def without_promise(doc: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """A stored patient model (``FittedPatientModel.to_dict``) without its miss-rate
    promise, which held for the cell model it was measured with, not for one adapted or
    re-calibrated since; ``report["not_carried_over"]`` says so."""
    if doc.get("miss_rate") is None:
        return doc
    report.setdefault("not_carried_over", []).append("patient miss-rate promise")
    return {**doc, "miss_rate": None}
