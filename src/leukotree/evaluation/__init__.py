"""Evaluation: ``evaluate`` on data, patient-grouped cross-validation and side-by-side
comparisons. The metrics themselves are in :mod:`leukotree.metrics`, at the bottom of the
import graph, so the trainer and the patient models use them without importing this."""
