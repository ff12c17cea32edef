"""``leukotree cv``: train and evaluate every fold of patient-grouped cross-validation.

``DIR/fold_<k>/`` holds each fold's run (``best.pt``, ``history.csv``...) and its
evaluation on the held-out fold (``eval/metrics.json``, ``eval/predictions.csv``).
A half-finished CV resumes: evaluated folds are kept, an interrupted fold resumes
from its ``last.pt``. ``DIR/summary.json`` and ``DIR/summary.md`` gather the folds.

Each fold holds out a grouped share of its training patients (``fold_val_fraction``,
0.15) as its validation images: its temperatures and out-of-distribution threshold are
fitted there, never on the test fold, so the fold models (and the folder as one averaged
predictor) are calibrated and flag unclassifiable cells like a ``train`` run; the test
fold's figures include the calibration error after calibration. ``fold_val_fraction`` 0
trains on all of a fold's training patients and validates on the test fold itself,
uncalibrated (the behaviour of earlier versions).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from sklearn.metrics import roc_auc_score

from leukotree.engine.config import TrainConfig, load_config, save_config
from leukotree.engine.distributed import running_under_torchrun
from leukotree.engine.trainer import train
from leukotree.errors import LeukotreeError
from leukotree.evaluation.evaluate import EvalSettings, check_settings, evaluate
from leukotree.inference.options import InferenceOptions
from leukotree.patients.fit import bootstrap_auroc
from leukotree.patients.guarantee import miss_rate_metrics
from leukotree.report.console import stderr_console
from leukotree.report.html import write_document
from leukotree.report.tables import (
    Document,
    cv_document,
    estimates_table,
    repeat_spread_table,
)
from leukotree.rundir import CVDir, EvalDir, RunDir, read_yaml, write_json

#: Scalar metrics gathered per fold: name -> path of keys in metrics.json.
SCALARS: dict[str, tuple[str, ...]] = {
    "accuracy": ("accuracy",),
    "macro_f1": ("macro_f1",),
    "weighted_f1": ("weighted_f1",),
    "auroc_macro": ("auroc_macro",),
    "tree_accuracy": ("tree_accuracy",),
    "hP": ("hierarchical", "hP"),
    "hR": ("hierarchical", "hR"),
    "hF": ("hierarchical", "hF"),
    "ece": ("calibration", "leaves", "ece"),
    "brier": ("calibration", "leaves", "brier"),
    "ece_uncalibrated": ("calibration", "uncalibrated", "ece"),
    # calibrated folds: the share of test cells flagged, and the accuracy of the rest
    "unclassifiable": ("ood", "rate"),
    "accuracy_kept": ("ood", "accuracy_kept"),
    # folds with conformal answers (--coverage): coverage of the test cells, leaf answers
    "conformal_coverage": ("conformal", "coverage"),
    "conformal_leaf_share": ("conformal", "leaf_share"),
    "conformal_mean_depth": ("conformal", "mean_depth"),
    "patient_accuracy": ("patient_level", "accuracy"),
    "patient_auroc": ("patient_level", "patient_auroc"),
    "patient_sensitivity": ("patient_level", "patient_binary", "sensitivity"),
    "patient_specificity": ("patient_level", "patient_binary", "specificity"),
    "binary_sensitivity": ("binary", "sensitivity"),
    "binary_specificity": ("binary", "specificity"),
}


def _get(d: Any, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return float(d) if isinstance(d, int | float) and d is not None else None


def fold_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one fold, with per-node accuracies as ``node:<name>``."""
    out = {name: v for name, path in SCALARS.items() if (v := _get(metrics, path)) is not None}
    for node, row in metrics.get("per_node", {}).items():
        if row.get("accuracy") is not None:
            out[f"node:{node}"] = float(row["accuracy"])
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    arr = np.array([v for v in values if not math.isnan(v)], dtype=float)
    if len(arr) == 0:
        return {"mean": float("nan"), "std": float("nan")}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


#: Split protocols of ``leukotree cv --protocol`` (a comma list runs several).
PROTOCOLS = ("kfold", "cluster", "repeated", "colour", "colour-swap", "stain", "stain-swap")
#: The protocols that re-score the k-fold models on recoloured test patients.
COLOUR = frozenset({"colour", "colour-swap", "stain", "stain-swap"})


def parse_protocols(spec: str) -> list[str]:
    """``kfold``, ``cluster``, ``repeated``, a colour protocol (:data:`COLOUR`) or a comma list of
    them (each once; ``kfold`` and ``repeated`` exclude each other: repeated k-fold is
    k-fold with ``--repeats``), in the order they run: ``kfold`` or ``repeated`` first
    (added as ``kfold`` when a colour protocol, which re-scores its folds, comes without
    either), then the colour protocols, then ``cluster``."""
    names = [p.strip() for p in str(spec).split(",") if p.strip()]
    bad = [p for p in names if p not in PROTOCOLS]
    if not names or bad or len(set(names)) != len(names) or {"kfold", "repeated"} <= set(names):
        raise LeukotreeError(
            f"The 'protocol' parameter must be one of {', '.join(PROTOCOLS)} or a comma list "
            f"of them, each once, kfold and repeated not together (e.g. kfold,colour,cluster); "
            f"got {spec!r}.")
    if set(names) & COLOUR and not {"kfold", "repeated"} & set(names):
        names.insert(0, "kfold")
    return sorted(names, key=lambda p: (p == "cluster", p in COLOUR))


def cross_validate(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    folds: int = 5,
    repeats: int = 1,
    protocol: str = "kfold",
    options: InferenceOptions | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or resume) the cross-validation(s) ``protocol`` names and write
    ``summary.json``, ``summary.md`` and ``summary.html`` (a :class:`~leukotree.rundir.CVDir`).

    - ``kfold``: ``repeats`` x ``folds``-fold patient-grouped stratified CV
      (:func:`run_cv`); ``repeated``: the same with ``repeats`` >= 2, the spread of the
      per-repeat pooled patient metrics reported (``repeat_spread``);
    - ``cluster``: leave-cluster-out CV, patients clustered by their images' colour and
      cell-mix statistics (:mod:`leukotree.data.cohorts`), one cluster held out per fold:
      an estimate of a later cohort's performance;
    - ``colour`` / ``colour-swap``: the k-fold CV's fold models scored again on their
      test patients recoloured to their training patients' average colour (or to the
      other labels' colour), in ``out/colour`` (:func:`run_colour_cv`; no training): an
      estimate of a cohort whose colours do not follow its diagnoses; ``stain`` /
      ``stain-swap`` the same with the colour of the nuclei and of the plasma moved
      apart (what a per-image stain normalisation keeps), in ``out/stain``...;
    - a comma list (``kfold,cluster``) runs each, the first in ``out``, ``cluster`` in
      ``out/cluster`` (training costs add up: two CVs), and the summary in ``out`` gains
      ``estimates``, the patient-level figures of each side by side and the pessimistic
      one to quote (:func:`compare_estimates`).
    """
    protocols = parse_protocols(protocol)
    if "repeated" in protocols and repeats < 2:
        raise LeukotreeError(f"--protocol repeated needs --repeats of at least 2 (e.g. "
                             f"--repeats 5); got {repeats}.")
    if config.fold_groups:
        raise LeukotreeError("leukotree cv chooses the folds itself; remove 'fold_groups' "
                             "(--fold-groups) from the options (--protocol cluster fixes them "
                             "by clusters).")
    console = console or stderr_console()
    kwargs: dict[str, Any] = {"options": options, "settings": settings, "progress": progress,
                              "console": console}
    summaries: dict[str, dict[str, Any]] = {}
    for name in protocols:
        where = Path(out) if name == protocols[0] else CVDir(out).cluster.path
        if name == "cluster":
            if repeats > 1 and len(protocols) == 1:
                raise LeukotreeError("--protocol cluster has one fold per cluster, drawn once; "
                                     "leave --repeats out (or use --protocol repeated,cluster).")
            fixed = cluster_fold_file(data, CVDir(where), config, folds, console)
            summaries[name] = run_cv(data, where, replace(config, fold_groups=str(fixed)),
                                     folds=folds, protocol=name, **kwargs)
        elif name in COLOUR:
            summaries[name] = run_colour_cv(out, name, summaries[protocols[0]], **kwargs)
        else:
            summaries[name] = run_cv(data, where, config, folds=folds, repeats=repeats,
                                     protocol=name, **kwargs)
    first = summaries[protocols[0]]
    if len(summaries) > 1:
        first["estimates"] = compare_estimates(summaries)
        _write_summary(CVDir(out), first)
    return first


def cluster_fold_file(data: str | Path, cv: CVDir, config: TrainConfig, folds: int,
                      console: Console) -> Path:
    """``cv``'s ``folds.csv`` for leave-cluster-out CV: kept when a half-finished CV
    wrote it, else patients clustered by :func:`~leukotree.data.cohorts.cluster_folds`."""
    from leukotree.data.cohorts import cluster_folds
    from leukotree.data.discover import discover
    from leukotree.data.images import decode_many
    from leukotree.data.splits import write_fold_groups
    from leukotree.taxonomy import load_taxonomy

    if cv.folds.exists() and cv.config.exists():
        console.print(f"leave-cluster-out folds: {cv.folds} kept (a CV under way)")
        return cv.folds.resolve()
    cells = load_taxonomy(config.cell_taxonomy) if config.cell_taxonomy else None
    found = discover(data, load_taxonomy(config.taxonomy), patients=config.patients,
                     labels=config.labels, cell_labels=config.cell_labels, cell_taxonomy=cells)
    found.raise_for_problems()
    samples = found.samples
    if config.skip_unreadable:  # the trainer leaves them out too
        errors = decode_many([s.path for s in samples], 16, workers=config.workers,
                             on_error="report", max_pixels=config.max_pixels).errors
        samples = [s for s, e in zip(samples, errors, strict=True) if e is None]
    fold_of, stats, notes = cluster_folds(samples, folds, config.seed, workers=config.workers)
    for note in notes:
        console.print(f"[yellow]leave-cluster-out folds: {note}[/yellow]")
    rows = [{"group": g, "fold": fold_of[g], "cluster": fold_of[g],
             "label": "|".join(sorted(labels)),
             **{n: round(float(v), 4) for n, v in zip(stats.names, feats, strict=True)}}
            for g, labels, feats in zip(stats.groups, stats.labels, stats.features,
                                        strict=True)]
    write_fold_groups(cv.folds, rows)
    sizes = np.bincount([fold_of[g] for g in stats.groups], minlength=folds)
    console.print(f"leave-cluster-out folds: {len(stats.groups)} patients in {folds} clusters "
                  f"of {', '.join(map(str, sizes.tolist()))} (features: "
                  f"{', '.join(stats.names)}); written to {cv.folds}")
    return cv.folds.resolve()


def run_cv(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    folds: int = 5,
    repeats: int = 1,
    protocol: str = "kfold",
    options: InferenceOptions | None = None,
    settings: EvalSettings | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``repeats`` x ``folds``-fold patient-grouped CV in ``out``.

    Each fold keeps its last epoch (``monitor`` last, no early stopping): a few
    validation patients cannot pick an epoch, and with ``fold_val_fraction`` 0 they are
    the test patients (nor is such a fold calibrated, see
    :class:`~leukotree.engine.trainer.Trainer`). Repeat ``r`` draws its folds (and
    initialisations) with seed ``seed + r``; with ``config.fold_groups`` the folds are
    that file's. With patient
    ids, the out-of-fold patient diagnoses of each repeat are pooled into patient-level
    metrics (AUROC with a patient-bootstrap 95% CI; sensitivity and specificity at each
    fold's own threshold, chosen on its training patients only). Each fold is evaluated
    with ``options`` (e.g. the patient aggregation) and ``settings``
    (:func:`~leukotree.evaluation.evaluate.evaluate`). Every fold's test groups are
    listed in ``folds.csv`` (with ``config.fold_groups``, that file is it).
    """
    _check_cv(config, folds, repeats)
    options = options or InferenceOptions()
    settings = settings or EvalSettings(progress=progress)
    check_settings(settings)
    console = console or stderr_console()
    cv = CVDir(out)
    if config.monitor != "last" or config.patience:
        console.print("[dim]cross-validation keeps each fold's last epoch, without early "
                      "stopping: a fold's few validation patients cannot pick one (and with "
                      "--fold-val-fraction 0 they are its test patients)[/dim]")
        config = replace(config, monitor="last", patience=0)
    base = _open_cv_dir(cv, replace(config, folds=folds, fold=None))
    per_fold: list[dict[str, Any]] = []
    pooled: list[dict[str, Any]] = []
    for r in range(repeats):
        repeat = [_run_fold(data, cv, base, k, r, folds, repeats, (options, settings),
                            progress, console) for k in range(folds)]
        per_fold += [{"fold": k, "repeat": r, "n_images": metrics["n_images"],
                      **fold_scalars(metrics)} for k, metrics in enumerate(repeat)]
        pooled += pool_folds(repeat, base.patient_miss_rate is not None)
    if not base.fold_groups:
        _write_folds(cv, per_fold)
    summary = fold_summary(config, base, per_fold, pooled, repeats)
    if protocol != "kfold":
        summary["protocol"] = protocol
    if repeats > 1 and pooled:
        summary["repeat_spread"] = repeat_spread(pooled)
    _write_summary(cv, summary)
    return summary


def run_colour_cv(out: str | Path, protocol: str, base_summary: dict[str, Any], *,
                  options: InferenceOptions | None = None,
                  settings: EvalSettings | None = None, progress: bool = True,
                  console: Console | None = None) -> dict[str, Any]:
    """Score every fold of the CV in ``out`` (already run: ``base_summary`` is its summary)
    again, on its test patients recoloured (:mod:`leukotree.evaluation.colour`;
    ``protocol`` one of :data:`COLOUR`), into ``out/<protocol>/`` (a fold's
    recoloured images, ``manifest.csv`` and ``eval/``; ``summary.json``). Evaluated folds
    are kept when resumed. The summary adds ``p_change``: over the out-of-fold patients,
    the mean of ``|P(positive) recoloured - P(positive)|`` and the number of diagnoses
    that changed; ``clipped``, how many recoloured images (of the first repeat) had
    pixels pushed out of the sRGB gamut (:func:`~leukotree.evaluation.colour.clipped_summary`);
    and ``colour_only``, how well the patients' mean colour features (those
    the protocol moves) alone tell their labels apart
    (:func:`~leukotree.evaluation.confound.colour_separability`)."""
    from leukotree.evaluation.colour import (
        COLOUR_PROTOCOLS,
        clipped_note,
        clipped_summary,
        colour_statistics,
        recoloured_manifest,
        write_recoloured,
    )
    from leukotree.evaluation.confound import colour_separability

    options, console = options or InferenceOptions(), console or stderr_console()
    settings = settings or EvalSettings(progress=progress)
    cv, folder = CVDir(out), CVDir(Path(out) / protocol)
    config = load_config(cv.config, check_device=False)
    everyone = cv.fold(0).read_split()  # every fold's split lists every image
    features, target = COLOUR_PROTOCOLS[protocol]
    stats = colour_statistics([row["path"] for row in everyone],
                              cv.colour_features(features), max_pixels=config.max_pixels,
                              features=features)
    per_fold: list[dict[str, Any]] = []
    pooled: list[dict[str, Any]] = []
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    repeats = int(base_summary.get("repeats", 1))
    for r in range(repeats):
        repeat = []
        for k in sorted(row["fold"] for row in base_summary["folds"]
                        if row.get("repeat", 0) == r):
            fold, name = cv.fold(k, r), CVDir.fold_name(k, r)
            evaluated = EvalDir(folder.path / name / RunDir.EVAL)
            if evaluated.metrics.exists():
                console.print(f"{protocol}, fold {k + 1} (repeat {r + 1}): already "
                              "evaluated, kept")
            else:
                console.rule(f"{protocol}: fold {k + 1}'s test patients recoloured")
                test_part = fold.test_part()
                rows = fold.read_split()
                test = [row for row in rows if row["split"] == test_part]
                rest = [row for row in rows if row["split"] != test_part]
                manifest = write_recoloured(test, rest, stats, target, folder.path / name,
                                            max_pixels=config.max_pixels, features=features)
                evaluate(fold.path, manifest, evaluated.path, options, settings,
                         patients="auto", labels="folder")
            metrics = evaluated.read_metrics()
            repeat.append(metrics)
            per_fold.append({"fold": k, "repeat": r, "n_images": metrics["n_images"],
                             **fold_scalars(metrics)})
            if r == 0:
                before |= (fold.eval_dir.read_metrics().get("patient_level") or {}).get(
                    "patients", {})
                after |= (metrics.get("patient_level") or {}).get("patients", {})
        pooled += pool_folds(repeat, config.patient_miss_rate is not None)
    summary = fold_summary(config, config, per_fold, pooled, repeats) | {
        "protocol": protocol, "p_change": patient_change(before, after, pooled),
        "colour_features": features,
        "clipped": clipped_summary([recoloured_manifest(folder.path / CVDir.fold_name(
            row["fold"])) for row in per_fold if row["repeat"] == 0]),  # each image once
        "colour_only": colour_separability(everyone, stats, seed=config.seed)}
    if summary["clipped"]["images_over"]:
        console.print(f"[yellow]{protocol}: {clipped_note(summary['clipped'])}[/yellow]")
    write_json(folder.summary, summary)
    write_document(cv_document([summary]), folder.markdown)
    return summary


def patient_change(before: dict[str, Any], after: dict[str, Any],
                   pooled: list[dict[str, Any]]) -> dict[str, Any]:
    """How the patients' results moved between two evaluations of the same patients
    (``patients`` of ``metrics.json``'s ``patient_level``): ``n`` patients in both, the
    mean ``|P(positive) after - P(positive) before|`` (two-leaf models with a positive
    leaf) and the number whose ``decision`` changed."""
    names = sorted(set(before) & set(after))
    out: dict[str, Any] = {"n": len(names), "decisions_changed": sum(
        before[n].get("decision") != after[n].get("decision") for n in names)}
    positive = pooled[0].get("positive") if pooled else None
    key = f"p_{positive}"
    if positive and names and all(key in before[n] and key in after[n] for n in names):
        out["mean_abs_p"] = float(np.mean([abs(after[n][key] - before[n][key])
                                           for n in names]))
    return out


def pool_folds(repeat: list[dict[str, Any]], promised: bool) -> list[dict[str, Any]]:
    """The out-of-fold patients of one repeat's folds (their ``metrics.json``) pooled by
    :func:`pooled_patient_metrics`, as a list of one (empty without patients). With a
    promised miss rate (``promised``), a fold that could not state it has its calls left
    out of the pooled miss rate (they are at the plain threshold)."""
    patients: dict[str, Any] = {}
    insufficient: list[str] = []
    promise = None  # the miss rate the folds state (a fold may state none)
    for metrics in repeat:
        level = metrics.get("patient_level") or {}
        fold_patients = level.get("patients", {})
        if promised and not level.get("miss_rate"):
            fold_patients = {p: {k: v for k, v in row.items() if k != "call"}
                             for p, row in fold_patients.items()}
        patients |= fold_patients
        insufficient += level.get("insufficient", [])
        promise = promise or level.get("miss_rate")
    if not (patients or insufficient):
        return []
    return [pooled_patient_metrics(patients, repeat[-1], promise) | {
        "insufficient": sorted(insufficient)}]


def fold_summary(config: TrainConfig, base: TrainConfig, per_fold: list[dict[str, Any]],
                 pooled: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    """``summary.json``'s content: the folds' scalars, their means and the pooled
    patient-level figures of each repeat."""
    keys = sorted({key for row in per_fold for key in row} - {"fold", "repeat", "n_images"})
    return {
        "model": config.model_config().description, "head": config.head,
        "patient_model": config.patient_model, "repeats": repeats, "folds": per_fold,
        "mean": {key: mean_std([row.get(key, float("nan")) for row in per_fold])
                 for key in keys},
        "patient_level": pooled, "config": base.to_dict(),
    }


def _check_cv(config: TrainConfig, folds: int, repeats: int) -> None:
    if folds < 2 or repeats < 1:
        raise LeukotreeError(f"Cross-validation needs at least 2 folds and 1 repeat; got "
                             f"{folds} folds and {repeats} repeats.")
    if config.val_data:
        raise LeukotreeError("Cross-validation validates on each fold in turn; remove "
                             "'val_data' (--val) from the options.")
    if running_under_torchrun():
        raise LeukotreeError("leukotree cv runs in one process (each fold trains on all the "
                             "process's devices); use torchrun with 'leukotree train --fold k' "
                             "for distributed training of one fold.")


def _write_summary(cv: CVDir, summary: dict[str, Any]) -> None:
    """``summary.json``, and ``summary.md`` / ``.html``: the folds' table and figures, then
    the estimates side by side when there are several."""
    write_json(cv.summary, summary)
    doc = cv_document([summary])
    if summary.get("repeat_spread"):
        repeat_spread_table(doc, summary["repeat_spread"])
    if summary.get("estimates"):
        estimates_table(doc, summary["estimates"])
    doc.extend(_fold_figures(summary["folds"]))
    write_document(doc, cv.markdown)


def _write_folds(cv: CVDir, per_fold: list[dict[str, Any]]) -> None:
    """``folds.csv``: every fold's test groups (``repeat,fold,group,label,images``), read
    from the folds' ``split.csv``."""
    from collections import Counter

    from leukotree.data.splits import write_fold_groups

    rows = []
    for row in per_fold:
        fold = cv.fold(row["fold"], row.get("repeat", 0))
        test = fold.read_split(fold.test_part())
        images = Counter(r["group"] for r in test)
        labels: dict[str, set[str]] = {}
        for r in test:
            labels.setdefault(r["group"], set()).add(r["label"])
        rows += [{"repeat": row.get("repeat", 0), "fold": row["fold"], "group": g,
                  "label": "|".join(sorted(labels[g])), "images": images[g]}
                 for g in sorted(images)]
    write_fold_groups(cv.folds, rows)


def _run_fold(data: str | Path, cv: CVDir, base: TrainConfig, k: int, r: int, folds: int,
              repeats: int, evaluation: tuple[InferenceOptions, EvalSettings],
              progress: bool, console: Console,
              ) -> dict[str, Any]:
    """Train and evaluate fold ``k`` of repeat ``r`` (kept when already evaluated)."""
    fold = cv.fold(k, r)
    if fold.eval_dir.metrics.exists():
        console.print(f"fold {k + 1} (repeat {r + 1}): already evaluated, kept")
    else:
        console.rule(f"fold {k + 1} of {folds}" + (f", repeat {r + 1} of {repeats}"
                                                   if repeats > 1 else ""))
        train(data, fold.path, replace(base, fold=k, seed=base.seed + r),
              resume=fold.last.exists(), progress=progress)
        # The manifest carries the split's labels and patient ids as they were resolved.
        evaluate(fold.path, fold.write_val_manifest(part=fold.test_part()),
                 fold.eval_dir.path, *evaluation,
                 patients="auto", labels="folder")
    return fold.eval_dir.read_metrics()


def pooled_patient_metrics(patients: dict[str, Any], last: dict[str, Any],
                           promise: dict[str, Any] | None = None) -> dict[str, Any]:
    """Patient-level metrics of one repeat's out-of-fold patients diagnosed, pooled over
    its folds: accuracy of the diagnoses, and for two leaves the AUROC of ``P(positive)``
    with a patient-bootstrap 95% CI and sensitivity/specificity of the diagnoses made
    (patients left undiagnosed are listed apart, ``insufficient``); for a patient model
    that promises a miss rate, the observed miss rate of the pooled calls (each made at its
    fold's own miss-rate threshold) with its binomial 95% interval and the referred share."""
    names = sorted(patients)
    if not names:
        return {"n_patients": 0}
    truth = [patients[p]["truth"] for p in names]
    decisions = [patients[p]["decision"] for p in names]
    out: dict[str, Any] = {"n_patients": len(names),
                           "accuracy": float(np.mean([t == d for t, d in zip(
                               truth, decisions, strict=True)]))}
    positive = (last.get("patient_level") or {}).get("patient_positive")
    if positive is not None:
        y = np.array([t == positive for t in truth])
        p = np.array([patients[n][f"p_{positive}"] for n in names])
        said = np.array([d == positive for d in decisions])
        out["positive"] = positive
        if 0 < y.sum() < len(y):
            out["auroc"] = float(roc_auc_score(y, p))
            out["auroc_ci95"] = bootstrap_auroc(y, p)
        tp, fn = int((said & y).sum()), int((~said & y).sum())
        tn, fp = int((~said & ~y).sum()), int((said & ~y).sum())
        out |= {"tp": tp, "fn": fn, "tn": tn, "fp": fp,
                "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
                "specificity": tn / (tn + fp) if tn + fp else float("nan")}
        promise = promise or (last.get("patient_level") or {}).get("miss_rate")
        if promise is not None:  # each fold's own miss-rate threshold, pooled over the
            # patients of the folds that state one (a fold whose training patients
            # cannot support it trains without)
            stated = [i for i, n in enumerate(names) if patients[n].get("call")]
            out["miss_rate"] = miss_rate_metrics(
                [patients[names[i]]["call"] for i in stated], y[stated], promise["alpha"],
                promise["confidence"]) | {"patients_without_promise": len(names) - len(stated)}
    return out


#: The patient-level figures an estimate carries (``pooled_patient_metrics`` keys).
ESTIMATE_KEYS = ("auroc", "accuracy")


def repeat_spread(pooled: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Across repeats, of each repeat's pooled patient AUROC and accuracy: the mean, the
    standard deviation (``ddof=1``), the minimum and the maximum (repeats without the
    figure left out)."""
    out = {}
    for key in ESTIMATE_KEYS:
        values = [float(p[key]) for p in pooled if p.get(key) is not None]
        if values:
            out[key] = mean_std(values) | {"min": min(values), "max": max(values),
                                           "n": len(values)}
    return out


def compare_estimates(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The patient-level estimate of each protocol side by side, and which one to quote.

    An estimate is the pooled out-of-fold patients' AUROC (its patient-bootstrap 95% CI)
    and accuracy: of the one repeat, or over several the mean across repeats (the CI that
    of the first repeat, the spread in ``repeat_spread``). The pessimistic one, to
    quote, has the lower AUROC (the lower accuracy without AUROCs)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, summary in summaries.items():
        pooled = summary.get("patient_level") or []
        if not pooled:
            continue
        spread = repeat_spread(pooled)
        row: dict[str, Any] = {"n_patients": pooled[0].get("n_patients", 0),
                               "repeats": len(pooled)}
        for key in ESTIMATE_KEYS:
            row[key] = spread[key]["mean"] if key in spread else None
        row["auroc_ci95"] = pooled[0].get("auroc_ci95")
        rows[name] = row
    if not rows:
        return {"protocols": {}, "pessimistic": None,
                "note": "no patient-level figures (no patient ids): nothing to compare"}
    key = "auroc" if all(r["auroc"] is not None for r in rows.values()) else "accuracy"
    worst = min(rows, key=lambda n: (math.inf if rows[n][key] is None else rows[n][key], n))
    return {"protocols": rows, "pessimistic": worst, "by": key,
            "note": (f"quote the {worst} estimate (the lower patient {key}): it is the one "
                     "a new cohort of patients is likelier to meet")}


#: Options that change how fast a CV runs, not what it computes: a half-finished CV
#: resumes with other values of them.
RUNTIME_FIELDS = ("threads", "workers", "cache")


def _open_cv_dir(cv: CVDir, base: TrainConfig) -> TrainConfig:
    """Create the folder, or check that a half-finished CV in it used the same options
    (but :data:`RUNTIME_FIELDS`, which may differ)."""
    cv.path.mkdir(parents=True, exist_ok=True)
    if cv.config.exists():
        saved = load_config(cv.config, check_device=False)
        if "fold_val_fraction" not in (read_yaml(cv.config, "Saved configuration") or {}):
            saved = replace(saved, fold_val_fraction=0.0)  # folds validated on themselves
        if (saved.monitor, saved.patience) != ("last", 0) and replace(
                saved, monitor="last", patience=0).to_dict() == base.to_dict():
            raise LeukotreeError(
                f"'{cv.path}' holds a CV started by an older leukotree that chose each fold's "
                f"best epoch ('{saved.monitor}') on its test fold, which makes its figures "
                "optimistic; folds now keep their last epoch. Start it again in another --out.")
        if saved.fold_val_fraction == 0 and base.fold_val_fraction and replace(
                saved, fold_val_fraction=base.fold_val_fraction).to_dict() == base.to_dict():
            raise LeukotreeError(
                f"'{cv.path}' holds a CV whose folds validate on their own test images, "
                "uncalibrated (--fold-val-fraction 0, what older versions did); resume it with "
                "--fold-val-fraction 0, or start it again in another --out to calibrate its "
                "folds on their own validation patients.")
        runtime = {name: getattr(base, name) for name in RUNTIME_FIELDS}
        if replace(saved, **runtime).to_dict() != base.to_dict():
            raise LeukotreeError(
                f"'{cv.path}' holds a CV with other options (see {cv.config}); resume it with "
                "the same options or choose another --out.")
    else:
        save_config(base, cv.config)
    return base


def _fold_figures(per_fold: list[dict[str, Any]]) -> Document:
    """Each fold's report link and figures (paths relative to the CV folder)."""
    doc = Document("folds")
    doc.heading("Folds")
    figures = (RunDir.CURVES, f"{RunDir.EVAL}/{EvalDir.CONFUSION_NORMALIZED}",
               f"{RunDir.EVAL}/{EvalDir.ROC}", f"{RunDir.EVAL}/{EvalDir.RELIABILITY}")
    for row in per_fold:
        k, r = row["fold"], row.get("repeat", 0)
        name = CVDir.fold_name(k, r)
        title = f"Fold {k + 1}" + (f", repeat {r + 1}" if r else "")
        doc.heading(title, 3, link=f"{name}/{RunDir.EVAL}/{EvalDir.HTML}")
        for fig in figures:
            doc.figure(f"{name}/{fig}", f"fold {k + 1} {fig}")
    return doc
