"""``leukotree evaluate``: metrics, tables, plots and predictions of a model on data."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukotree import plots
from leukotree.checkpoint import load_model
from leukotree.data import Sample, discover
from leukotree.errors import LeukotreeError
from leukotree.htmlreport import write_html
from leukotree.inference import predict_paths
from leukotree.metrics import (
    aggregate_patients,
    binary_metrics,
    classification_metrics,
    decode_argmax,
    reliability_bins,
    threshold_for_sensitivity,
)
from leukotree.taxonomy import Taxonomy


@dataclass
class EvalSettings:
    threshold: float | None = None
    target_sensitivity: float | None = None
    positive: str | None = None
    aggregate: str = "majority"
    min_cells: int = 1
    batch_size: int = 64
    workers: int = 2
    progress: bool = True
    tta: bool = False


def _validation_samples(run: Path) -> list[tuple[Path, str]]:
    return [(Path(r["path"]), r["label"]) for r in split_rows(run, "val")]


def validation_manifest(run: Path, out: Path) -> Path:
    """Write the validation images of a run (from its split.csv) as a manifest CSV."""
    rows = split_rows(run, "val")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "slide"])
        writer.writerows([r["path"], r["label"], r["patient"], r["slide"]] for r in rows)
    return out


def split_rows(run: Path, part: str) -> list[dict[str, str]]:
    """Rows of a run's split.csv whose split is ``part`` (``train`` or ``val``)."""
    split = Path(run) / "split.csv"
    if not split.exists():
        raise LeukotreeError(f"'{run}' has no split.csv; it is not a run folder written by "
                             "'leukotree train'.")
    with split.open() as handle:
        return [r for r in csv.DictReader(handle) if r["split"] == part]


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
    settings: EvalSettings | None = None,
    *,
    patients: str = "auto",
    labels: str = "folder",
) -> dict[str, Any]:
    """Evaluate the model of ``run`` on ``data``; write metrics.json, metrics.md, plots."""
    settings = settings or EvalSettings()
    run, out = Path(run), Path(out)
    model, payload = load_model(run)
    taxonomy: Taxonomy = model.taxonomy
    img_size = int(payload["model_config"]["img_size"])
    sample_set = discover(data, taxonomy, patients=patients, labels=labels)
    sample_set.raise_for_problems()
    samples = sample_set.samples
    preds = predict_paths(model, [s.path for s in samples], img_size,
                          batch_size=settings.batch_size, workers=settings.workers,
                          progress=settings.progress, on_error="raise", tta=settings.tta)
    probs = preds.leaf_probs.astype(np.float64)
    truth = [s.label for s in samples]
    metrics = classification_metrics(taxonomy, truth, probs)
    metrics["model"] = str(run)
    metrics["data"] = str(data)
    if metrics["leaves_absent"]:
        metrics["note"] = (f"{len(metrics['leaves_absent'])} leaves have no image in these data "
                           f"({', '.join(metrics['leaves_absent'])}); metrics cover the "
                           "leaves present.")

    if len(taxonomy.leaves) == 2:
        positive = settings.positive or taxonomy.leaves[0]
        if positive not in taxonomy.leaf_index:
            raise LeukotreeError(f"--positive '{positive}' is not a leaf of taxonomy "
                                 f"'{taxonomy.name}' ({', '.join(taxonomy.leaves)}).")
        threshold, source = 0.5, "default"
        if settings.threshold is not None:
            threshold, source = settings.threshold, "given"
        elif settings.target_sensitivity is not None:
            val = _validation_samples(run)
            vp = predict_paths(model, [p for p, _ in val], img_size, progress=False,
                               on_error="raise", batch_size=settings.batch_size,
                               tta=settings.tta)
            k = taxonomy.leaf_index[positive]
            threshold = threshold_for_sensitivity(
                vp.leaf_probs[:, k], np.array([lab == positive for _, lab in val]),
                settings.target_sensitivity)
            source = f"sensitivity >= {settings.target_sensitivity} on the run's validation split"
        metrics["binary"] = binary_block(taxonomy, truth, probs, threshold, positive)
        metrics["binary"]["threshold_source"] = source

    metrics["patient_level"] = patient_level(taxonomy, samples, probs, settings)
    out.mkdir(parents=True, exist_ok=True)
    metrics["figures"] = write_figures(taxonomy, truth, probs, metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    (out / "metrics.md").write_text(metrics_markdown(metrics))
    write_html(out / "metrics.md", f"leukotree evaluation of {run}")
    write_predictions(out / "predictions.csv", taxonomy, samples, probs)
    return metrics


def _json_default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def patient_level(taxonomy: Taxonomy, samples: list[Sample], probs: np.ndarray,
                  settings: EvalSettings) -> dict[str, Any] | None:
    """Metrics after aggregating each patient's cells, when every patient has one label."""
    patients = [s.patient for s in samples]
    if not any(patients):
        return None
    labels_of: dict[str, Counter[str]] = {}
    for s in samples:
        if s.patient:
            labels_of.setdefault(s.patient, Counter())[s.label] = 1
    patient_label: dict[str, str] = {}
    mixed = []
    for patient, counts in labels_of.items():
        deepest = max(counts, key=taxonomy.depth)
        # Cells labelled at an ancestor of the deepest label ("Acute" beside "ALL") agree.
        if all(lab in taxonomy.path(deepest) for lab in counts):
            patient_label[patient] = deepest
        else:
            mixed.append(patient)
    if mixed:
        return {"skipped": f"{len(mixed)} patient(s) have cells of several labels (e.g. "
                           f"{mixed[0]}); patient-level diagnosis needs one label per patient"}
    agg = aggregate_patients(patients, probs, method=settings.aggregate,
                             min_cells=settings.min_cells)
    decided = [p for p, a in agg.items() if a["decision"] is not None]
    insufficient = sorted(set(agg) - set(decided))
    out: dict[str, Any] = {"method": settings.aggregate, "min_cells": settings.min_cells,
                           "n_patients": len(agg), "insufficient": insufficient}
    if decided:
        key = "vote_shares" if settings.aggregate == "majority" else "mean_probs"
        p_probs = np.stack([agg[p][key] for p in decided])
        if settings.aggregate == "majority":  # decision = argmax incl. tie-break
            p_probs = p_probs + 1e-6 * np.stack([agg[p]["mean_probs"] for p in decided])
            p_probs = p_probs / p_probs.sum(1, keepdims=True)
        p_truth = [patient_label[p] for p in decided]
        out.update(classification_metrics(taxonomy, p_truth, p_probs))
        out["patients"] = {p: {"truth": t, "decision": taxonomy.leaves[agg[p]["decision"]],
                               "n_cells": agg[p]["n_cells"]}
                           for p, t in zip(decided, p_truth, strict=True)}
    return out


def write_figures(taxonomy: Taxonomy, truth: list[str], probs: np.ndarray,
                  metrics: dict[str, Any], out: Path) -> dict[str, str]:
    figures: dict[str, str] = {}
    if "confusion_matrix" not in metrics:
        return figures
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    leaves = list(taxonomy.leaves)
    exact = taxonomy.encode_leaves(truth)
    keep = exact >= 0
    for name, path in (
        ("confusion", plots.confusion(matrix, leaves, out / "confusion.png", normalize=False)),
        ("confusion_normalized", plots.confusion(matrix, leaves,
                                                 out / "confusion_normalized.png",
                                                 normalize=True)),
        ("roc", plots.roc_curves(exact[keep], probs[keep], leaves, out / "roc.png")),
        ("reliability", plots.reliability(reliability_bins(probs[keep], exact[keep]),
                                          out / "reliability.png")),
    ):
        if path is not None:
            figures[name] = path.name
    return figures


def write_predictions(path: Path, taxonomy: Taxonomy, samples: list[Sample],
                      probs: np.ndarray) -> None:
    pred = decode_argmax(taxonomy, probs)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "predicted",
                         *[f"p_{leaf}" for leaf in taxonomy.leaves]])
        for s, p, row in zip(samples, pred, probs, strict=True):
            writer.writerow([str(s.path), s.label, s.patient or "", p,
                             *[f"{v:.6f}" for v in row]])


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return str(value)


def metrics_markdown(m: dict[str, Any]) -> str:
    """Human-readable tables of a metrics.json dict."""
    lines = [f"# Evaluation of {m.get('model', '')}", "", f"Data: {m.get('data', '')}", ""]
    if m.get("note"):
        lines += [f"> {m['note']}", ""]
    lines += ["| metric | value |", "|---|---|"]
    for key in ("n_images", "accuracy", "macro_f1", "weighted_f1", "auroc_macro",
                "tree_accuracy"):
        lines.append(f"| {key} | {_fmt(m.get(key))} |")
    for key, value in m.get("hierarchical", {}).items():
        lines.append(f"| {key} | {_fmt(value)} |")
    lines += ["", "## Per node (choosing among the children)", "",
              "| node | children | n | accuracy |", "|---|---|---|---|"]
    for node, row in m.get("per_node", {}).items():
        lines.append(f"| {node} | {' / '.join(row['children'])} | {row['n']} | "
                     f"{_fmt(row['accuracy'])} |")
    if "per_class" in m:
        lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |",
                  "|---|---|---|---|---|"]
        for name, row in m["per_class"].items():
            lines.append(f"| {name} | {_fmt(row['precision'])} | {_fmt(row['recall'])} | "
                         f"{_fmt(row['f1'])} | {row['support']} |")
    if "binary" in m:
        b = m["binary"]
        lines += ["", f"## Binary (positive: {b['positive']}, threshold {b['threshold']:.4f}, "
                      f"{b['threshold_source']})", "", "| metric | value |", "|---|---|"]
        for key in ("tp", "tn", "fp", "fn", "accuracy", "prevalence", "sensitivity",
                    "specificity", "ppv", "npv", "auc", "f1"):
            lines.append(f"| {key} | {_fmt(b[key])} |")
    pl = m.get("patient_level")
    if pl:
        lines += ["", "## Patient level", ""]
        if "skipped" in pl:
            lines.append(pl["skipped"])
        else:
            lines.append(f"{pl['n_patients']} patients, aggregation '{pl['method']}', "
                         f"{len(pl['insufficient'])} with fewer than {pl['min_cells']} cells "
                         f"(insufficient); accuracy {_fmt(pl.get('accuracy'))}, macro F1 "
                         f"{_fmt(pl.get('macro_f1'))}.")
    for name, file in m.get("figures", {}).items():
        lines += ["", f"![{name}]({file})"]
    return "\n".join(lines) + "\n"
