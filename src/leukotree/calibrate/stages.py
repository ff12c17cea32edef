"""Post-training fits as stages of their own: each reads a model's raw outputs of cells.

Like scikit-learn's ``CalibratedClassifierCV(cv="prefit")``, these wrap a fitted model
instead of reopening its training:

- :func:`fit_ood_reference`: the out-of-distribution reference, class means and shared
  precision of the *training* cells' features per backbone stage;
- :func:`fit_calibration`: on *labelled calibration cells* (the validation split at
  training time, a new lab's labelled sample later), the stage scales ``q_s`` and the
  threshold (the ``quantile`` of the distances), then the per-node temperatures and the
  power of the distance-aware softening, then (given a coverage) the conformal answers'
  threshold on the calibrated probabilities (:mod:`leukotree.inference.conformal`);
- :func:`fit_patient_stage`: the patient-level model on the calibrated outputs of
  labelled cells with patient ids, scored on a second set.

The outputs they read are a model's *raw* ones: ``leaf_probs`` before any fitted
temperature (a calibrated model gives them as ``leaf_logp_raw``), and ``features`` or,
for a multi-stage reference, ``stage_features``. The math is in
:mod:`leukotree.models.calibration`; a :class:`Calibration` holds the checkpoint sections
(``calibration``, ``ood``, ``conformal``) and a summary, and applies itself to other outputs as the
stored model will (:meth:`Calibration.apply`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from leukotree.errors import LeukotreeError
from leukotree.inference.conformal import (
    ConformalAnswers,
    achievable_alpha,
    answer_nodes,
    covered,
    fit_conformal,
)
from leukotree.metrics import expected_calibration_error
from leukotree.models.calibration import (
    FeatureDistance,
    apply_temperatures,
    distance_factor,
    fit_distance_power,
    fit_feature_distance,
    fit_stage_distance,
    fit_temperatures,
    ood_arrays,
    ood_section,
    soften,
    tree_nll,
)
from leukotree.taxonomy import Taxonomy

Log = Callable[[str], None]
#: Raw per-cell outputs: ``leaf_probs`` ``(N, n_leaves)``, ``features`` ``(N, D)``, and
#: ``stage_features`` ``(N, sum of widths)`` for a multi-stage reference.
Outputs = Mapping[str, np.ndarray]


def _quiet(_: str) -> None:
    return None


@dataclass
class OodReference:
    """Class means and precision matrices of the training cells' features: one array
    each (``stages`` 1: the pooled ``features``), or one per backbone stage (read from
    ``stage_features``)."""

    means: Any
    precision: Any
    classes: list[str]
    stages: int = 1

    @property
    def key(self) -> str:
        """The output this reference measures: ``features`` or ``stage_features``."""
        return self.key_of(self.stages)

    @staticmethod
    def key_of(stages: int) -> str:
        """The output a reference of ``stages`` backbone stages reads."""
        return "stage_features" if stages > 1 else "features"

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> OodReference:
        """The reference kept in a checkpoint's ``ood`` section."""
        arrays = ood_arrays(section)
        return cls(arrays["means"], arrays["precision"], list(section["classes"]),
                   arrays["stages"])


def fit_ood_reference(features: np.ndarray, labels: Sequence[str],
                      stage_widths: Sequence[int] = ()) -> OodReference:
    """Fit the reference on training cells: ``features`` their ``features`` (no or one
    stage width) or ``stage_features`` (the stages' ``stage_widths`` side by side)."""
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    if len(stage_widths) > 1:
        means, precision, classes = fit_stage_distance(features, labels, stage_widths)
        return OodReference(means, precision, classes, len(stage_widths))
    means, precision, classes = fit_feature_distance(features, labels)
    return OodReference(means, precision, classes, 1)


@dataclass
class Calibration:
    """What :func:`fit_calibration` fitted: the checkpoint sections (None: not fitted)
    and the figures to report."""

    taxonomy: Taxonomy
    calibration: dict[str, Any] | None = None
    ood: dict[str, Any] | None = None
    conformal: dict[str, Any] | None = None
    #: ``calibration``, ``ood`` (threshold, quantile, val_flagged, stages) and
    #: ``conformal`` (alpha, mode, thresholds, in-sample coverage) as a run's summary
    #: gives them.
    summary: dict[str, Any] = field(default_factory=dict)

    def sections(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~leukotree.models.checkpoint.update_checkpoint`:
        the sections fitted (one not fitted is left as the file has it)."""
        return {k: v for k, v in (("calibration", self.calibration), ("ood", self.ood),
                                  ("conformal", self.conformal)) if v is not None}

    def distance(self, outputs: Outputs) -> np.ndarray | None:
        """``ood_score`` ``(N,)`` of raw ``outputs`` (None without a fitted ``ood``)."""
        if self.ood is None:
            return None
        ref = OodReference.from_section(self.ood)
        with torch.no_grad():
            dist = FeatureDistance(ref.means, ref.precision, scales=self.ood.get("scales"))(
                torch.from_numpy(np.asarray(outputs[ref.key]))).numpy()
        return dist / self.ood["threshold"]

    def apply(self, outputs: Outputs) -> dict[str, np.ndarray]:
        """``outputs`` with ``ood_score`` added and ``leaf_probs`` calibrated, as the
        stored model gives them (the same NumPy path the fit used)."""
        out = dict(outputs)
        score = self.distance(outputs)
        if score is not None:
            out["ood_score"] = score
        if self.calibration is not None:
            out["leaf_probs"] = apply_temperatures(self.taxonomy, out["leaf_probs"],
                                                   self.calibration["temperatures"])
            power = self.calibration.get("distance_power", 0.0)
            if power:
                g = distance_factor(torch.from_numpy(out["ood_score"]), power,
                                    self.calibration["distance_ref"]).numpy()
                out["leaf_probs"] = soften(out["leaf_probs"], g)
        return out


def fit_calibration(taxonomy: Taxonomy, truth: Sequence[str], outputs: Outputs, *,
                    reference: OodReference | None = None, quantile: float = 0.0,
                    temperatures: bool = True, distance_temperature: bool = True,
                    coverage: float | None = None, conformal: str = "marginal",
                    strict: bool = True, log: Log = _quiet, cells: str = "validation",
                    groups: Sequence[str | None] | None = None) -> Calibration:
    """Fit on labelled calibration cells (``truth``, nodes of ``taxonomy``, and their raw
    ``outputs``): with a ``reference`` and ``quantile > 0``, the out-of-distribution
    threshold (:func:`fit_ood_threshold`); with ``temperatures``, the per-node
    temperatures and, when the cells have an ``ood_score`` and ``distance_temperature``
    is on, the distance softening (:func:`fit_temperature_section`); with ``coverage``,
    the conformal answers (``conformal``: marginal or mondrian) on the probabilities so
    calibrated (:func:`fit_conformal_section`; too few cells raise, or with ``strict``
    off log a warning and fit none; ``groups``: the cells' patient ids, the units the
    answers' risk is controlled over). ``log`` gets a line per fit, calling the cells
    ``cells``."""
    result = Calibration(taxonomy)
    if len(truth) != len(outputs["leaf_probs"]):
        raise ValueError(f"{len(truth)} labels for {len(outputs['leaf_probs'])} cells")
    score = None
    if reference is not None and quantile > 0 and reference.key in outputs:
        result.ood = fit_ood_threshold(reference, outputs[reference.key], quantile, log,
                                       cells)
        result.summary["ood"] = {k: result.ood[k]
                                 for k in ("threshold", "quantile", "val_flagged", "stages")}
        score = result.distance(outputs)
    if temperatures:
        result.calibration = result.summary["calibration"] = fit_temperature_section(
            taxonomy, truth, outputs["leaf_probs"],
            score if distance_temperature else None, log, cells)
    if coverage is not None:
        calibrated = result.apply(outputs)["leaf_probs"]
        try:
            result.conformal = fit_conformal_section(taxonomy, truth, calibrated, coverage,
                                                     conformal, log, cells, groups)
        except LeukotreeError as err:
            if strict:
                raise
            log(f"warning: no conformal answers stored: {err}")
        if result.conformal is not None:
            result.summary["conformal"] = result.conformal
    return result


def fit_conformal_section(taxonomy: Taxonomy, truth: Sequence[str], probs: np.ndarray,
                          coverage: float, mode: str = "marginal", log: Log = _quiet,
                          cells: str = "validation",
                          groups: Sequence[str | None] | None = None) -> dict[str, Any]:
    """The checkpoint's ``conformal`` section: :class:`ConformalAnswers` fitted at
    ``alpha = 1 - coverage`` on the cells' *calibrated* leaf ``probs``, with the share of
    these cells covered (in-sample), their mean number of answer leaves and
    ``achievable_alpha`` ``1 / (n + 1)``."""
    answers = fit_conformal(taxonomy, truth, probs, 1 - coverage, mode, cells, groups)
    section = answers.to_dict() | conformal_figures(taxonomy, truth, probs, answers)
    section["achievable_alpha"] = achievable_alpha(len(truth))
    log(f"conformal answers ({mode}, coverage {coverage:g}): threshold "
        + (f"{next(iter(answers.thresholds.values())):.3f}" if mode == "marginal"
           else "per class")
        + (f" over {answers.patients} patients" if answers.patients else "")
        + f"; {section['coverage']:.1%} of the {cells} cells covered, "
        f"{section['leaf_share']:.1%} answered with a leaf (fitted on these cells)")
    return section


def conformal_figures(taxonomy: Taxonomy, truth: Sequence[str], probs: np.ndarray,
                      answers: ConformalAnswers) -> dict[str, float]:
    """On labelled cells: ``coverage`` (share whose answer holds their class),
    ``mean_leaves`` (answer leaves per cell) and ``leaf_share`` (answers that are a
    leaf)."""
    nodes = answer_nodes(taxonomy, probs, answers)
    sizes = np.array([len(taxonomy.descendant_leaves(n)) for n in nodes])
    return {"coverage": float(covered(taxonomy, truth, nodes).mean()),
            "mean_leaves": float(sizes.mean()), "leaf_share": float((sizes == 1).mean())}


def fit_ood_threshold(reference: OodReference, features: np.ndarray, quantile: float,
                      log: Log = _quiet, cells: str = "validation") -> dict[str, Any]:
    """The checkpoint's ``ood`` section: the ``reference``, each stage's scale ``q_s``
    (the ``quantile`` of its distances ``d_s`` on these cells) and the threshold (the
    ``quantile`` of ``D = sum_s d_s / q_s``); ``val_flagged`` the share of these cells
    above it."""
    if not 0 < quantile < 1:
        raise LeukotreeError(f"The 'ood_quantile' parameter must be in (0, 1); got "
                             f"{quantile!r}.")
    stages = reference.stages
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(features))
        per_stage = FeatureDistance(reference.means, reference.precision).block_distances(
            x).numpy()
        scales = np.quantile(per_stage, quantile, axis=0).tolist() if stages > 1 else None
        dist = FeatureDistance(reference.means, reference.precision, scales=scales)(x).numpy()
    threshold = float(np.quantile(dist, quantile))
    flagged = float((dist > threshold).mean())
    log(f"out-of-distribution score ({stages} backbone stage{'s' if stages > 1 else ''}): "
        f"threshold {threshold:.1f} (flags {flagged:.1%} of the {cells} cells)")
    return ood_section(reference.means, reference.precision, reference.classes, threshold,
                       quantile, flagged, scales=scales, stages=stages)


def fit_temperature_section(taxonomy: Taxonomy, truth: Sequence[str], raw: np.ndarray,
                            ood_score: np.ndarray | None = None, log: Log = _quiet,
                            cells: str = "validation") -> dict[str, Any]:
    """The checkpoint's ``calibration`` section: per-node temperatures fitted on the
    cells' ``raw`` leaf probabilities, then, given their ``ood_score``, the power of the
    distance-aware softening; with the leaf ECE and the tree NLL before and after."""
    temps = fit_temperatures(taxonomy, truth, raw)
    after = apply_temperatures(taxonomy, raw, temps)
    power, ref = 0.0, 1.0
    if ood_score is not None:
        power, ref = fit_distance_power(taxonomy, truth, after, ood_score)
    if power:
        g = distance_factor(torch.from_numpy(ood_score), power, ref).numpy()
        after = soften(after, g)
    ece = (leaf_ece(taxonomy, truth, raw), leaf_ece(taxonomy, truth, after))
    section = {"temperatures": temps, "ece_before": ece[0], "ece_after": ece[1],
               "nll_before": tree_nll(taxonomy, truth, raw),
               "nll_after": tree_nll(taxonomy, truth, after), "fitted_on": len(truth)}
    if power:
        section |= {"distance_power": power, "distance_ref": ref}
    log("calibration: temperature " + ", ".join(f"{n} {t:.2f}" for n, t in temps.items())
        + (f", softened by (ood score / {ref:.2f}) ^ {power:.2f} per cell" if power else "")
        + f"; {cells} leaf ECE {ece[0]:.3f} -> {ece[1]:.3f} (fitted on these cells)")
    return section


def leaf_ece(taxonomy: Taxonomy, truth: Sequence[str], probs: np.ndarray) -> float:
    """Expected calibration error of the cells labelled with a leaf (inner-node labels
    left out)."""
    leaf = [i for i, t in enumerate(truth) if t in taxonomy.leaf_index]
    y = np.array([taxonomy.leaf_index[truth[i]] for i in leaf])
    return expected_calibration_error(probs[leaf], y)
