"""``leukotree evaluate``: metrics, tables, plots and predictions of a model on data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.data.discover import Sample, discover
from leukotree.errors import LeukotreeError
from leukotree.evaluation.coverage import conformal_section
from leukotree.inference.decisions import decide_patients, domain_shift
from leukotree.inference.loader import LoadedModel, load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predictor import Predictions, Predictor, TorchPredictor, predict_paths
from leukotree.metrics import (
    binary_metrics,
    classification_metrics,
    reliability_bins,
    threshold_for_sensitivity,
)
from leukotree.patients.bags import patient_labels
from leukotree.patients.fit import FittedPatientModel, patient_metrics
from leukotree.patients.guarantee import miss_rate_metrics
from leukotree.report import plots
from leukotree.report.html import write_document
from leukotree.report.tables import metrics_document
from leukotree.rundir import EvalDir, write_csv, write_json
from leukotree.taxonomy import Taxonomy
from leukotree.tree import decode_argmax


@dataclass
class EvalSettings:
    """What only ``evaluate`` decides: the binary threshold (given, or reaching
    ``target_sensitivity`` on the run's validation split) and positive leaf, and whether
    to show progress. How the model reads the images and aggregates patients are its
    :class:`~leukotree.inference.options.InferenceOptions`."""

    threshold: float | None = None
    target_sensitivity: float | None = None
    positive: str | None = None
    progress: bool = True


def binary_block(taxonomy: Taxonomy, truth: list[str], probs: np.ndarray, threshold: float,
                 positive: str) -> dict[str, Any]:
    k = taxonomy.leaf_index[positive]
    exact = taxonomy.encode_leaves(truth) >= 0
    y = np.array([t == positive for t in truth])[exact]
    out = binary_metrics(probs[exact, k], y, threshold)
    out["positive"] = positive
    return out


def evaluate(
    run: str | Path,
    data: str | Path,
    out: str | Path,
    options: InferenceOptions | None = None,
    settings: EvalSettings | None = None,
    *,
    patients: str = "auto",
    labels: str = "folder",
) -> dict[str, Any]:
    """Evaluate the model of ``run`` (a run folder or checkpoint; a cv or ensemble folder,
    its members averaged) on ``data``, read and aggregated as ``options`` say (decoding
    view, batches, test-time augmentation, patient aggregation; the engine is always
    PyTorch, whose raw outputs give the ECE before calibration); write metrics.json,
    metrics.md, metrics.html, predictions.csv and the figures into ``out`` (an
    :class:`~leukotree.rundir.EvalDir`). The ECE before calibration is given for a single
    model only; a model with conformal answers gets a ``conformal`` section
    (:mod:`leukotree.evaluation.coverage`)."""
    options = options or InferenceOptions()
    settings = settings or EvalSettings()
    check_settings(settings)
    run = Path(run)
    loaded = load(run)
    if settings.target_sensitivity is not None:  # picked on the run's validation images
        loaded.run_dir(". Give --threshold instead.")
    predictor = loaded.predictor("torch")
    # one model: its raw outputs give the ECE before calibration
    model = predictor.model if isinstance(predictor, TorchPredictor) else None
    view = options.input_config(predictor.model_config, source=run)
    taxonomy: Taxonomy = predictor.taxonomy
    sample_set = discover(data, taxonomy, patients=patients, labels=labels)
    sample_set.raise_for_problems()
    samples = sample_set.samples
    preds = predict_paths(predictor, [s.path for s in samples],
                          batch_size=options.batch_size, workers=options.workers,
                          progress=settings.progress, on_error="raise", tta=options.tta,
                          max_pixels=options.max_pixels,
                          pixel_sizes=[s.pixel_size for s in samples], config=view)
    probs = preds.leaf_probs.astype(np.float64)
    truth = [s.label for s in samples]
    metrics = classification_metrics(taxonomy, truth, probs)
    metrics["model"] = str(run)
    metrics["data"] = str(data)
    if metrics["leaves_absent"]:
        metrics["note"] = (f"{len(metrics['leaves_absent'])} leaves have no image in these data "
                           f"({', '.join(metrics['leaves_absent'])}); metrics cover the "
                           "leaves present.")
    uncalibrated = _uncalibrated(model, taxonomy, truth, preds, metrics)
    if preds.ood_score is not None:
        metrics["ood"] = ood_metrics(taxonomy, truth, probs, preds.unclassifiable,
                                     predictor.expected_ood)
    if len(taxonomy.leaves) == 2:
        metrics["binary"] = _binary_section(loaded, predictor, truth, probs, options,
                                            settings)
    metrics["patient_level"] = patient_level(taxonomy, samples, probs, options, preds,
                                             predictor.patient_model,
                                             positive=settings.positive)
    where = EvalDir(out)
    where.path.mkdir(parents=True, exist_ok=True)
    metrics["figures"] = write_figures(taxonomy, truth, probs, metrics, where.path,
                                       uncalibrated)
    if predictor.conformal is not None:  # the model's answers, with their coverage
        metrics["conformal"], figure = conformal_section(
            loaded, predictor, truth, probs, [s.patient for s in samples],
            bool((metrics.get("ood") or {}).get("domain_shift")), where.path,
            batch_size=options.batch_size, tta=options.tta)
        if figure is not None:
            metrics["figures"]["coverage"] = figure
    write_json(where.metrics, metrics)
    write_document(metrics_document(metrics), where.markdown)
    write_predictions(where.predictions, taxonomy, samples, probs)
    return metrics


def _uncalibrated(model: Any, taxonomy: Taxonomy, truth: list[str], preds: Predictions,
                  metrics: dict[str, Any]) -> np.ndarray | None:
    """A calibrated single model's own outputs before its temperatures and distance
    softening (None otherwise); their calibration and the temperatures go into
    ``metrics["calibration"]``."""
    raw = preds.extras.get("leaf_probs_raw")
    if model is None or model.temperature is None or raw is None:
        return None
    tempered = model.temperature
    uncalibrated = raw.astype(np.float64)
    before = classification_metrics(taxonomy, truth, uncalibrated).get("calibration", {})
    metrics.setdefault("calibration", {})["temperatures"] = tempered.temperatures
    if tempered.distance_power and preds.ood_score is not None:
        metrics["calibration"]["distance_power"] = tempered.distance_power
    metrics["calibration"]["uncalibrated"] = before.get("leaves")
    return uncalibrated


def check_settings(settings: EvalSettings) -> None:
    """Refuse impossible settings before any image is read (the inference options check
    themselves when made: :class:`~leukotree.inference.options.InferenceOptions`)."""
    if settings.threshold is not None and not 0 <= settings.threshold <= 1:
        raise LeukotreeError(f"The 'threshold' parameter must be in [0, 1]; got "
                             f"{settings.threshold!r}.")
    if settings.target_sensitivity is not None and not 0 < settings.target_sensitivity <= 1:
        raise LeukotreeError(f"The 'target_sensitivity' parameter must be in (0, 1]; got "
                             f"{settings.target_sensitivity!r}.")


def _binary_section(loaded: LoadedModel, predictor: Predictor, truth: list[str], probs: np.ndarray,
                    options: InferenceOptions, settings: EvalSettings) -> dict[str, Any]:
    """The binary block at a given threshold, 0.5, or the threshold reaching a target
    sensitivity on the run's own validation split."""
    taxonomy = predictor.taxonomy
    positive = settings.positive or taxonomy.leaves[0]
    if positive not in taxonomy.leaf_index:
        raise LeukotreeError(f"--positive '{positive}' is not a leaf of taxonomy "
                             f"'{taxonomy.name}' ({', '.join(taxonomy.leaves)}).")
    threshold, source = 0.5, "default"
    if settings.threshold is not None:
        threshold, source = settings.threshold, "given"
    elif settings.target_sensitivity is not None:
        val = loaded.run_dir(". Give --threshold instead.").read_split("val")
        vp = predict_paths(predictor, [Path(r["path"]) for r in val], progress=False,
                           on_error="raise", batch_size=options.batch_size, tta=options.tta)
        k = taxonomy.leaf_index[positive]
        threshold = threshold_for_sensitivity(
            vp.leaf_probs[:, k], np.array([r["label"] == positive for r in val]),
            settings.target_sensitivity)
        source = f"sensitivity >= {settings.target_sensitivity} on the run's validation split"
    block = binary_block(taxonomy, truth, probs, threshold, positive)
    block["threshold_source"] = source
    return block


def patient_level(taxonomy: Taxonomy, samples: list[Sample], probs: np.ndarray,
                  options: InferenceOptions, preds: Predictions | None = None,
                  fitted: FittedPatientModel | None = None, *, positive: str | None = None,
                  ) -> dict[str, Any] | None:
    """Patient-level metrics when every patient has one label, of the decisions of
    :func:`~leukotree.inference.decisions.decide_patients` (as ``predict``: the run's
    patient model when it has one, with its own threshold, else ``options.aggregate``,
    patients with fewer than ``options.min_cells`` cells insufficient;
    unclassifiable cells left out): the metrics rank patients by the patient model's
    probabilities; for two leaves also the AUROC with a patient-bootstrap 95% CI, of
    ``positive`` (default: the first leaf) unless the patient model has its own; for a
    model that promises a miss rate, what the promise held to
    (:func:`~leukotree.patients.guarantee.miss_rate_metrics`)."""
    patients = [s.patient for s in samples]
    if not any(patients):
        return None
    try:
        truth = patient_labels(taxonomy, patients, [s.label for s in samples])
    except LeukotreeError as err:
        return {"skipped": str(err)}
    decisions = decide_patients(
        taxonomy, patients, probs, thresholds=[0.0] * taxonomy.max_depth,
        classified=None if preds is None else preds.classified,
        features=None if preds is None else preds.features,
        cell_probs=None if preds is None else preds.cell_probs,
        extras=None if preds is None else preds.member_arrays(),
        model=fitted if preds is not None else None, aggregate=options.aggregate,
        min_cells=options.min_cells)
    decided = [d for d in decisions if not d.insufficient]
    out: dict[str, Any] = {"method": options.aggregate, "min_cells": options.min_cells,
                           "n_patients": len(truth),  # with those left without a cell
                           "insufficient": sorted(set(truth) - {d.patient for d in decided})}
    if not decided:
        return out
    p_probs = np.stack([d.scores for d in decided])
    diagnoses = [d.leaf for d in decided]
    if fitted is not None and preds is not None:
        out |= {"method": f"patient model '{fitted.model.name}'", "threshold": fitted.threshold,
                "threshold_rule": fitted.rule}
        positive = fitted.positive
    else:
        positive = (positive or taxonomy.leaves[0]) if len(taxonomy.leaves) == 2 else None
    p_truth = [truth[d.patient] for d in decided]
    out.update(classification_metrics(taxonomy, p_truth, p_probs))
    out.update({f"patient_{k}": v for k, v in patient_metrics(
        taxonomy, p_truth, p_probs, diagnoses, positive=positive,
        threshold=decided[0].threshold).items()})
    out["accuracy"] = out["patient_accuracy"]  # of the diagnoses made (thresholded)
    if fitted is not None and preds is not None and fitted.miss_rate is not None:
        out["miss_rate"] = miss_rate_metrics(
            [d.call for d in decided], np.array([t == positive for t in p_truth]),
            fitted.miss_rate.alpha, fitted.miss_rate.confidence) | {
                "miss_threshold": fitted.miss_rate.threshold}
    out["patients"] = {d.patient: {"truth": t, "decision": d.leaf, "n_cells": d.n_cells,
                                   "call": d.call,
                                   **{f"p_{leaf}": float(v) for leaf, v in zip(
                                       taxonomy.leaves, d.scores, strict=True)}}
                       for d, t in zip(decided, p_truth, strict=True)}
    return out


def ood_metrics(taxonomy: Taxonomy, truth: list[str], probs: np.ndarray,
                flagged: np.ndarray, expected: float) -> dict[str, Any]:
    """How many cells the model calls unclassifiable, the tree accuracy of the cells it
    keeps and of those it flags, and the domain-shift alarm (if raised)."""
    mask = taxonomy.leaf_mask(truth)
    hit = mask[np.arange(len(truth)), probs.argmax(1)]
    return {"flagged": int(flagged.sum()), "rate": float(flagged.mean()) if len(truth) else 0.0,
            "expected_rate": expected,
            "accuracy_kept": float(hit[~flagged].mean()) if (~flagged).any() else None,
            "accuracy_flagged": float(hit[flagged].mean()) if flagged.any() else None,
            "domain_shift": domain_shift(flagged, expected)}


def write_figures(taxonomy: Taxonomy, truth: list[str], probs: np.ndarray,
                  metrics: dict[str, Any], out: Path,
                  uncalibrated: np.ndarray | None = None) -> dict[str, str]:
    figures: dict[str, str] = {}
    if "confusion_matrix" not in metrics:
        return figures
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    leaves = list(taxonomy.leaves)
    exact = taxonomy.encode_leaves(truth)
    keep = exact >= 0
    for name, path in (
        ("confusion", plots.confusion(matrix, leaves, out / EvalDir.CONFUSION,
                                      normalize=False)),
        ("confusion_normalized", plots.confusion(matrix, leaves,
                                                 out / EvalDir.CONFUSION_NORMALIZED,
                                                 normalize=True)),
        ("roc", plots.roc_curves(exact[keep], probs[keep], leaves, out / EvalDir.ROC)),
        ("reliability", plots.reliability(
            reliability_bins(probs[keep], exact[keep]), out / EvalDir.RELIABILITY,
            before=None if uncalibrated is None
            else reliability_bins(uncalibrated[keep], exact[keep]))),
    ):
        if path is not None:
            figures[name] = path.name
    return figures


def write_predictions(path: Path, taxonomy: Taxonomy, samples: list[Sample],
                      probs: np.ndarray) -> None:
    """``path,label,patient,predicted,p_<leaf>...`` for every image."""
    pred = decode_argmax(taxonomy, probs)
    rows = [{"path": str(s.path), "label": s.label, "patient": s.patient or "", "predicted": p,
             **{f"p_{leaf}": f"{v:.6f}" for leaf, v in zip(taxonomy.leaves, row, strict=True)}}
            for s, p, row in zip(samples, pred, probs, strict=True)]
    write_csv(path, rows, ["path", "label", "patient", "predicted",
                           *[f"p_{leaf}" for leaf in taxonomy.leaves]])
