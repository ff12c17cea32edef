"""Post-training fits as stages of their own (:mod:`.stages`, :mod:`.patients`)."""

from leukotree.calibrate.patients import (
    LabelledCells,
    PatientStage,
    fit_patient_stage,
)
from leukotree.calibrate.stages import (
    Calibration,
    OodReference,
    fit_calibration,
    fit_ood_reference,
)

__all__ = ["Calibration", "LabelledCells", "OodReference", "PatientStage", "fit_calibration",
           "fit_ood_reference", "fit_patient_stage"]
