"""Every patient-level model on the cell models of one or more cross-validations (e.g. the
plain patient k-fold and the leave-cluster-out protocol of the same recipe), and the
one chosen by the one-standard-error rule on the pessimistic protocol; prints JSON.

    python benchmarks/bench_patient_models.py CV_FOLDER [CV_FOLDER ...] [--stacked]
        [--models mean focused fraction cell-mix focused-mix differential mil]
        [--select-by cluster] [--cell-types MANIFEST] [--out table.md] [--json FILE]

For each fold of a ``leukotree cv`` folder (every repeat), the fold's cell model
describes its training and held-out cells once; each patient model is fitted on the
training patients (its threshold chosen on their out-of-fold scores, as ``train``
does) and diagnoses the held-out patients. The held-out patients of a repeat are
pooled: AUROC with a patient-bootstrap 95% CI and standard error, accuracy,
sensitivity and specificity. ``--stacked`` adds each model stacked on the folds'
out-of-fold outputs, by its cross-fitted estimate (what ``train --final-model folds``
builds: the fold models as one ensemble).

Each folder is named by its protocol (``kfold``, ``cluster``, ``repeated``: the
``protocol`` of its summary). The candidates are ordered from the simplest (the
``--models`` order, each before its stacked variant) and the one-standard-error rule
(:func:`leukotree.evaluation.selection.select_within_one_se`) picks, on the pooled AUROC
of the ``--select-by`` protocol (default: ``cluster`` when given, the simulated later
cohort) with its patient-bootstrap standard error, the simplest candidate within one
standard error of the best.

With ``--cell-types MANIFEST`` (a manifest with a ``cell_type`` column), the DeepAPL
paper's baseline is added as a reference that needs no model: the fraction of cells a
technologist signed as promyelocytes, scored per patient on all patients at once.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from resultfile import add_json_option, write_results
from sklearn.metrics import roc_auc_score

from leukotree.evaluation.selection import select_within_one_se
from leukotree.inference.predictor import TorchPredictor, predict_paths
from leukotree.models.checkpoint import load_model
from leukotree.patients import fit_patient_model, make_bags, patient_labels
from leukotree.patients.fit import bootstrap_auroc, bootstrap_aurocs
from leukotree.patients.models import PATIENT_MODELS, patient_model_class
from leukotree.rundir import CVDir, RunDir
from leukotree.taxonomy import load_taxonomy


def fold_bags(run: RunDir, workers: int) -> tuple[dict[str, list], object]:
    """Bags of the fold's training and held-out patients, from its own cell model."""
    model, payload = load_model(run.best)
    predictor = TorchPredictor(model, patient_model=payload.get("patient_model"))
    rows = run.read_split()
    preds = predict_paths(predictor, [Path(r["path"]) for r in rows], workers=workers,
                          progress=False, on_error="raise")
    truth = patient_labels(model.taxonomy, [r["patient"] for r in rows],
                           [r["label"] for r in rows])
    # as training and predict: cells flagged unclassifiable are left out of the bags
    flagged = preds.unclassifiable
    bags = {}
    # "val": the held-out patients (the test fold; "test" when the fold had a
    # validation part of its own, which no patient model here is fitted or scored on)
    for part, name in (("train", "train"), ("val", run.test_part())):
        idx = [i for i, r in enumerate(rows) if r["split"] == name]
        bags[part] = make_bags([None if flagged[i] else rows[i]["patient"] for i in idx],
                               preds.leaf_probs[idx],
                               preds.features[idx],
                               None if preds.cell_probs is None else preds.cell_probs[idx],
                               labels=truth)
    return bags, model


def pooled(rows: list[tuple[str, float, str]], positive: str) -> dict[str, object]:
    """AUROC (95% CI), accuracy, sensitivity, specificity of pooled held-out patients."""
    truth = np.array([t == positive for t, _, _ in rows])
    score = np.array([p for _, p, _ in rows])
    said = np.array([d == positive for _, _, d in rows])
    return {"patients": len(rows), "auroc": float(roc_auc_score(truth, score)),
            "auroc_ci95": bootstrap_auroc(truth, score), "auroc_se": bootstrap_se(truth, score),
            "accuracy": float((said == truth).mean()),
            "sensitivity": float((said & truth).sum() / truth.sum()),
            "specificity": float((~said & ~truth).sum() / (~truth).sum())}


def signed_promyelocyte_baseline(manifest: Path, taxonomy: str, positive: str,
                                 ) -> dict[str, object]:
    """AUROC of the fraction of cells signed 'promyelocyte' per patient (no model)."""
    tax = load_taxonomy(taxonomy)
    with manifest.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    cells: dict[str, list[str]] = defaultdict(list)
    label = {}
    for r in rows:
        cells[r["patient"]].append(r["cell_type"])
        label[r["patient"]] = r["label"]
    names = sorted(cells)
    truth = np.array([tax.resolve(label[p]) == positive for p in names])
    score = np.array([np.mean([c == "promyelocyte" for c in cells[p]]) for p in names])
    return {"patients": len(names), "auroc": float(roc_auc_score(truth, score)),
            "auroc_ci95": bootstrap_auroc(truth, score)}


def stacked_estimates(cv: Path, models: list[str], rules: list[str], config: dict,
                      workers: int) -> dict[str, dict[str, object]]:
    """Each patient model stacked on the folds' out-of-fold outputs
    (:mod:`leukotree.evaluation.stacking`, what ``train --final-model folds`` fits), by its
    cross-fitted estimate: each fold's patients scored by a stacker fitted on the other
    folds' patients."""
    from leukotree.evaluation.stacking import out_of_fold_cells, stack

    folds = out_of_fold_cells(cv, workers=workers)
    cells = load_taxonomy(config["cell_taxonomy"]) if config.get("cell_taxonomy") else None
    out = {}
    for name in models:
        cls = patient_model_class(name)
        if cls.needs_cells and cells is None:
            continue
        params = {param: config[field] for param, field in cls.config_fields.items()
                  if field in config}  # a CV of an older version: the model's default
        for rule in rules:
            done = stack(folds, name, rule=rule, positive=config.get("positive"),
                         seed=config["seed"], params=params)
            m, label = done.metrics, done.fitted.positive
            rows = list(m["patients"].values())
            out[candidate(name, rule, rules, stacked=True)] = {
                "patients": m["n_patients"], "auroc": m["auroc"], "auroc_ci95": m["auroc_ci95"],
                "auroc_se": bootstrap_se(np.array([r["truth"] == label for r in rows]),
                                         np.array([r[f"p_{label}"] for r in rows])),
                "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
                "specificity": m["specificity"]}
    return out


def bootstrap_se(y: np.ndarray, score: np.ndarray) -> float:
    """The patient-bootstrap standard error of the AUROC of ``score`` for ``y``."""
    values = bootstrap_aurocs(y, score)
    return float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def candidate(name: str, rule: str, rules: list[str], *, stacked: bool = False) -> str:
    """A candidate's name: the model, its threshold rule when several are compared, and
    ``stacked`` for the fold ensemble with the model fitted on out-of-fold outputs."""
    return name + (f" ({rule})" if len(rules) > 1 else "") + (", stacked" if stacked else "")


def evaluate_cv(cv: Path, models: list[str], rules: list[str] | None, *, stacked: bool,
                workers: int) -> dict[str, Any]:
    """Every candidate on one cv folder: ``{"protocol", "cv", "config", "positive",
    "models": {candidate: pooled metrics of repeat 1}, "repeats": {...}}``."""
    folder = CVDir(cv)
    summary = folder.read_summary()
    config = summary["config"]
    rules = rules or [config["patient_threshold"]]
    held_out: dict[tuple[str, int], list[tuple[str, float, str]]] = defaultdict(list)
    positive = None
    for row in summary["folds"]:
        run = folder.fold(row["fold"], row.get("repeat", 0))
        bags, model = fold_bags(run, workers)
        for name in models:
            cls = patient_model_class(name)
            if cls.needs_cells and model.cell_taxonomy is None:
                continue
            params = {param: config[field] for param, field in cls.config_fields.items()
                      if field in config}  # a CV of an older version: the model's default
            for rule in rules:
                fitted = fit_patient_model(name, model.taxonomy, model.cell_taxonomy,
                                           bags["train"], rule=rule,
                                           positive=config.get("positive"),
                                           seed=config["seed"], **params)
                positive = fitted.positive
                k = model.taxonomy.leaf_index[positive]
                probs = fitted.predict_proba(bags["val"])
                for bag, p, d in zip(bags["val"], probs, fitted.diagnose(probs), strict=True):
                    held_out[(candidate(name, rule, rules), row.get("repeat", 0))].append(
                        (bag.label, float(p[k]), d))
    pooled_by = {(name, r): pooled(rows, positive) for (name, r), rows in held_out.items()}
    out = {"protocol": summary.get("protocol", "kfold"), "cv": str(cv),
           "folds": len({row["fold"] for row in summary["folds"]}),
           "threshold": config["patient_threshold"], "positive": positive,
           "models": {name: m for (name, r), m in pooled_by.items() if r == 0}}
    if any(r for _, r in pooled_by):
        out["repeats"] = {f"{name} (repeat {r + 1})": m for (name, r), m in pooled_by.items()}
    if stacked:
        out["models"] |= stacked_estimates(cv, models, rules, config, workers)
    return out


def select(results: dict[str, dict[str, Any]], by: str, order: list[str]) -> dict[str, Any]:
    """The one-standard-error choice among ``order`` on the pooled AUROC of protocol
    ``by`` (its patient-bootstrap standard error)."""
    models = results[by]["models"]
    order = [c for c in order if c in models]
    pick = select_within_one_se({c: models[c]["auroc"] for c in order},
                                {c: models[c]["auroc_se"] for c in order}, order)
    return {"by": by, "metric": "pooled patient AUROC, patient-bootstrap standard error",
            "order": order} | pick.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cv", type=Path, nargs="+")
    parser.add_argument("--models", nargs="+", default=list(PATIENT_MODELS),
                        help="the candidates, simplest first")
    parser.add_argument("--rules", nargs="+", default=None,
                        help="threshold rules to compare (default: each CV's own)")
    parser.add_argument("--cell-types", type=Path, help="manifest with a cell_type column")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stacked", action="store_true",
                        help="also each model stacked on the folds' out-of-fold outputs "
                             "(the fold models as one ensemble)")
    parser.add_argument("--select-by", help="the protocol whose estimate chooses "
                        "(default: cluster when given, else the first folder's)")
    parser.add_argument("--out", type=Path, help="also write a Markdown table here")
    add_json_option(parser)
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for cv in args.cv:
        part = evaluate_cv(cv, args.models, args.rules, stacked=args.stacked,
                           workers=args.workers)
        if part["protocol"] in results:
            parser.error(f"two folders of protocol {part['protocol']!r}: give one of each")
        results[part["protocol"]] = part
    by = args.select_by or ("cluster" if "cluster" in results else next(iter(results)))
    if by not in results:
        parser.error(f"--select-by {by!r}: no folder of that protocol among {list(results)}")
    first = next(iter(results.values()))
    rules = args.rules or [first["threshold"]]
    order = [candidate(n, r, rules, stacked=s) for n in args.models for r in rules
             for s in (False, True)]
    report: dict[str, Any] = {"positive": first["positive"], "protocols": results,
                              "selection": select(results, by, order)}
    if args.cell_types:
        report["baseline"] = {"signed promyelocyte fraction (no model, all patients)":
                              signed_promyelocyte_baseline(
                                  args.cell_types, first_config(args.cv[0])["taxonomy"],
                                  first["positive"])}
    write_results(args, "patient_models", report)
    print(json.dumps(report, indent=2))
    if args.out:
        from resultfile import patient_models_table

        args.out.write_text(patient_models_table(report) + "\n")


def first_config(cv: Path) -> dict[str, Any]:
    return CVDir(cv).read_summary()["config"]


if __name__ == "__main__":
    main()
