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
    decide_patient_probs,
    domain_shift,
    parse_thresholds,
)
from leukotree.inference.predictor import (
    Predictions,
    Predictor,
    decode_groups,
    load_predictor,
    predict_paths,
    set_input,
)
from leukotree.models import TreeClassifier
from leukotree.patients.bags import make_bags
from leukotree.patients.fit import FittedPatientModel
from leukotree.report.html import esc, page, png_data_uri, table_html
from leukotree.report.model_card import model_card_html
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
    crop_mode: str | None = None,
    pixel_size: float | None = None,
) -> dict[str, Any]:
    """Write the HTML report for the cells in ``inputs``; returns the decision.

    With a patient-level model in the run, the diagnosis is that model's (with its
    threshold) and the cells shown are those that drove it most (attention, or the
    evidence for the diagnosis); otherwise the cells are aggregated by ``method``.
    ``crop_mode`` and ``pixel_size`` decode the images another way than the model's own
    (:func:`~leukotree.inference.predictor.set_input`).
    """
    predictor, info = load_predictor(run, engine="torch")
    predictor = set_input(predictor, crop_mode=crop_mode, pixel_size=pixel_size, source=run)
    model = getattr(predictor, "members", [predictor])[0].model  # heat maps, model card
    payload = info.get("payload") or {}
    tax = model.taxonomy
    found = collect_inputs(inputs, taxonomy=tax)
    sizes = [i.pixel_size for i in found.images]
    preds = predict_paths(predictor, [i.path for i in found.images], progress=progress,
                          on_error="report", max_pixels=max_pixels, pixel_sizes=sizes)
    if not preds.ok.any():
        raise LeukotreeError("None of the given images can be read; nothing to report.")
    odd = preds.unclassifiable
    alarm = domain_shift(odd[preds.ok], predictor.expected_ood) \
        if preds.ood_score is not None else None
    ok = np.flatnonzero(preds.classified)  # as predict: unclassifiable cells are left out
    if len(ok) == 0:
        raise LeukotreeError(
            f"All {int(odd.sum())} readable cells are unclassifiable (unlike the cells the "
            "model was trained on); no diagnosis is given." + (f" {alarm}" if alarm else ""))
    name = patient or "patient"
    decision, weights = _decide(predictor, preds, ok, name, method, min_cells,
                                parse_thresholds(confidence, tax.max_depth))
    bad = [e for e in preds.errors if e is not None]
    not_used = [display_path(p) for p in found.not_used]
    how = (f"patient model '{predictor.patient_model.model.name}'"
           if predictor.patient_model else f"aggregation: {method}")
    body = "\n".join([
        f"<h1>Patient {esc(name)}</h1>",
        f"<p class='sub'>{len(ok)} cells analysed ({len(bad)} unreadable, {int(odd.sum())} "
        f"unclassifiable and left out); {esc(how)}; "
        f"model: {esc(run)}. For research use; not a diagnostic device.</p>",
        f"<p class='err' id='domain-shift'>{esc(alarm)}</p>" if alarm else "",
        f"<div class='diag{' refer' if decision.refer else ''}'>"
        f"{esc(_headline(tax, decision, len(ok), min_cells))}</div>",
        _levels_html(tax, decision, predictor.patient_model),
        _differential_html(model.cell_taxonomy, preds.cell_probs, ok),
        _unreadable_html(bad, not_used),
        "<h2>The cells that drove the decision</h2>",
        _cell_grid(model, preds, ok, weights, decision.leaf, top_cells, heatmaps,
                   decode_groups(predictor.model_config, len(sizes), sizes)),
        "<h2>Model card</h2>", model_card_html(model, payload),
    ])
    out = Path(out)
    write_text(out, page(f"leukotree report: {name}", body))
    return {"patient": name, "diagnosis": decision.leaf, "refer": decision.refer,
            "reason": decision.reason, "n_cells": len(ok),
            "n_unclassifiable": int(odd.sum()), "domain_shift": alarm,
            "reported_node": decision.reported_node, "unreadable": bad,
            "not_used": not_used, "report": str(out)}


def _decide(predictor: Predictor, preds: Predictions, ok: np.ndarray, name: str,
            method: str, min_cells: int, thresholds: list[float],
            ) -> tuple[PatientDecision, np.ndarray]:
    """The patient's decision and each readable cell's weight in it."""
    tax = predictor.taxonomy
    probs = preds.leaf_probs[ok].astype(np.float64)
    agg = aggregate_patients([name] * len(ok), probs, method=method, min_cells=min_cells)[name]
    fitted = predictor.patient_model
    if fitted is None:
        decision = decide_patient(tax, name, agg, thresholds, method, min_cells)
        k = tax.leaf_index[decision.leaf] if decision.leaf else int(agg["mean_probs"].argmax())
        return decision, probs[:, k]
    features = preds.features[ok] if preds.features is not None else np.zeros((len(ok), 0))
    cells = preds.cell_probs[ok] if preds.cell_probs is not None else None
    extras = {k: v[ok] for k, v in preds.member_arrays().items()}
    bag = make_bags([name] * len(ok), probs, features, cells, extras=extras)[0]
    row = fitted.predict_proba([bag])[0]
    decision = decide_patient_probs(tax, name, row, fitted.diagnose(row[None])[0], len(ok),
                                    thresholds, min_cells, agg["vote_shares"],
                                    agg["mean_probs"])
    return decision, fitted.model.cell_weights(bag)


def _differential_html(cells: Taxonomy | None, cell_probs: np.ndarray | None,
                       ok: np.ndarray) -> str:
    """Predicted cell types of the readable cells: count, share and mean probability."""
    if cells is None or cell_probs is None:
        return ""
    probs = cell_probs[ok]
    counts = np.bincount(probs.argmax(1), minlength=len(cells.leaves))
    rows = [[leaf, str(int(n)), f"{100 * n / len(ok):.1f}%", f"{probs[:, i].mean():.3f}"]
            for i, (leaf, n) in enumerate(zip(cells.leaves, counts, strict=True)) if n]
    return ("<h2>Differential count (predicted cell types)</h2>"
            + table_html(["cell type", "cells", "share", "mean P"], rows))


def _headline(tax: Taxonomy, d: PatientDecision, n_ok: int, min_cells: int) -> str:
    if d.leaf is None:
        return f"Insufficient: {n_ok} readable cell(s), at least {min_cells} needed"
    if not d.refer:
        return " → ".join(tax.path(d.leaf))
    known = " → ".join(tax.path(d.reported_node)) if d.reported_node != tax.root else "no level"
    return f"{known}, finer class uncertain (referral advised: {d.reason}); best guess {d.leaf}"


def _levels_html(tax: Taxonomy, d: PatientDecision,
                 fitted: FittedPatientModel | None = None) -> str:
    basis = (f"patient model '{fitted.model.name}'" + (
        f", threshold P({fitted.positive}) >= {fitted.threshold:.3f}"
        if fitted.threshold is not None else "")) if fitted else "mean over cells"
    rows = "".join(
        f"<tr><td>{esc(n)}</td><td>{d.node_probs[tax.node_index[n]]:.3f}</td>"
        f"<td><span class='bar' style='width:{int(200 * d.node_probs[tax.node_index[n]])}px'>"
        "</span></td></tr>" for n in (tax.path(d.leaf) if d.leaf else ()))
    votes = table_html(["class", "vote share", "mean P"],
                       [[lf, f"{d.vote_shares[i]:.2f}", f"{d.mean_probs[i]:.3f}"]
                        for i, lf in enumerate(tax.leaves)])
    return (f"<h2>Probability of each level ({esc(basis)})</h2>"
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


def _cell_grid(model: TreeClassifier, preds: Predictions, ok: np.ndarray,
               weights: np.ndarray, leaf: str | None, top: int, heatmaps: bool,
               groups: list[tuple[np.ndarray, dict[str, Any]]]) -> str:
    """The ``top`` readable cells by their weight in the decision, with heat maps (each
    decoded as the predictions were: ``groups`` from
    :func:`~leukotree.inference.predictor.decode_groups`)."""
    decode = {int(i): options for rows, options in groups for i in rows}
    if leaf is None:
        return "<p>No diagnosis, no cells shown.</p>"
    k = model.taxonomy.leaf_index[leaf]
    probs = preds.leaf_probs[ok]
    order = np.argsort(-weights, kind="stable")[:top]
    cells = [load_rgb_array(preds.paths[ok[i]], model.config.img_size, **decode[ok[i]])
             for i in order]
    maps, note = _heatmaps(model, cells, leaf) if heatmaps else ({}, "")
    items = []
    for rank, i in enumerate(order):
        pair = f"<img src='{png_data_uri(cells[rank])}' alt='cell'>"
        if rank in maps:
            pair += f"<img src='{png_data_uri(maps[rank])}' alt='heat map'>"
        items.append(f"<div class='cell'>{pair}<br>{esc(preds.paths[ok[i]].name)}"
                     f"<br>P({esc(leaf)}) = {probs[i, k]:.2f}, weight {weights[i]:.3f}</div>")
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
