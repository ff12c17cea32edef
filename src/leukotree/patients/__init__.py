"""Patient-level diagnosis: bags of cells, patient models (vote, mean, fraction,
differential, attention MIL), thresholds chosen inside the training data, and
patient-level metrics.

The names below are imported on first use, so that reading the patient-model registry
(:data:`~leukotree.patients.models.PATIENT_MODELS`, which the training options list)
imports neither PyTorch nor scikit-learn.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Bag": "bags", "make_bags": "bags", "patient_labels": "bags",
    "FittedPatientModel": "fit", "fit_patient_model": "fit", "patient_metrics": "fit",
    "PATIENT_MODELS": "models", "PatientModel": "models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'leukotree.patients' has no attribute {name!r}")
    return getattr(import_module(f"leukotree.patients.{_EXPORTS[name]}"), name)
