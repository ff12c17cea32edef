"""``leukotree report``: one self-contained HTML page for one patient's cells.

The page holds the diagnosis (majority vote or mean probability) with the
probability of every level of its path, the vote shares, the number of cells,
the referral decision (:func:`~leukotree.inference.decisions.decide_patient`, the
same rule as ``predict --by-patient``), the unreadable files by name, the most
telling cells with their heat maps, and the model card (taxonomy, training data,
validation metrics). Images are embedded, so the file opens offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.data.discover import collect_inputs
from leukotree.data.images import DEFAULT_MAX_PIXELS, load_rgb_array
from leukotree.errors import LeukotreeError, display_path
from leukotree.inference.decisions import (
    PatientDecision,
    aggregate_patients,
    decide_patient,
    parse_thresholds,
)
from leukotree.inference.predictor import Predictions, TorchPredictor, predict_paths
from leukotree.models import TreeClassifier
from leukotree.models.checkpoint import load_model
from leukotree.report.html import esc, page, png_data_uri, table_html
from leukotree.rundir import write_text
from leukotree.taxonomy import Taxonomy


def patient_report(
    run: str | Path,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    patient: str | None = None,
    method: str = "majority",
    confidence: str | None = "0.6",
    min_cells: int = 1,
    top_cells: int = 8,
    heatmaps: bool = True,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Write the HTML report for the cells in ``inputs``; returns the decision."""
    model, payload = load_model(run)
    tax = model.taxonomy
    found = collect_inputs(inputs, taxonomy=tax)
    preds = predict_paths(TorchPredictor(model), [i.path for i in found.images],
                          progress=progress, on_error="report", max_pixels=max_pixels)
    ok = np.flatnonzero(preds.ok)
    if len(ok) == 0:
        raise LeukotreeError("None of the given images can be read; nothing to report.")
    probs = preds.leaf_probs[ok].astype(np.float64)
    name = patient or "patient"
    agg = aggregate_patients([name] * len(ok), probs, method=method, min_cells=min_cells)[name]
    decision = decide_patient(tax, name, agg, parse_thresholds(confidence, tax.max_depth),
                              method, min_cells)
    bad = [e for e in preds.errors if e is not None]
    not_used = [display_path(p) for p in found.not_used]
    body = "\n".join([
        f"<h1>Patient {esc(name)}</h1>",
        f"<p class='sub'>{len(ok)} cells analysed ({len(bad)} unreadable); aggregation: "
        f"{esc(method)}; model: {esc(run)}. For research use; not a diagnostic device.</p>",
        f"<div class='diag{' refer' if decision.refer else ''}'>"
        f"{esc(_headline(tax, decision, len(ok), min_cells))}</div>",
        _levels_html(tax, decision),
        _unreadable_html(bad, not_used),
        "<h2>Most telling cells</h2>",
        _cell_grid(model, preds, ok, probs, decision.leaf, top_cells, heatmaps),
        "<h2>Model card</h2>", model_card_html(model, payload),
    ])
    out = Path(out)
    write_text(out, page(f"leukotree report: {name}", body))
    return {"patient": name, "diagnosis": decision.leaf, "refer": decision.refer,
            "reason": decision.reason, "n_cells": len(ok),
            "reported_node": decision.reported_node, "unreadable": bad,
            "not_used": not_used, "report": str(out)}


def _headline(tax: Taxonomy, d: PatientDecision, n_ok: int, min_cells: int) -> str:
    if d.leaf is None:
        return f"Insufficient: {n_ok} readable cell(s), at least {min_cells} needed"
    if not d.refer:
        return " → ".join(tax.path(d.leaf))
    known = " → ".join(tax.path(d.reported_node)) if d.reported_node != tax.root else "no level"
    return f"{known}, finer class uncertain (referral advised: {d.reason}); best guess {d.leaf}"


def _levels_html(tax: Taxonomy, d: PatientDecision) -> str:
    rows = "".join(
        f"<tr><td>{esc(n)}</td><td>{d.node_probs[tax.node_index[n]]:.3f}</td>"
        f"<td><span class='bar' style='width:{int(200 * d.node_probs[tax.node_index[n]])}px'>"
        "</span></td></tr>" for n in (tax.path(d.leaf) if d.leaf else ()))
    votes = table_html(["class", "vote share", "mean P"],
                       [[lf, f"{d.vote_shares[i]:.2f}", f"{d.mean_probs[i]:.3f}"]
                        for i, lf in enumerate(tax.leaves)])
    return ("<h2>Probability of each level (mean over cells)</h2>"
            f"<table><tr><th>node</th><th>P</th><th></th></tr>{rows}</table>"
            f"<h2>Votes and mean probabilities per class</h2>{votes}")


def _unreadable_html(errors: list[str], not_used: list[str]) -> str:
    out = ""
    if errors:
        items = "".join(f"<li>{esc(e)}</li>" for e in errors)
        out += f"<h2>Unreadable files ({len(errors)}), not used</h2><ul>{items}</ul>"
    if not_used:
        items = "".join(f"<li>{esc(p)}</li>" for p in not_used)
        out += (f"<h2>Other files ({len(not_used)}): hidden or not images, not used</h2>"
                f"<ul>{items}</ul>")
    return out


def model_card_html(model: TreeClassifier, payload: dict[str, Any]) -> str:
    """Taxonomy, architecture, training data and validation metrics of a checkpoint."""
    cfg = model.config
    extra = payload.get("extra", {})
    rows = [
        ["head / backbone", f"{cfg.head} / {cfg.arch_name}"],
        ["image size, centre crop", f"{cfg.img_size}px, {cfg.crop_fraction:.2f}"],
        ["training data", f"{extra.get('data', '?')} ({extra.get('train_images', '?')} train "
                          f"/ {extra.get('val_images', '?')} val images)"],
        ["best epoch", str(extra.get("epoch", "?"))],
        *([k, f"{v:.4f}"] for k, v in extra.get("metrics", {}).items() if k.startswith("val_")),
        ["leukotree", str(payload.get("environment", {}).get("leukotree"))],
    ]
    return f"<pre>{esc(model.taxonomy.render())}</pre>" + table_html(["item", "value"], rows)


def _cell_grid(model: TreeClassifier, preds: Predictions, ok: np.ndarray, probs: np.ndarray,
               leaf: str | None, top: int, heatmaps: bool) -> str:
    if leaf is None:
        return "<p>No diagnosis, no cells shown.</p>"
    k = model.taxonomy.leaf_index[leaf]
    order = np.argsort(-probs[:, k])[:top]
    size, crop = model.config.img_size, model.config.crop_fraction
    cells = [load_rgb_array(preds.paths[ok[i]], size, crop=crop) for i in order]
    maps, note = _heatmaps(model, cells, leaf) if heatmaps else ({}, "")
    items = []
    for rank, i in enumerate(order):
        pair = f"<img src='{png_data_uri(cells[rank])}' alt='cell'>"
        if rank in maps:
            pair += f"<img src='{png_data_uri(maps[rank])}' alt='heat map'>"
        items.append(f"<div class='cell'>{pair}<br>{esc(preds.paths[ok[i]].name)}"
                     f"<br>P({esc(leaf)}) = {probs[i, k]:.2f}</div>")
    note_html = f"<p class='sub'>Heat maps not drawn: {esc(note)}</p>" if note else ""
    return note_html + "<div class='cells'>" + "".join(items) + "</div>"


def _heatmaps(model: TreeClassifier, cells: list[np.ndarray], leaf: str,
              ) -> tuple[dict[int, np.ndarray], str]:
    """Grad-CAM overlays of ``leaf``; none, with the reason, when they cannot be drawn (the
    explain extra is missing, or the model has no spatial feature map)."""
    from leukotree.inference.explain import HeatMapper

    try:
        with HeatMapper(model) as mapper:
            return {i: mapper.overlay(pixels, leaf) for i, pixels in enumerate(cells)}, ""
    except LeukotreeError as err:
        return {}, str(err)
