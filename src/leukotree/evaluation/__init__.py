"""Evaluation: metrics (flat, hierarchical, per node, calibration, binary), ``evaluate``
on data, patient-grouped cross-validation and side-by-side comparisons."""
