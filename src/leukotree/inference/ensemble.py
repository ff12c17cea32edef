"""Several models as one predictor: the fold models of a cross-validation folder (as
DeepAPL applied its cross-validation models to new patients), or the runs of an ensemble
folder (:func:`make_ensemble`: a deep ensemble, Lakshminarayanan et al. 2017, e.g. one
recipe trained with several seeds; written by :func:`~leukotree.inference.loader.
make_ensemble`) averaged.

Every member's cell model describes each cell; the cell-level probabilities (each
member calibrated as stored) are averaged, and so are the out-of-distribution scores
(each 1 at its own member's threshold): a cell is unclassifiable when the members' mean
score passes 1. When the members carry patient-level models, each member's patient model
diagnoses the patient from its own cell model's outputs, the probabilities are averaged,
and the decision threshold is the mean of the members' thresholds (each chosen on that
member's training patients only).
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
        # The members' miss-rate thresholds were tested on their own scores, not on the
        # averaged ones: an ensemble promises no miss rate.
        self.miss_rate = None
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

    def negative_below(self) -> float | None:
        return None

    def calls(self, probs: np.ndarray) -> list[str]:
        return FittedPatientModel.calls(self, probs)  # type: ignore[arg-type]

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


def _difference(a: Predictor, b: Predictor) -> str | None:
    """What keeps two models from being averaged (None: nothing)."""
    pa, pb = a.patient_model, b.patient_model
    checks = (
        ("taxonomy", a.taxonomy == b.taxonomy),
        ("image size", a.model_config.img_size == b.model_config.img_size),
        ("crop (crop fraction, crop mode or pixel size)",
         _same_view(a.model_config, b.model_config)),
        ("cell-type head (cell taxonomy)", a.cell_taxonomy == b.cell_taxonomy),
        ("patient model", (pa is None) == (pb is None) and (
            pa is None or (pa.model.name, pa.positive) == (pb.model.name, pb.positive))),
    )
    return next((what for what, same in checks if not same), None)


class EnsemblePredictor:
    """Several predictors of one taxonomy and image geometry, averaged."""

    def __init__(self, members: Sequence[Predictor], source: str,
                 names: Sequence[str] | None = None) -> None:
        if not members:
            raise LeukotreeError(f"'{source}' holds no models to combine.")
        names = list(names or (f"model {i + 1}" for i in range(len(members))))
        first = members[0]
        for name, m in zip(names[1:], members[1:], strict=True):
            differ = _difference(first, m)
            if differ:
                raise LeukotreeError(f"The models of '{source}' differ in {differ} ("
                                     f"'{names[0]}' and '{name}'); they cannot be averaged.")
        self.members = list(members)
        self.taxonomy: Taxonomy = first.taxonomy
        self.model_config: ModelConfig = first.model_config
        self.cell_taxonomy = first.cell_taxonomy
        self.engine = f"ensemble of {len(members)} ({first.engine})"
        self.expected_ood = float(np.mean([m.expected_ood for m in members]))
        # each member's conformal threshold was fitted on its own outputs, not on their
        # average: the average has no guarantee until fitted again
        self.conformal = None
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
