"""``leukotree calibrate RUN DATA --out RUN2``: re-fit a run's calibration on labelled cells.

A trained (or batch-norm-adapted) run is copied into a new run folder whose model keeps
its weights, its out-of-distribution reference (the training cells' class means and
precision) and its patient model, with the calibration fitted again on the labelled
cells of DATA, e.g. a sample of another lab's cells
(:func:`~leukotree.calibrate.stages.fit_calibration`): the per-node temperatures, the
distance-aware softening, the out-of-distribution threshold (the stage scales and the
``ood_quantile`` of the cells' distances) and, when the run has conformal answers or a
coverage is given, their threshold on the newly calibrated probabilities. The source run
is left as it was.

The report (``RUN2/summary.json``) gives, on the cells of DATA, the leaf expected
calibration error and the tree negative log-likelihood of the raw outputs, of the run's
calibration and of the new one (fitted on these cells: in-sample), the share of cells
flagged unclassifiable by the run's threshold and by the new one, and the conformal
answers' coverage, mean number of leaves and share of leaf answers with the run's
answers and with the new ones.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.calibrate.stages import (
    Calibration,
    OodReference,
    conformal_figures,
    fit_calibration,
    leaf_ece,
)
from leukotree.data.discover import discover
from leukotree.data.images import DEFAULT_MAX_PIXELS
from leukotree.errors import LeukotreeError, display_path
from leukotree.inference.conformal import MODES, ConformalAnswers, check_cells
from leukotree.inference.predictor import TorchPredictor, predict_paths
from leukotree.models.calibration import MIN_IMAGES, tree_nll
from leukotree.models.checkpoint import load_model, update_checkpoint
from leukotree.patients.fit import without_promise
from leukotree.rundir import RunDir, require_new_folder, write_json

#: Files of the source run that describe the calibrated one as well (``best.pt`` is
#: copied and re-fitted; ``last.pt``, the ONNX export and the pixel cache are not).
COPIED = (RunDir.CONFIG, RunDir.ENVIRONMENT, RunDir.TAXONOMY, RunDir.SPLIT, RunDir.HISTORY,
          RunDir.CURVES, RunDir.ADAPT, RunDir.CELL_TAXONOMY)


def calibrate_run(run: str | Path, data: str | Path, out: str | Path, *,
                  patients: str = "auto", labels: str = "folder",
                  ood_quantile: float | None = None, coverage: float | None = None,
                  conformal: str | None = None, batch_size: int = 64, workers: int = 2,
                  progress: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Copy the run ``run`` (a run folder or its ``.pt``) into the new folder ``out`` with
    its calibration fitted again on the labelled cells of ``data`` (a folder or manifest;
    ``patients``/``labels`` as for ``evaluate``), the out-of-distribution threshold at
    ``ood_quantile`` (None: the run's own); returns the report written to
    ``out/summary.json`` (module docstring). Conformal answers are fitted at
    ``coverage`` (None: the run's own, if it has them) with ``conformal`` (marginal or
    mondrian; None: the run's own)."""
    checkpoint = _checkpoint(run)
    target = RunDir(out)
    require_new_folder(target.path, "calibrated run")
    model, payload = load_model(checkpoint)
    settings = (payload.get("extra") or {}).get("config") or {}
    quantile = _quantile(payload, settings, ood_quantile)
    sample_set = discover(data, model.taxonomy, patients=patients, labels=labels)
    sample_set.raise_for_problems()
    samples = sample_set.samples
    if len(samples) < MIN_IMAGES:
        raise LeukotreeError(f"Calibration needs at least {MIN_IMAGES} labelled cells; "
                             f"'{display_path(data)}' has {len(samples)}. Give more of "
                             "the lab's labelled cells.")
    truth = [s.label for s in samples]
    coverage, mode = _conformal_settings(payload, settings, coverage, conformal)
    if coverage is not None:  # refused before any image is read
        check_cells(model.taxonomy, truth, 1 - coverage, mode)
    preds = predict_paths(TorchPredictor(model, stage_features=True),
                          [s.path for s in samples], batch_size=batch_size, workers=workers,
                          progress=progress, on_error="raise", max_pixels=max_pixels,
                          pixel_sizes=[s.pixel_size for s in samples])
    raw = {"leaf_probs": preds.extras.get("leaf_probs_raw", preds.leaf_probs)}
    for key, value in (("features", preds.features),
                       ("stage_features", preds.extras.get("stage_features"))):
        if value is not None:
            raw[key] = value
    reference = OodReference.from_section(payload["ood"]) if payload.get("ood") else None
    fitted = fit_calibration(model.taxonomy, truth, raw, reference=reference,
                             quantile=quantile,
                             distance_temperature=settings.get("distance_temperature", True),
                             coverage=coverage, conformal=mode,
                             log=log or (lambda _: None), cells="calibration",
                             groups=[s.patient for s in samples])
    report = _report(fitted, truth, raw["leaf_probs"], preds.leaf_probs,
                     None if preds.ood_score is None else preds.unclassifiable)
    if coverage is not None:
        before = payload.get("conformal")
        report["conformal"] = {
            "coverage": coverage, "mode": mode,
            "before": None if before is None else conformal_figures(
                model.taxonomy, truth, preds.leaf_probs, ConformalAnswers.from_dict(before)),
            "after": {k: fitted.conformal[k] for k in ("coverage", "mean_leaves",
                                                       "leaf_share", "thresholds")}}
    report = {"calibrated_from": str(display_path(checkpoint)), "data": str(data),
              **report}
    _write(RunDir.of(checkpoint), target, fitted, payload, report)
    return report


def _checkpoint(run: str | Path) -> Path:
    """The model file of ``run``; an ONNX file or a cv or ensemble folder is refused."""
    from leukotree.inference.loader import load

    loaded = load(run)  # a path without a model: says what to give
    if loaded.kind == "onnx":
        raise LeukotreeError(f"'{run}' is an ONNX file: its calibration is part of the "
                             "graph. Calibrate the run folder it was exported from (or its "
                             ".pt file), then export again.")
    return loaded.checkpoint  # a cv or ensemble folder: names a member


def _quantile(payload: dict[str, Any], settings: dict[str, Any], given: float | None,
              ) -> float:
    """``given``, or the run's: its ``ood`` section's quantile, else its configuration's."""
    if given is None:
        ood = payload.get("ood") or {}
        return float(ood.get("quantile", settings.get("ood_quantile", 0.95)))
    if not 0 < given < 1:
        raise LeukotreeError(f"The 'ood_quantile' parameter (--ood-quantile) must be in "
                             f"(0, 1); got {given!r}.")
    return float(given)


def _conformal_settings(payload: dict[str, Any], settings: dict[str, Any],
                        coverage: float | None, mode: str | None,
                        ) -> tuple[float | None, str]:
    """The coverage and mode to fit conformal answers at: those given, else the run's
    stored answers', else its configuration's (coverage None: fit none)."""
    own = payload.get("conformal") or {}
    if coverage is None:
        coverage = (1 - float(own["alpha"]) if own else settings.get("coverage"))
    elif not 0 < coverage < 1:
        raise LeukotreeError(f"The 'coverage' parameter (--coverage) must be in (0, 1); got "
                             f"{coverage!r}.")
    mode = mode or own.get("mode") or settings.get("conformal") or "marginal"
    if mode not in MODES:
        raise LeukotreeError(f"The 'conformal' parameter (--conformal) must be one of "
                             f"{', '.join(MODES)}; got {mode!r}.")
    return coverage, mode


def _report(fitted: Calibration, truth: list[str], raw: np.ndarray, before: np.ndarray,
            flagged_before: np.ndarray | None) -> dict[str, Any]:
    """ECE, NLL and flagged share of the cells: raw, with the run's calibration, with the
    new one; the fitted temperatures, softening and threshold."""
    taxonomy = fitted.taxonomy
    cal = fitted.calibration or {}
    probs = {"uncalibrated": raw.astype(np.float64), "before": before.astype(np.float64)}
    report: dict[str, Any] = {
        "n_cells": len(truth),
        "ece": {k: leaf_ece(taxonomy, truth, v) for k, v in probs.items()},
        "nll": {k: tree_nll(taxonomy, truth, v) for k, v in probs.items()}}
    report["ece"]["after"] = cal.get("ece_after")
    report["nll"]["after"] = cal.get("nll_after")
    report["flagged"] = {
        "before": None if flagged_before is None else float(flagged_before.mean()),
        "after": None if fitted.ood is None else fitted.ood["val_flagged"]}
    report["calibration"] = {k: cal[k] for k in ("temperatures", "distance_power",
                                                 "distance_ref") if k in cal}
    report["ood"] = (None if fitted.ood is None else
                     {k: fitted.ood[k] for k in ("threshold", "quantile", "stages")}
                     | ({"scales": fitted.ood["scales"]} if "scales" in fitted.ood else {}))
    if fitted.ood is None:
        report["note"] = ("the run has no out-of-distribution reference (batch-norm "
                          "adaptation drops it: the training cells' features changed; or "
                          "trained with ood_quantile 0): calibrated without an "
                          "unclassifiable flag")
    return report


def _write(source: RunDir, target: RunDir, fitted: Calibration, payload: dict[str, Any],
           report: dict[str, Any]) -> None:
    """The new run folder: the source's files, its ``best.pt`` with the new sections and
    the report in its ``extra``, and ``summary.json``."""
    target.path.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (source.path / name).is_file():
            shutil.copy2(source.path / name, target.path / name)
    shutil.copy2(source.best, target.best)
    extra = dict(payload.get("extra") or {})
    extra["calibrated"] = {k: report[k] for k in ("calibrated_from", "data", "n_cells")}
    sections = fitted.sections()
    if payload.get("patient_model"):  # its promise held for the old calibration
        sections["patient_model"] = without_promise(payload["patient_model"], report)
    update_checkpoint(target.best, **sections, extra=extra)
    write_json(target.summary, report)


def describe(report: dict[str, Any]) -> list[str]:
    """Console lines of a :func:`calibrate_run` report."""
    ece, nll, flagged = report["ece"], report["nll"], report["flagged"]
    lines = [f"calibrated on {report['n_cells']} labelled cells of {report['data']} "
             "(the figures after are on the cells it was fitted on)",
             f"leaf ECE: raw {ece['uncalibrated']:.3f}, run's calibration "
             f"{ece['before']:.3f}, new {ece['after']:.3f}",
             f"tree NLL: raw {nll['uncalibrated']:.3f}, run's calibration "
             f"{nll['before']:.3f}, new {nll['after']:.3f}"]
    if flagged["after"] is not None:
        before = ("-" if flagged["before"] is None else f"{flagged['before']:.1%}")
        lines.append(f"flagged unclassifiable: {before} with the run's threshold, "
                     f"{flagged['after']:.1%} with the new one "
                     f"({report['ood']['threshold']:.2f}, quantile "
                     f"{report['ood']['quantile']:g})")
    if "conformal" in report:
        con = report["conformal"]
        before = ("-" if con["before"] is None else
                  f"{con['before']['coverage']:.1%} ({con['before']['leaf_share']:.1%} leaves)")
        lines.append(f"conformal answers ({con['mode']}, coverage {con['coverage']:g}): "
                     f"covered {before} with the run's, {con['after']['coverage']:.1%} "
                     f"({con['after']['leaf_share']:.1%} leaves, mean "
                     f"{con['after']['mean_leaves']:.2f} leaves) with the new")
    if "note" in report:
        lines.append(f"note: {report['note']}")
    return lines
