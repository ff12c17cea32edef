"""The patient-model stage: fit a patient-level model on a model's calibrated outputs of
labelled cells with patient ids, and score it on a second set of patients."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from leukotree.data.discover import Sample
from leukotree.errors import LeukotreeError
from leukotree.patients import fit_patient_model, make_bags, patient_labels, patient_metrics
from leukotree.patients.bags import Bag
from leukotree.patients.fit import FittedPatientModel
from leukotree.patients.guarantee import miss_rate_metrics
from leukotree.taxonomy import Taxonomy


@dataclass
class LabelledCells:
    """Labelled cells with patient ids and a model's (calibrated) outputs of them:
    ``leaf_probs``, ``features``, and where the model gives them ``cell_probs`` and
    ``ood_score`` (cells above 1, unclassifiable, are left out of their patient's bag,
    as in ``predict``)."""

    samples: Sequence[Sample]
    outputs: Mapping[str, np.ndarray]

    def bags(self, taxonomy: Taxonomy) -> list[Bag]:
        """One labelled bag per patient; every cell must have a patient id."""
        samples, out = self.samples, self.outputs
        if any(s.patient is None for s in samples):
            raise LeukotreeError(
                "A patient-level model needs a patient id for every image: give a "
                "manifest 'patient' column or patient sub-folders (--patients).")
        odd = out.get("ood_score", np.zeros(len(samples))) > 1
        patients = [None if o else s.patient for s, o in zip(samples, odd, strict=True)]
        features = out.get("features", np.zeros((len(patients), 0), np.float32))
        return make_bags(patients, out["leaf_probs"], features, out.get("cell_probs"),
                         [s.path.name for s in samples],
                         patient_labels(taxonomy, patients, [s.label for s in samples]))


@dataclass
class PatientStage:
    """The fitted patient model and its metrics on the scored patients."""

    fitted: FittedPatientModel
    metrics: dict[str, Any]


def fit_patient_stage(name: str, taxonomy: Taxonomy, cell_taxonomy: Taxonomy | None,
                      fit_on: LabelledCells, score_on: LabelledCells, *,
                      rule: str, positive: str | None = None, seed: int = 0,
                      params: Mapping[str, Any] | None = None,
                      miss_rate: float | None = None, miss_confidence: float = 0.9,
                      log: Callable[[str], None] | None = None) -> PatientStage:
    """Fit the patient model ``name`` on the patients of ``fit_on`` (threshold by
    ``rule``, and with ``miss_rate`` the miss-rate threshold promised with
    ``miss_confidence``, both chosen inside them) and score it on those of ``score_on``."""
    fit_bags = fit_on.bags(taxonomy)
    scored = score_on.bags(taxonomy)
    fitted = fit_patient_model(name, taxonomy, cell_taxonomy, fit_bags, rule=rule,
                               positive=positive, seed=seed, miss_rate=miss_rate,
                               miss_confidence=miss_confidence, **dict(params or {}))
    probs = fitted.predict_proba(scored)
    metrics = patient_metrics(taxonomy, [b.label for b in scored], probs,
                              fitted.diagnose(probs), positive=fitted.positive,
                              threshold=fitted.threshold)
    metrics |= {"model": name, "threshold": fitted.threshold, "threshold_rule": fitted.rule,
                "train_patients": len(fit_bags)}
    if fitted.miss_rate is not None and scored:
        promise = fitted.miss_rate
        metrics["miss_rate"] = miss_rate_metrics(
            fitted.calls(probs), np.array([b.label == fitted.positive for b in scored]),
            promise.alpha, promise.confidence) | {"miss_threshold": promise.threshold}
    if log is not None:
        auroc = f", AUROC {metrics['auroc']:.3f}" if "auroc" in metrics else ""
        log(f"patient model '{name}': {metrics['n_patients']} validation patients, accuracy "
            f"{metrics['accuracy']:.3f}{auroc}"
            + (f", threshold {fitted.threshold:.3f}" if fitted.threshold is not None else "")
            + _promise_text(fitted))
    return PatientStage(fitted, metrics)


def _promise_text(fitted: FittedPatientModel) -> str:
    """``, called negative below 0.120 (miss rate <= 10% with 90% confidence)`` or ``""``."""
    low, promise = fitted.negative_below(), fitted.miss_rate
    if low is None or promise is None:
        return ""
    return (f", called negative below {low:.3f} (miss rate <= {100 * promise.alpha:g}% with "
            f"{100 * promise.confidence:g}% confidence)")
