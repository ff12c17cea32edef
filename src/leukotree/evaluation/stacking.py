"""A patient model for a cross-validation's fold models, fitted on their out-of-fold
outputs (stacking), and its cross-fitted estimate.

A patient model fitted on the cells its cell model was trained on sees outputs far more
confident than a new patient's will be: the cell model has learned those patients. It
then leans on whatever separates the training patients best (typically the mean of the
diagnosis head, near perfect in-sample) and ignores what transfers (the differential
count the cell-type head reads). Fitted instead on *out-of-fold* outputs, each patient
described by the fold model that never saw it, the patient model learns from outputs like
those of a new patient, and its threshold and miss-rate promise are chosen on scores of
patients unseen by the cell model.

- :func:`out_of_fold_cells`: every patient of one repeat of a ``leukotree cv`` folder,
  described by the fold model that held it out (its test part predicted once more, as
  ``predict`` would: calibrated as stored, cells flagged unclassifiable left out of the
  bags).
- :func:`stack`: the patient model ``name`` fitted on all of them (its threshold and
  miss-rate threshold on its own inner out-of-fold scores, as ``train`` does), and its
  *cross-fitted* estimate: for each fold ``k``, the same fitted on the other folds'
  patients only and scored on fold ``k``'s, pooled (AUROC with a patient-bootstrap 95%
  interval, accuracy, sensitivity, specificity, observed miss rate).
- :func:`install`: the stacked model written into every fold's ``best.pt``, so that the
  cv folder, predicted as one ensemble (:mod:`leukotree.inference.ensemble`), applies it
  to each fold model's outputs and averages the probabilities (the same threshold for
  all).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.calibrate.patients import LabelledCells
from leukotree.data.discover import Sample
from leukotree.errors import LeukotreeError
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predictor import predict_paths
from leukotree.models.checkpoint import update_checkpoint
from leukotree.patients import fit_patient_model, patient_metrics
from leukotree.patients.bags import Bag
from leukotree.patients.fit import FittedPatientModel
from leukotree.patients.guarantee import miss_rate_metrics
from leukotree.rundir import CVDir, RunDir, write_json
from leukotree.taxonomy import Taxonomy

#: Where :func:`install` records what it did, in the cv folder.
STACKED = "stacked.json"


@dataclass
class FoldCells:
    """The out-of-fold cells of one fold: its run and its test patients' cells."""

    run: RunDir
    cells: LabelledCells


def out_of_fold_cells(cv: str | Path, repeat: int = 0, *, batch_size: int = 64,
                      workers: int = 2, progress: bool = False,
                      options: InferenceOptions | None = None) -> list[FoldCells]:
    """Each fold of ``repeat`` with its test part described by its own model."""
    folder = CVDir(cv)
    config = folder.read_summary().get("config") or {}
    folds = int(config.get("folds") or 0)
    if folds < 2:
        raise LeukotreeError(f"'{folder.path}' has no fold count in its summary; is it a "
                             "folder written by 'leukotree cv'?")
    options = options or InferenceOptions()
    out = []
    for k in range(folds):
        run = folder.fold(k, repeat)
        if not run.best.exists():
            raise LeukotreeError(f"Fold {k + 1} of '{folder.path}' has no model ({run.best}); "
                                 "finish the cross-validation first (run 'leukotree cv' "
                                 "again with the same options: it resumes).")
        rows = run.read_split(run.test_part())
        loaded = load(run.path)
        predictor = loaded.predictor("torch")
        view = options.input_config(predictor.model_config, source=run.path)
        preds = predict_paths(predictor, [Path(r["path"]) for r in rows], config=view,
                              batch_size=batch_size, workers=workers, progress=progress,
                              on_error="raise")
        outputs = {"leaf_probs": preds.leaf_probs, "features": preds.features}
        if preds.cell_probs is not None:
            outputs["cell_probs"] = preds.cell_probs
        if preds.ood_score is not None:
            outputs["ood_score"] = preds.ood_score
        samples = [Sample(Path(r["path"]), r["label"], r.get("patient") or None)
                   for r in rows]
        out.append(FoldCells(run, LabelledCells(samples, outputs)))
    return out


def _bags(fold: FoldCells, taxonomy: Taxonomy) -> list[Bag]:
    return fold.cells.bags(taxonomy)


@dataclass
class Stacked:
    """The patient model fitted on every out-of-fold patient, and its cross-fitted
    estimate (``metrics``)."""

    fitted: FittedPatientModel
    metrics: dict[str, Any]


def stack(folds: list[FoldCells], name: str, *, rule: str = "youden",
          positive: str | None = None, seed: int = 0,
          params: Mapping[str, Any] | None = None, miss_rate: float | None = None,
          miss_confidence: float = 0.9,
          log: Callable[[str], None] | None = None) -> Stacked:
    """Fit the patient model ``name`` on the out-of-fold patients of ``folds`` and
    estimate it by cross-fitting (module docstring)."""
    first = load(folds[0].run.path).predictor("torch")
    taxonomy, cells = first.taxonomy, first.cell_taxonomy
    per_fold = [_bags(f, taxonomy) for f in folds]

    def fit(bags: list[Bag]) -> FittedPatientModel:
        return fit_patient_model(name, taxonomy, cells, bags, rule=rule, positive=positive,
                                 seed=seed, miss_rate=miss_rate,
                                 miss_confidence=miss_confidence, **dict(params or {}))

    everyone = [b for bags in per_fold for b in bags]
    fitted = fit(everyone)
    scored: list[Bag] = []
    probs, calls, diagnoses = [], [], []
    for k, bags in enumerate(per_fold):
        if not bags:
            continue
        part = fit([b for j, other in enumerate(per_fold) if j != k for b in other])
        p = part.predict_proba(bags)
        scored += bags
        probs.append(p)
        diagnoses += part.diagnose(p)
        calls += part.calls(p)
    p = np.concatenate(probs)
    truth = [b.label for b in scored]
    metrics = patient_metrics(taxonomy, truth, p, diagnoses, positive=fitted.positive,
                              threshold=fitted.threshold)
    if fitted.positive is not None:  # of the diagnoses made (each fold's own threshold)
        y = np.array([t == fitted.positive for t in truth])
        said = np.array([d == fitted.positive for d in diagnoses])
        metrics["sensitivity"] = float((said & y).sum() / max(1, y.sum()))
        metrics["specificity"] = float((~said & ~y).sum() / max(1, (~y).sum()))
    metrics |= {"model": name, "estimate": "cross-fitted over the folds' out-of-fold "
                "patients", "threshold": fitted.threshold, "threshold_rule": rule,
                "patients": {b.patient: {"truth": b.label, "diagnosis": d, "call": c} | {
                    f"p_{leaf}": round(float(row[i]), 4)
                    for i, leaf in enumerate(taxonomy.leaves)}
                    for b, d, c, row in zip(scored, diagnoses, calls, p, strict=True)}}
    if fitted.miss_rate is not None:
        promise = fitted.miss_rate
        metrics["miss_rate"] = miss_rate_metrics(
            calls, np.array([t == fitted.positive for t in truth]), promise.alpha,
            promise.confidence) | {"miss_threshold": promise.threshold}
    if log is not None:
        auroc = (f", AUROC {metrics['auroc']:.3f} [{metrics['auroc_ci95'][0]:.3f}, "
                 f"{metrics['auroc_ci95'][1]:.3f}]" if "auroc" in metrics else "")
        log(f"stacked patient model '{name}' on {len(everyone)} out-of-fold patients; "
            f"cross-fitted: accuracy {metrics['accuracy']:.3f}{auroc}")
    return Stacked(fitted, metrics)


def install(cv: str | Path, stacked: Stacked, repeat: int = 0) -> Path:
    """Write the stacked patient model into every fold model of ``repeat`` and record it
    (with its cross-fitted estimate) in ``cv/stacked.json``; returns that file."""
    folder = CVDir(cv)
    folds = int((folder.read_summary().get("config") or {}).get("folds") or 0)
    section = stacked.fitted.to_dict()
    for k in range(folds):
        update_checkpoint(folder.fold(k, repeat).best, patient_model=section)
    path = folder.path / STACKED
    write_json(path, {"patient_model": stacked.fitted.model.name, "repeat": repeat,
                      "threshold": stacked.fitted.threshold,
                      "miss_rate": None if stacked.fitted.miss_rate is None
                      else stacked.fitted.miss_rate.to_dict(),
                      "cross_fitted": stacked.metrics})
    return path


def train_fold_ensemble(data: str | Path, out: str | Path, config: Any, *,
                        progress: bool = True, console: Any = None) -> dict[str, Any]:
    """``train`` with ``final_model: folds``: a patient-grouped ``config.folds``-fold
    cross-validation into ``out`` (resumed when half done), then the patient model
    ``config.patient_model`` stacked on the folds' out-of-fold outputs and installed in
    every fold model (:func:`stack`, :func:`install`). ``out`` is then a cv folder that
    ``predict``, ``evaluate``, ``report`` and ``serve`` read as one ensemble. Returns the
    cv summary with the stacked estimate under ``stacked``."""
    from dataclasses import replace

    from leukotree.evaluation.cv import cross_validate
    from leukotree.patients.models import patient_params
    from leukotree.report.console import stderr_console

    console = console or stderr_console()
    if config.patient_model == "none":
        raise LeukotreeError("final_model 'folds' stacks a patient model on the folds' "
                             "out-of-fold outputs: give --patient-model (e.g. mean or "
                             "differential), or use final_model 'single'.")
    summary = cross_validate(data, out, replace(config, final_model="single"),
                             folds=config.folds, progress=progress, console=console)
    folds = out_of_fold_cells(out, batch_size=config.batch_size * 2, workers=config.workers,
                              progress=progress)
    stacked = stack(folds, config.patient_model, rule=config.patient_threshold,
                    positive=config.positive, seed=config.seed, params=patient_params(config),
                    miss_rate=config.patient_miss_rate,
                    miss_confidence=config.patient_miss_confidence,
                    log=lambda text: console.print(text))
    install(out, stacked)
    summary["stacked"] = stacked.metrics
    return summary
