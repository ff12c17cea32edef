"""``leukotree compare``: CV results of several models side by side.

Writes the seed paper's tables from out-of-fold predictions:

- Table 2: accuracy, macro F1 and AUROC per fold (:func:`~leukotree.report.tables.cv_document`);
- Table 3: per-node accuracies and all-leaves accuracy for each model, with
  patient-bootstrap 95% confidence intervals;
- Table 4: per-class precision, recall and F1 of each model;
- a paired test of each model against the first one across folds (paired t-test and
  Wilcoxon signed-rank test on fold accuracies);
- the model the one-standard-error rule picks (:mod:`leukotree.evaluation.selection`),
  the folders taken as given from the simplest model to the most complex, by a fold
  metric (``select_by``, accuracy by default; e.g. ``patient_auroc``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_fscore_support

from leukotree.errors import LeukotreeError
from leukotree.evaluation.selection import LOWER_IS_BETTER, one_standard_error
from leukotree.report.html import write_document
from leukotree.report.tables import comparison_document, cv_document
from leukotree.rundir import CVDir, write_json
from leukotree.taxonomy import Taxonomy
from leukotree.tree import node_choices

#: Files written by :func:`compare` (plus ``comparison.html``).
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"


def load_cv(folder: Path) -> dict[str, Any]:
    """Summary, taxonomy and pooled out-of-fold predictions of a ``leukotree cv`` folder."""
    cv = CVDir(folder)
    summary = cv.read_summary()
    rows: list[dict[str, str]] = []
    for fold in summary["folds"]:
        for row in cv.fold(fold["fold"]).eval_dir.read_predictions():
            row["fold"] = str(fold["fold"])
            rows.append(row)
    taxonomy = Taxonomy.from_yaml(cv.fold(summary["folds"][0]["fold"]).taxonomy)
    probs = np.array([[float(r[f"p_{leaf}"]) for leaf in taxonomy.leaves] for r in rows])
    return {"summary": summary, "rows": rows, "probs": probs, "taxonomy": taxonomy,
            "name": summary.get("model", folder.name), "folder": str(folder)}


def bootstrap_ci(correct: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
                 ) -> tuple[float, float]:
    """95% interval of the mean of ``correct`` when whole groups (patients) are resampled."""
    rng = np.random.default_rng(seed)
    uniq, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=correct.astype(float))
    counts = np.bincount(inverse)
    stats_ = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(uniq), len(uniq))
        stats_.append(sums[pick].sum() / max(counts[pick].sum(), 1))
    lo, hi = np.percentile(stats_, [2.5, 97.5])
    return float(lo), float(hi)


def _groups(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([r["patient"] or r["path"] for r in rows])


def compare(folders: list[str | Path], out: str | Path, *, n_boot: int = 1000,
            select_by: str = "accuracy") -> dict[str, Any]:
    """Compare CV folders; write ``comparison.json`` and ``comparison.md`` under ``out``."""
    if len(folders) < 1:
        raise LeukotreeError("Give at least one CV folder to compare.")
    runs = [load_cv(Path(f)) for f in folders]
    names = [r["name"] for r in runs]
    for r in runs:  # two runs of one head and backbone (focal vs ce, say) keep apart
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({r['folder']})"
            r["summary"] = r["summary"] | {"model": r["name"]}
    taxonomy = runs[0]["taxonomy"]
    for r in runs[1:]:
        if r["taxonomy"] != taxonomy:
            raise LeukotreeError(f"'{r['folder']}' uses another taxonomy than '{folders[0]}'; "
                                 "only runs on the same taxonomy can be compared.")
    notes: list[str] = []
    ref_assign = {(r["path"], r["fold"]) for r in runs[0]["rows"]}
    for r in runs[1:]:
        if {(x["path"], x["fold"]) for x in r["rows"]} != ref_assign:
            notes.append(f"'{r['folder']}' used other folds than '{folders[0]}': the paired "
                         "test assumes the same folds")
    table3: dict[str, dict[str, Any]] = {}
    table4: dict[str, dict[str, Any]] = {}
    for r in runs:
        truth = [row["label"] for row in r["rows"]]
        leaf_idx = taxonomy.encode_leaves(truth)
        exact = leaf_idx >= 0
        pred = r["probs"].argmax(1)
        groups = _groups(r["rows"])
        correct = (pred == leaf_idx)[exact]
        entry: dict[str, Any] = {
            "all_leaves": {"accuracy": float(correct.mean()) if len(correct) else None,
                           "ci95": bootstrap_ci(correct, groups[exact], n_boot)},
        }
        for choice in node_choices(taxonomy, truth, r["probs"]):
            entry[choice.node] = {"accuracy": float(choice.hit.mean()),
                                  "ci95": bootstrap_ci(choice.hit, groups[choice.rows], n_boot),
                                  "children": list(taxonomy.children(choice.node))}
        table3[r["name"]] = entry
        present = sorted(set(leaf_idx[exact].tolist()))
        prec, rec, f1, sup = precision_recall_fscore_support(
            leaf_idx[exact], pred[exact], labels=present, zero_division=0)
        table4[r["name"]] = {
            taxonomy.leaves[c]: {"precision": float(p), "recall": float(q), "f1": float(f),
                                 "support": int(s)}
            for c, p, q, f, s in zip(present, prec, rec, f1, sup, strict=True)}
    tests = paired_tests(runs)
    result = {"models": [r["name"] for r in runs], "folders": [str(f) for f in folders],
              "table3": table3, "table4": table4, "paired_tests": tests, "notes": notes,
              "one_se": select_one_se(runs, select_by)}
    out = Path(out)
    write_json(out / COMPARISON_JSON, result)
    doc = cv_document([r["summary"] for r in runs])
    doc.title = "leukotree comparison"
    doc.extend(comparison_document(result, taxonomy))
    write_document(doc, out / COMPARISON_MD)
    return result


def select_one_se(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The one-standard-error choice among ``runs`` (simplest first) by their fold
    ``metric``; a metric some run lacks is refused with the ones they all have."""
    have = set.intersection(*({k for f in r["summary"]["folds"] for k in f} for r in runs))
    if metric not in have - {"fold", "repeat", "n_images"}:
        raise LeukotreeError(f"--select-by '{metric}' is not a fold metric of every compared "
                             f"CV; choose one of: {', '.join(sorted(have - {'fold', 'repeat'}))}.")
    pick = one_standard_error(
        {r["name"]: [float(f.get(metric, float("nan"))) for f in r["summary"]["folds"]]
         for r in runs}, [r["name"] for r in runs], higher_is_better=metric not in
        LOWER_IS_BETTER)
    return {"metric": metric, **pick.to_dict()}


def paired_tests(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold-wise accuracy differences of each model against the first, with p-values."""
    out = []
    ref = [f.get("accuracy", float("nan")) for f in runs[0]["summary"]["folds"]]
    for r in runs[1:]:
        acc = [f.get("accuracy", float("nan")) for f in r["summary"]["folds"]]
        n = min(len(ref), len(acc))
        diff = np.array(acc[:n]) - np.array(ref[:n])
        entry: dict[str, Any] = {"model": r["name"], "reference": runs[0]["name"],
                                 "folds": n, "mean_difference": float(np.mean(diff))}
        if n >= 2 and np.any(diff != 0):
            entry["t_test_p"] = float(stats.ttest_rel(acc[:n], ref[:n]).pvalue)
            entry["wilcoxon_p"] = float(stats.wilcoxon(diff).pvalue)
        else:
            entry["t_test_p"] = entry["wilcoxon_p"] = None
        out.append(entry)
    return out
