"""Patient-level diagnosis: bags of cells, patient models (vote, mean, fraction,
differential, attention MIL), thresholds chosen inside the training data, and
patient-level metrics."""

from leukotree.patients.bags import Bag, make_bags, patient_labels
from leukotree.patients.fit import FittedPatientModel, fit_patient_model, patient_metrics
from leukotree.patients.models import PATIENT_MODELS, PatientModel

__all__ = ["PATIENT_MODELS", "Bag", "FittedPatientModel", "PatientModel", "fit_patient_model",
           "make_bags", "patient_labels", "patient_metrics"]
