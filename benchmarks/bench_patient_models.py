"""Every patient-level model on the cell models of one cross-validation; prints JSON.

    python benchmarks/bench_patient_models.py CV_FOLDER [--cell-types MANIFEST]
        [--models vote mean fraction differential mil] [--out table.md]

For each fold of a ``leukotree cv`` folder (every repeat), the fold's cell model
describes its training and held-out cells once; each patient model is fitted on the
training patients (its threshold chosen on their out-of-fold scores, as ``train``
does) and diagnoses the held-out patients. The held-out patients of a repeat are
pooled: AUROC with a patient-bootstrap 95% CI, accuracy, sensitivity and specificity.

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

import numpy as np
from resultfile import add_json_option, write_results
from sklearn.metrics import roc_auc_score

from leukotree.inference.predictor import TorchPredictor, predict_paths
from leukotree.models.checkpoint import load_model
from leukotree.patients import fit_patient_model, make_bags, patient_labels
from leukotree.patients.fit import bootstrap_auroc
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
            "auroc_ci95": bootstrap_auroc(truth, score),
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
            m = stack(folds, name, rule=rule, positive=config.get("positive"),
                      seed=config["seed"], params=params).metrics
            out[f"{name}, threshold {rule}, stacked on out-of-fold outputs"] = {
                "patients": m["n_patients"], "auroc": m["auroc"], "auroc_ci95": m["auroc_ci95"],
                "accuracy": m["accuracy"], "sensitivity": m["sensitivity"],
                "specificity": m["specificity"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("cv", type=Path)
    parser.add_argument("--models", nargs="+", default=list(PATIENT_MODELS))
    parser.add_argument("--rules", nargs="+", default=None,
                        help="threshold rules to compare (default: the CV's own)")
    parser.add_argument("--cell-types", type=Path, help="manifest with a cell_type column")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stacked", action="store_true",
                        help="also each model stacked on the folds' out-of-fold outputs "
                             "(train --final-model folds), cross-fitted")
    parser.add_argument("--out", type=Path, help="also write a Markdown table here")
    add_json_option(parser)
    args = parser.parse_args()
    cv = CVDir(args.cv)
    summary = cv.read_summary()
    config = summary["config"]
    rules = args.rules or [config["patient_threshold"]]
    held_out: dict[tuple[str, str, int], list[tuple[str, float, str]]] = defaultdict(list)
    positive = None
    for row in summary["folds"]:
        run = cv.fold(row["fold"], row.get("repeat", 0))
        bags, model = fold_bags(run, args.workers)
        for name in args.models:
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
                    held_out[(name, rule, row.get("repeat", 0))].append(
                        (bag.label, float(p[k]), d))
    results = {f"{name}, threshold {rule} (repeat {r + 1})": pooled(rows, positive)
               for (name, rule, r), rows in sorted(held_out.items())}
    if args.stacked:
        results |= stacked_estimates(args.cv, args.models, rules, config, args.workers)
    if args.cell_types:
        results["signed promyelocyte fraction (no model, all patients)"] = \
            signed_promyelocyte_baseline(args.cell_types, config["taxonomy"], positive)
    report = {"cv": str(args.cv), "positive": positive, "threshold": config["patient_threshold"],
              "results": results}
    write_results(args, "patient_models", report)
    print(json.dumps(report, indent=2))
    if args.out:
        lines = ["| patient model | patients | AUROC [95% CI] | accuracy | sensitivity | "
                 "specificity |", "|---|---|---|---|---|---|"]
        for name, m in results.items():
            lo, hi = m["auroc_ci95"]
            lines.append(f"| {name} | {m['patients']} | {m['auroc']:.3f} [{lo:.3f}, {hi:.3f}] "
                         f"| {m.get('accuracy', float('nan')):.3f} | "
                         f"{m.get('sensitivity', float('nan')):.3f} | "
                         f"{m.get('specificity', float('nan')):.3f} |")
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
