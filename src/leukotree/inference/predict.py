"""``leukotree predict``: per-image tree probabilities with referral, per-patient diagnoses.

The rules are those of :mod:`leukotree.inference.decisions`; this module runs a
predictor over the inputs and lays the decisions out as rows (CSV or JSON).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.data.discover import InputImage, collect_inputs
from leukotree.errors import LeukotreeError, display_path
from leukotree.inference.conformal import (
    ConformalAnswers,
    answer_leaves,
    answer_nodes,
    check_cells,
    fit_conformal,
)
from leukotree.inference.decisions import (
    PatientDecision,
    calibrate_thresholds,
    decide,
    decide_patients,
    domain_shift,
    parse_thresholds,
    referral_message,
)
from leukotree.inference.evidence import (
    Evidence,
    EvidenceSettings,
    patient_evidence,
    refer_thin,
)
from leukotree.inference.loader import LoadedModel, load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predictor import Predictions, Predictor, predict_paths
from leukotree.patients.fit import FittedPatientModel
from leukotree.rundir import write_csv
from leukotree.taxonomy import Taxonomy
from leukotree.tree import node_probabilities


@dataclass
class PredictResult:
    """What ``predict`` found: the inputs, their predictions and the thresholds used."""

    taxonomy: Taxonomy
    images: list[InputImage]
    predictions: Predictions
    thresholds: list[float]
    engine: str
    engine_note: str | None = None
    not_used: list[Path] = field(default_factory=list)  # hidden files, files not images
    patient_model: FittedPatientModel | None = None
    cell_taxonomy: Taxonomy | None = None
    #: Share of the model's validation cells it flags as unclassifiable.
    expected_ood: float = 0.05
    #: The conformal answers applied (the model's own, or fitted again with
    #: ``--coverage``); None: no ``answer_node`` column.
    conformal: ConformalAnswers | None = None

    def domain_shift(self) -> str | None:
        """The domain-shift alarm for these inputs (:func:`~.decisions.domain_shift`)."""
        if self.predictions.ood_score is None:
            return None
        ok = self.predictions.ok
        return domain_shift(self.predictions.unclassifiable[ok], self.expected_ood)


def run_predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    options: InferenceOptions | None = None,
    *,
    patients: str = "none",
    target_error: float | None = None,
    progress: bool = True,
) -> PredictResult:
    """Predict every input image of ``inputs`` with the model of ``run``
    (:func:`~leukotree.inference.loader.load`) as ``options`` say (engine, decoding view,
    batches, test-time augmentation: :class:`~leukotree.inference.options.
    InferenceOptions`); thresholds come from ``options.confidence`` or, with
    ``target_error``, from the run's validation split. Conformal answers are the model's
    own, or with ``options.coverage`` fitted again on the run's validation split."""
    options = options or InferenceOptions()
    loaded = load(run)
    if target_error is not None:  # refused before predicting when there is no split
        loaded.run_dir(". Give --confidence instead.")
    if options.coverage is not None:
        loaded.run_dir(_NO_SPLIT_COVERAGE)
    predictor = loaded.predictor(options.engine)
    view = options.input_config(predictor.model_config, source=run)
    if target_error is None:  # a bad --confidence is refused before any image is read
        parse_thresholds(options.confidence, predictor.taxonomy.max_depth)
    groups = None
    if options.coverage is not None:  # and too few validation cells for --coverage
        own = predictor.conformal.mode if predictor.conformal is not None else "marginal"
        split = loaded.run_dir(_NO_SPLIT_COVERAGE).read_split("val")
        groups = [r.get("patient") or None for r in split]  # validation_probs' order
        check_cells(predictor.taxonomy, [r["label"] for r in split], 1 - options.coverage,
                    options.conformal or own, "validation")
    found = collect_inputs(inputs, patients, predictor.taxonomy)
    images = found.images
    preds = predict_paths(predictor, [i.path for i in images], batch_size=options.batch_size,
                          workers=options.workers, progress=progress, on_error="report",
                          tta=options.tta, max_pixels=options.max_pixels,
                          pixel_sizes=[i.pixel_size for i in images], config=view)
    val = None
    if target_error is not None or options.coverage is not None:
        val = validation_probs(loaded, predictor, options.batch_size, options.tta)
    if target_error is not None:
        thresholds = calibrate_thresholds(predictor.taxonomy, val[0], val[1], target_error)
    else:
        thresholds = parse_thresholds(options.confidence, predictor.taxonomy.max_depth)
    answers = predictor.conformal
    if options.coverage is not None:
        own = predictor.conformal.mode if predictor.conformal is not None else "marginal"
        answers = fit_conformal(predictor.taxonomy, val[0], val[1], 1 - options.coverage,
                                options.conformal or own, "validation", groups)
    return PredictResult(predictor.taxonomy, images, preds, thresholds, predictor.engine,
                         loaded.engine_note, found.not_used, predictor.patient_model,
                         predictor.cell_taxonomy, predictor.expected_ood, answers)


_NO_SPLIT_COVERAGE = (". Conformal answers are fitted on one model's validation cells: give "
                      "one run folder for --coverage (a cv or ensemble folder's runs each "
                      "have their own; an ONNX file keeps the coverage it was exported with), "
                      "or leave --coverage out.")


def validation_probs(loaded: LoadedModel, predictor: Predictor, batch_size: int = 64,
                     tta: bool = False) -> tuple[list[str], np.ndarray]:
    """The labels and leaf probabilities (as ``predictor`` gives them: calibrated) of the
    run's validation split, on which ``--target-error`` and ``--coverage`` are fitted."""
    if (loaded.payload.get("extra") or {}).get("calibrated"):
        raise LeukotreeError(
            f"'{loaded.source}' was calibrated by 'leukotree calibrate' on cells it does not "
            "keep; its split.csv is the first lab's, so --target-error or --coverage would be "
            "fitted on the wrong lab's cells. Calibrate again with 'leukotree calibrate RUN "
            "DATA --out RUN2 --coverage C', or leave them out.")
    val = loaded.run_dir(". Give --confidence instead.").read_split("val")
    vp = predict_paths(predictor, [Path(r["path"]) for r in val], progress=False,
                       on_error="raise", batch_size=batch_size, tta=tta)
    return [r["label"] for r in val], vp.leaf_probs


def prediction_rows(result: PredictResult, decode: str = "argmax") -> list[dict[str, Any]]:
    """One row per input image: node probabilities, decoded leaf, referral, error and,
    when the model scores it, ``ood_score`` and ``unclassifiable`` (such a cell is
    referred with ``reported_node`` ``unclassifiable``); with conformal answers,
    ``answer_node`` and ``answer_leaves`` (its leaves joined by ``|``; empty for an
    unreadable image)."""
    taxonomy, preds = result.taxonomy, result.predictions
    node_p = node_probabilities(taxonomy, np.nan_to_num(preds.leaf_probs))
    flagged = preds.unclassifiable
    nodes = (None if result.conformal is None
             else answer_nodes(taxonomy, preds.leaf_probs, result.conformal))
    rows = []
    for i, img in enumerate(result.images):
        row: dict[str, Any] = {"path": display_path(img.path), "patient": img.patient or ""}
        if preds.errors[i] is not None:
            row.update({"predicted_leaf": "", "decoded_path": "", "reported_node": "",
                        "refer": "", "message": "", "error": preds.errors[i]})
            row.update({f"p_{n}": "" for n in taxonomy.nodes})
            if preds.ood_score is not None:
                row.update({"ood_score": "", "unclassifiable": ""})
            if nodes is not None:
                row.update({"answer_node": "", "answer_leaves": ""})
            rows.append(row)
            continue
        leaf, confident, refer, _ = decide(taxonomy, node_p[i], result.thresholds, decode)
        message = referral_message(taxonomy, leaf, confident, refer)
        if flagged[i]:
            confident, refer = "unclassifiable", True
            message = ("unclassifiable: unlike the training cells (out-of-distribution "
                       f"score {preds.ood_score[i]:.2f} > 1)")
        row.update({"predicted_leaf": leaf, "decoded_path": taxonomy.path_string(leaf),
                    "reported_node": confident, "refer": refer, "message": message,
                    "error": ""})
        row.update({f"p_{n}": round(float(node_p[i, taxonomy.node_index[n]]), 6)
                    for n in taxonomy.nodes})
        if preds.ood_score is not None:
            row.update({"ood_score": round(float(preds.ood_score[i]), 4),
                        "unclassifiable": bool(flagged[i])})
        if nodes is not None:
            row.update({"answer_node": nodes[i],
                        "answer_leaves": answer_leaves(taxonomy, [nodes[i]])[0]})
        rows.append(row)
    return rows


def patient_decisions(result: PredictResult, method: str, min_cells: int,
                      ) -> list[PatientDecision]:
    """One decision per patient (:func:`~.decisions.decide_patients`): from the run's
    patient-level model when it has one, else by the ``majority`` vote or the ``mean``.
    Unreadable and unclassifiable cells are left out."""
    preds = result.predictions
    if not any(img.patient for img in result.images):
        raise LeukotreeError("--by-patient needs patient ids: use --patients folder, cnmc, "
                             "re:<regex>, or a manifest with a 'patient' column.")
    return decide_patients(
        result.taxonomy, [img.patient for img in result.images], preds.leaf_probs,
        thresholds=result.thresholds, classified=preds.classified, features=preds.features,
        cell_probs=preds.cell_probs, extras=preds.member_arrays(),
        model=result.patient_model, aggregate=method, min_cells=min_cells)


def evidence_of(result: PredictResult, method: str,
                settings: EvidenceSettings | None = None) -> dict[str, Evidence]:
    """Each patient's evidence (:func:`~.evidence.patient_evidence`): the interval of its
    probabilities, its informative cells and its domain alarm."""
    preds = result.predictions
    return patient_evidence(
        result.taxonomy, [img.patient for img in result.images], preds.leaf_probs,
        readable=preds.ok, flagged=preds.unclassifiable, features=preds.features,
        cell_probs=preds.cell_probs, extras=preds.member_arrays(), model=result.patient_model,
        aggregate=method, cell_taxonomy=result.cell_taxonomy,
        expected_ood=result.expected_ood, settings=settings)


def _evidence_columns(taxonomy: Taxonomy, ev: Evidence) -> dict[str, Any]:
    """``p_<leaf>_low``, ``p_<leaf>_high`` (empty without an interval), ``n_informative``
    and ``domain_alarm``."""
    bounds = {}
    for k, leaf in enumerate(taxonomy.leaves):
        for name, values in (("low", ev.low), ("high", ev.high)):
            bounds[f"p_{leaf}_{name}"] = "" if values is None else round(float(values[k]), 4)
    return {**bounds, "n_informative": ev.n_informative, "domain_alarm": ev.alarm is not None}


def patient_rows(result: PredictResult, method: str, min_cells: int,
                 evidence: EvidenceSettings | None = None) -> list[dict[str, Any]]:
    """One row per patient: diagnosis, referral, the call (positive, negative or referred
    for a two-leaf patient model, else empty), ``p_<leaf>`` (the patient-level
    probability the diagnosis is made from), the differential count when the model has
    a cell-type head, the votes and mean cell probabilities, then the evidence
    (:mod:`~leukotree.inference.evidence`: each probability's interval, the informative
    cells, the patient's domain alarm; a patient whose evidence is too thin is referred,
    with the reason)."""
    taxonomy = result.taxonomy
    counts = differentials(result)
    preds = result.predictions
    flagged = preds.unclassifiable
    found = evidence_of(result, method, evidence)
    positive = None if result.patient_model is None else result.patient_model.positive
    out = []
    for d in patient_decisions(result, method, min_cells):
        d = refer_thin(taxonomy, d, found[d.patient], evidence, positive)
        extra = {}
        if preds.ood_score is not None:
            extra["n_unclassifiable"] = int(sum(
                flagged[k] for k, img in enumerate(result.images) if img.patient == d.patient))
        out.append({
            "patient": d.patient, "n_cells": d.n_cells, **extra,
            "diagnosis": d.leaf or "insufficient",
            "path": taxonomy.path_string(d.leaf) if d.leaf else "",
            "referred": d.refer, "reported_node": d.reported_node,
            "reason": d.reason,
            "model": d.model, "threshold": "" if d.threshold is None else round(d.threshold, 4),
            **{f"p_{leaf}": round(float(v), 4) for leaf, v in zip(
                taxonomy.leaves, d.probs, strict=True)},
            **counts.get(d.patient, {}),
            **{f"votes_{leaf}": round(float(v), 4) for leaf, v in zip(
                taxonomy.leaves, d.vote_shares, strict=True)},
            **{f"mean_p_{leaf}": round(float(v), 4) for leaf, v in zip(
                taxonomy.leaves, d.mean_probs, strict=True)},
            **_evidence_columns(taxonomy, found[d.patient]),
            "call": d.call,  # last: the columns before it keep their places
        })
    return out


def differentials(result: PredictResult) -> dict[str, dict[str, float]]:
    """Per patient, the share of cells of each predicted cell type (``cells_<type>``)
    among its readable, classifiable cells."""
    cells, preds = result.cell_taxonomy, result.predictions
    if cells is None or preds.cell_probs is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    ok = preds.classified
    for patient in sorted({i.patient for i in result.images if i.patient is not None}):
        rows = [k for k, img in enumerate(result.images) if img.patient == patient and ok[k]]
        if not rows:
            continue
        types = np.bincount(preds.cell_probs[rows].argmax(1), minlength=len(cells.leaves))
        out[patient] = {f"cells_{leaf}": round(float(n) / len(rows), 4)
                        for leaf, n in zip(cells.leaves, types, strict=True)}
    return out


def write_rows(rows: list[dict[str, Any]], out: Path | None, as_json: bool) -> str | None:
    """Write ``rows`` as CSV to ``out`` (when given); return them as JSON when asked."""
    if out is not None:
        write_csv(out, rows, list(rows[0]) if rows else ["path"])
    return json.dumps(rows, indent=2, default=str) if as_json else None
