"""``leukotree compare``: CV results of several models side by side.

Writes the seed paper's tables from out-of-fold predictions:

- Table 2: accuracy, macro F1 and AUROC per fold (``leukotree.cv.summary_markdown``);
- Table 3: per-node accuracies and all-leaves accuracy for each model, with
  patient-bootstrap 95% confidence intervals;
- Table 4: per-class precision, recall and F1 of each model;
- a paired test of each model against the first one across folds (paired t-test and
  Wilcoxon signed-rank test on fold accuracies).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import precision_recall_fscore_support

from leukotree.cv import summary_markdown
from leukotree.errors import LeukotreeError
from leukotree.htmlreport import write_html
from leukotree.metrics import per_node_accuracy
from leukotree.taxonomy import Taxonomy


def load_cv(folder: Path) -> dict[str, Any]:
    """Summary, taxonomy and pooled out-of-fold predictions of a ``leukotree cv`` folder."""
    summary_path = folder / "summary.json"
    if not summary_path.exists():
        raise LeukotreeError(f"'{folder}' has no summary.json; is it a folder written by "
                             "'leukotree cv'?")
    summary = json.loads(summary_path.read_text())
    rows: list[dict[str, str]] = []
    for fold in summary["folds"]:
        pred = folder / f"fold_{fold['fold']}" / "eval" / "predictions.csv"
        with pred.open() as handle:
            for row in csv.DictReader(handle):
                row["fold"] = str(fold["fold"])
                rows.append(row)
    taxonomy = Taxonomy.from_yaml(folder / "fold_0" / "taxonomy.yaml")
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
            ) -> dict[str, Any]:
    """Compare CV folders; write ``comparison.json`` and ``comparison.md`` under ``out``."""
    if len(folders) < 1:
        raise LeukotreeError("Give at least one CV folder to compare.")
    runs = [load_cv(Path(f)) for f in folders]
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
        node_acc = per_node_accuracy(taxonomy, truth, r["probs"])
        targets = taxonomy.encode_heads(truth)
        node_p = r["probs"] @ taxonomy.node_leaf_matrix().T
        for k, node in enumerate(taxonomy.inner_nodes):
            rows_k = np.flatnonzero(targets[:, k] >= 0)
            if not len(rows_k):
                continue
            cols = [taxonomy.node_index[c] for c in taxonomy.children(node)]
            hit = node_p[rows_k][:, cols].argmax(1) == targets[rows_k, k]
            entry[node] = {"accuracy": node_acc[node]["accuracy"],
                           "ci95": bootstrap_ci(hit, groups[rows_k], n_boot),
                           "children": list(taxonomy.children(node))}
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
              "table3": table3, "table4": table4, "paired_tests": tests, "notes": notes}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(json.dumps(result, indent=2))
    md = [summary_markdown([r["summary"] for r in runs]), comparison_markdown(result, taxonomy)]
    (out / "comparison.md").write_text("\n".join(md))
    write_html(out / "comparison.md", "leukotree comparison")
    return result


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


def _pct(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"


def comparison_markdown(result: dict[str, Any], taxonomy: Taxonomy) -> str:
    models = result["models"]
    lines = ["## Table 3: per-node and all-leaves accuracy (%, patient-bootstrap 95% CI)", "",
             "| task | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for node in [*taxonomy.inner_nodes, "all_leaves"]:
        label = ("All leaves" if node == "all_leaves"
                 else f"{node}: {' vs '.join(taxonomy.children(node))}")
        cells = []
        for m in models:
            e = result["table3"][m].get(node)
            cells.append("-" if e is None or e["accuracy"] is None else
                         f"{_pct(e['accuracy'])} [{_pct(e['ci95'][0])}, {_pct(e['ci95'][1])}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Table 4: per-class precision / recall / F1 (%)", "",
              "| class | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for leaf in taxonomy.leaves:
        cells = []
        for m in models:
            e = result["table4"][m].get(leaf)
            cells.append("-" if e is None else
                         f"{_pct(e['precision'])} / {_pct(e['recall'])} / {_pct(e['f1'])}")
        lines.append(f"| {leaf} | " + " | ".join(cells) + " |")
    if result["paired_tests"]:
        lines += ["", "## Paired tests on fold accuracies (vs the first model)", "",
                  "| model | folds | mean difference | paired t p | Wilcoxon p |",
                  "|---|---|---|---|---|"]
        for t in result["paired_tests"]:
            p1 = "-" if t["t_test_p"] is None else f"{t['t_test_p']:.4f}"
            p2 = "-" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.4f}"
            lines.append(f"| {t['model']} | {t['folds']} | {_pct(t['mean_difference'])} | "
                         f"{p1} | {p2} |")
        lines.append("")
        lines.append("With 5 folds the Wilcoxon test cannot go below p = 0.0625; read it as "
                     "a sign, not a verdict.")
    for note in result["notes"]:
        lines.append(f"\n> note: {note}")
    return "\n".join(lines) + "\n"
