"""A patient as a bag of cells: what a cell model said of each cell, grouped by patient.

A :class:`Bag` holds, for every readable cell of one patient, the cell model's leaf
probabilities (the diagnosis tree), its cell-type probabilities (when the model has a
cell-type head) and its pooled features. Patient-level models
(:mod:`leukotree.patients.models`) map a bag to the probability of each diagnosis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy


@dataclass
class Bag:
    """The cells of one patient."""

    patient: str
    leaf_probs: np.ndarray  # (n_cells, n_leaves) of the diagnosis taxonomy
    features: np.ndarray  # (n_cells, D)
    cell_probs: np.ndarray | None = None  # (n_cells, n_cell_types)
    cells: list[str] = field(default_factory=list)  # file names, for reports
    label: str | None = None  # the patient's diagnosis (a leaf), when known
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. an ensemble's members

    def __len__(self) -> int:
        return len(self.leaf_probs)


def make_bags(patients: Sequence[str | None], leaf_probs: np.ndarray, features: np.ndarray,
              cell_probs: np.ndarray | None = None, names: Sequence[str] | None = None,
              labels: dict[str, str] | None = None,
              extras: dict[str, np.ndarray] | None = None) -> list[Bag]:
    """One bag per patient id (sorted); cells without a patient id are left out."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, patient in enumerate(patients):
        if patient is not None:
            rows[patient].append(i)
    return [Bag(patient, leaf_probs[idx], features[idx],
                None if cell_probs is None else cell_probs[idx],
                [names[i] for i in idx] if names is not None else [],
                (labels or {}).get(patient),
                {k: v[idx] for k, v in (extras or {}).items()})
            for patient, idx in sorted(rows.items())]


def patient_labels(taxonomy: Taxonomy, patients: Sequence[str | None],
                   labels: Sequence[str]) -> dict[str, str]:
    """Each patient's diagnosis: the one leaf its cells are labelled with.

    Cells labelled at an ancestor of that leaf agree with it; two different leaves for one
    patient is an error that names the patient (a diagnosis is per patient).
    """
    seen: dict[str, set[str]] = defaultdict(set)
    for patient, label in zip(patients, labels, strict=True):
        if patient is not None:
            seen[patient].add(taxonomy.resolve(label))
    out = {}
    for patient, found in seen.items():
        deepest = max(found, key=taxonomy.depth)
        if not taxonomy.is_leaf(deepest) or any(f not in taxonomy.path(deepest) for f in found):
            raise LeukotreeError(
                f"Patient '{patient}' has cells labelled {sorted(found)}; a patient-level "
                "model needs one diagnosis (a leaf) per patient. Fix the labels of that "
                "patient's cells.")
        out[patient] = deepest
    return out


def label_index(taxonomy: Taxonomy, bags: Sequence[Bag]) -> np.ndarray:
    """The leaf index of each bag's label."""
    missing = [b.patient for b in bags if b.label is None]
    if missing:
        raise LeukotreeError(f"{len(missing)} patient(s) have no diagnosis (e.g. "
                             f"'{missing[0]}'); a patient-level model needs one per patient.")
    return np.array([taxonomy.leaf_index[b.label] for b in bags], dtype=np.int64)
