"""``leukotree cv``: train and evaluate every fold of patient-grouped cross-validation.

``DIR/fold_<k>/`` holds each fold's run (``best.pt``, ``history.csv``...) and its
evaluation on the held-out fold (``eval/metrics.json``, ``eval/predictions.csv``).
A half-finished CV resumes: evaluated folds are kept, an interrupted fold resumes
from its ``last.pt``. ``DIR/summary.json`` and ``DIR/summary.md`` gather the folds.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from leukotree.config import TrainConfig, save_config
from leukotree.errors import LeukotreeError
from leukotree.evaluate import EvalSettings, evaluate, validation_manifest
from leukotree.htmlreport import write_html
from leukotree.train import train

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
    "patient_accuracy": ("patient_level", "accuracy"),
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


def cross_validate(
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    folds: int = 5,
    settings: EvalSettings | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``folds``-fold CV and write ``summary.json`` and ``summary.md``."""
    if folds < 2:
        raise LeukotreeError(f"The 'folds' parameter must be at least 2; got {folds}.")
    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = replace(config, folds=folds, fold=None)
    saved = out / "cv_config.yaml"
    if saved.exists():
        from leukotree.config import load_config

        previous = load_config(saved)
        if previous.to_dict() != base.to_dict():
            raise LeukotreeError(
                f"'{out}' holds a CV with other options (see {saved}); resume it with the same "
                "options or choose another --out.")
    else:
        save_config(base, saved)
    settings = settings or EvalSettings(progress=progress)
    per_fold: list[dict[str, Any]] = []
    for k in range(folds):
        fold_dir = out / f"fold_{k}"
        metrics_path = fold_dir / "eval" / "metrics.json"
        if metrics_path.exists():
            console.print(f"fold {k}: already evaluated, kept")
        else:
            console.rule(f"fold {k + 1} of {folds}")
            train(data, fold_dir, replace(base, fold=k),
                  resume=(fold_dir / "last.pt").exists(), progress=progress)
            manifest = validation_manifest(fold_dir, fold_dir / "val.csv")
            evaluate(fold_dir, manifest, fold_dir / "eval", settings,
                     patients=config.patients, labels=config.labels)
        metrics = json.loads(metrics_path.read_text())
        per_fold.append({"fold": k, "n_images": metrics["n_images"], **fold_scalars(metrics)})
    keys = sorted({key for row in per_fold for key in row} - {"fold", "n_images"})
    arch = "+".join(config.hybrid_backbones) if config.head == "hybrid" else config.model
    summary = {
        "model": f"{config.head}/{arch}",
        "head": config.head, "folds": per_fold,
        "mean": {key: mean_std([row.get(key, float("nan")) for row in per_fold])
                 for key in keys},
        "config": base.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_markdown([summary]) + _fold_figures(out, per_fold))
    write_html(out / "summary.md", f"leukotree cross-validation in {out}")
    return summary


def _fold_figures(out: Path, per_fold: list[dict[str, Any]]) -> str:
    """Markdown links to each fold's report and its figures."""
    lines = ["", "## Folds", ""]
    for row in per_fold:
        k = row["fold"]
        lines.append(f"### Fold {k + 1}: [report](fold_{k}/eval/metrics.html)")
        lines.append("")
        for name in ("learning_curves.png", "eval/confusion_normalized.png", "eval/roc.png",
                     "eval/reliability.png"):
            if (out / f"fold_{k}" / name).exists():
                lines.append(f"![fold {k + 1} {name}](fold_{k}/{name})")
        lines.append("")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def summary_markdown(summaries: list[dict[str, Any]]) -> str:
    """Table 2 of the paper: accuracy, F1 and AUROC per fold and model, then mean ± std."""
    header = "| Fold | " + " | ".join(
        f"{s['model']} ACC | {s['model']} F1 | {s['model']} AUROC" for s in summaries) + " |"
    lines = ["# Cross-validation (values in %)", "", header,
             "|---|" + "---|" * (3 * len(summaries))]
    n = max(len(s["folds"]) for s in summaries)
    for k in range(n):
        cells = []
        for s in summaries:
            row = s["folds"][k] if k < len(s["folds"]) else {}
            cells += [_cell(row.get("accuracy")), _cell(row.get("macro_f1")),
                      _cell(row.get("auroc_macro"))]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    cells = []
    for s in summaries:
        for key in ("accuracy", "macro_f1", "auroc_macro"):
            m = s["mean"].get(key, {"mean": float("nan"), "std": float("nan")})
            cells.append(f"{_cell(m['mean'])} ± {_cell(m['std'])}")
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    lines += ["", "Hierarchical and per-node metrics (mean ± std over folds, %):", "",
              "| metric | " + " | ".join(s["model"] for s in summaries) + " |",
              "|---|" + "---|" * len(summaries)]
    keys = sorted({k for s in summaries for k in s["mean"]} - {"accuracy", "macro_f1",
                                                               "auroc_macro"})
    for key in keys:
        cells = []
        for s in summaries:
            m = s["mean"].get(key)
            cells.append("-" if m is None else f"{_cell(m['mean'])} ± {_cell(m['std'])}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
