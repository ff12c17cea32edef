"""A cross-validation folder as one predictor: the fold models averaged (as DeepAPL
applied its cross-validation models to new patients).

Every fold's cell model describes each cell; the cell-level probabilities are averaged.
When the folds carry patient-level models, each fold's patient model diagnoses the
patient from its own cell model's outputs, the probabilities are averaged, and the
decision threshold is the mean of the folds' thresholds (each chosen inside the CV on
that fold's training patients only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.inference.predictor import Predictor
from leukotree.models import ModelConfig
from leukotree.patients.bags import Bag
from leukotree.patients.fit import FittedPatientModel
from leukotree.taxonomy import Taxonomy

#: Per-member outputs an ensemble adds (concatenated member by member).
MEMBER_KEYS = ("leaf_probs", "features", "cell_probs")


class EnsemblePatientModel:
    """The members' patient models, each on its own member's outputs; probabilities
    averaged, threshold the members' mean. Behaves as a :class:`FittedPatientModel`."""

    name = "ensemble"

    def __init__(self, members: Sequence[FittedPatientModel], widths: list[dict[str, int]],
                 ) -> None:
        self.members = list(members)
        self.widths = widths
        first = self.members[0]
        self.positive, self.rule = first.positive, first.rule
        thresholds = [m.threshold for m in self.members if m.threshold is not None]
        self.threshold = float(np.mean(thresholds)) if thresholds else None
        self.model = self  # reports read fitted.model.name and fitted.model.cell_weights
        self.name = f"ensemble of {len(self.members)} x {first.model.name}"

    @property
    def taxonomy(self) -> Taxonomy:
        return self.members[0].taxonomy

    def _member_bags(self, bags: Sequence[Bag], i: int) -> list[Bag]:
        out = []
        for bag in bags:
            parts = {}
            for key in MEMBER_KEYS:
                if key in bag.extras:
                    start = sum(w[key] for w in self.widths[:i])
                    parts[key] = bag.extras[key][:, start:start + self.widths[i][key]]
            out.append(Bag(bag.patient, parts["leaf_probs"], parts.get(
                "features", np.zeros((len(bag), 0))), parts.get("cell_probs"), bag.cells,
                bag.label))
        return out

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.mean([m.predict_proba(self._member_bags(bags, i))
                        for i, m in enumerate(self.members)], axis=0)

    def diagnose(self, probs: np.ndarray) -> list[str]:
        return FittedPatientModel.diagnose(self, probs)  # type: ignore[arg-type]

    def cell_weights(self, bag: Bag) -> np.ndarray:
        return np.mean([m.model.cell_weights(self._member_bags([bag], i)[0])
                        for i, m in enumerate(self.members)], axis=0)


def _same_view(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two models crop an image alike (crop, crop mode, physical field and the
    input pixel size an adapted model keeps)."""
    def close(x: float | None, y: float | None) -> bool:
        return (x is None) == (y is None) and (x is None or math.isclose(x, y, rel_tol=1e-6))

    return (close(a.crop_fraction, b.crop_fraction) and a.crop_mode == b.crop_mode
            and close(a.pixel_size, b.pixel_size) and close(a.field_um, b.field_um)
            and close(a.input_pixel_size, b.input_pixel_size))


class EnsemblePredictor:
    """Several predictors of one taxonomy and image geometry, averaged."""

    def __init__(self, members: Sequence[Predictor], source: str) -> None:
        if not members:
            raise LeukotreeError(f"'{source}' holds no fold models to combine.")
        first = members[0]
        for m in members[1:]:
            same = (m.taxonomy == first.taxonomy
                    and m.model_config.img_size == first.model_config.img_size
                    and _same_view(m.model_config, first.model_config))
            if not same:
                raise LeukotreeError(f"The fold models of '{source}' differ in taxonomy, image "
                                     "size or crop; they cannot be averaged.")
        self.members = list(members)
        self.taxonomy: Taxonomy = first.taxonomy
        self.model_config: ModelConfig = first.model_config
        self.cell_taxonomy = first.cell_taxonomy
        self.engine = f"ensemble of {len(members)} ({first.engine})"
        self.expected_ood = float(np.mean([m.expected_ood for m in members]))
        self.widths: list[dict[str, int]] = []
        fitted = [m.patient_model for m in members]
        self.patient_model = (EnsemblePatientModel(fitted, self.widths)  # type: ignore[arg-type]
                              if all(f is not None for f in fitted) else None)

    def outputs(self, pixels: np.ndarray) -> dict[str, Any]:
        each = [m.outputs(pixels) for m in self.members]
        if not self.widths:
            self.widths.extend({k: o[k].shape[1] for k in MEMBER_KEYS if k in o}
                               for o in each)
        out = {"leaf_probs": np.mean([o["leaf_probs"] for o in each], axis=0)}
        for key in ("cell_probs", "ood_score"):
            if all(key in o for o in each):
                out[key] = np.mean([o[key] for o in each], axis=0)
        for key in MEMBER_KEYS:
            if all(key in o for o in each):
                out[f"member_{key}"] = np.concatenate([o[key] for o in each], axis=1)
        return out

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.outputs(pixels)["leaf_probs"]
