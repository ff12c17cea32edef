"""``leukotree report``: one self-contained HTML page for one patient's cells.

The page holds the diagnosis (majority vote or mean probability) with the
probability of every level of its path, the vote shares, the number of cells,
the referral decision (:func:`~leukotree.inference.decisions.decide_patients`, the
same path as ``predict --by-patient``), the unreadable files by name, the most
telling cells with their heat maps, and the model card (taxonomy, training data,
validation metrics). Images are embedded, so the file opens offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.data.discover import collect_inputs
from leukotree.data.images import load_rgb_array
from leukotree.errors import LeukotreeError, display_path
from leukotree.inference.conformal import ConformalAnswers, answer_nodes, answer_text
from leukotree.inference.decisions import (
    PatientDecision,
    decide_patients,
    domain_shift,
    parse_thresholds,
)
from leukotree.inference.evidence import (
    Evidence,
    EvidenceSettings,
    patient_evidence,
    refer_thin,
)
from leukotree.inference.loader import LoadedModel, load
from leukotree.inference.options import REPORT_CONFIDENCE, InferenceOptions
from leukotree.inference.predictor import Predictions, Predictor, decode_groups, predict_paths
from leukotree.models import ModelConfig, TreeClassifier
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
    options: InferenceOptions | None = None,
    patient: str | None = None,
    top_cells: int = 8,
    heatmaps: bool = True,
    progress: bool = False,
    predictor: Predictor | None = None,
) -> dict[str, Any]:
    """Write the HTML report for the cells in ``inputs``; returns the decision.

    With a patient-level model in the run, the diagnosis is that model's (with its
    threshold) and the cells shown are those that drove it most (attention, or the
    evidence for the diagnosis); otherwise the cells are aggregated by
    ``options.aggregate``. ``options``
    (:class:`~leukotree.inference.options.InferenceOptions`; default: the defaults with
    ``confidence`` :data:`~leukotree.inference.options.REPORT_CONFIDENCE`) also give the
    referral confidence, the fewest cells for a diagnosis, the decoding view (crop mode,
    pixel size), batches and the decompression-bomb guard. ``predictor``: one already
    loaded for ``run`` (e.g. the engine ``serve`` classified the case with; default: the
    run in PyTorch). The PyTorch model is loaded only to draw heat maps.
    """
    options = options or InferenceOptions(confidence=REPORT_CONFIDENCE)
    loaded = load(run)
    predictor = predictor or loaded.predictor("torch")
    view = options.input_config(predictor.model_config, source=run)
    tax = predictor.taxonomy
    found = collect_inputs(inputs, taxonomy=tax)
    sizes = [i.pixel_size for i in found.images]
    preds = predict_paths(predictor, [i.path for i in found.images], progress=progress,
                          batch_size=options.batch_size, workers=options.workers,
                          on_error="report", tta=options.tta, max_pixels=options.max_pixels,
                          pixel_sizes=sizes, config=view)
    return write_patient_report(loaded, predictor, preds, out, view=view, pixel_sizes=sizes,
                                not_used=found.not_used, patient=patient,
                                method=options.aggregate, confidence=options.confidence,
                                min_cells=options.min_cells, top_cells=top_cells,
                                heatmaps=heatmaps, evidence=options.evidence())


def write_patient_report(
    loaded: LoadedModel,
    predictor: Predictor,
    preds: Predictions,
    out: str | Path,
    *,
    view: ModelConfig,
    pixel_sizes: Sequence[float | None] | None = None,
    not_used: Sequence[Path] = (),
    patient: str | None = None,
    method: str = "majority",
    confidence: str | None = REPORT_CONFIDENCE,
    min_cells: int = 1,
    top_cells: int = 8,
    heatmaps: bool = True,
    evidence: EvidenceSettings | None = None,
) -> dict[str, Any]:
    """Write the HTML report of cells already predicted (``preds``, by ``predictor`` of
    ``loaded``, decoded as ``view`` and ``pixel_sizes`` say), e.g. the cells of a case
    ``serve``'s worker classified; returns the decision (see :func:`patient_report`)."""
    tax = predictor.taxonomy
    sizes = list(pixel_sizes) if pixel_sizes is not None else [None] * len(preds.paths)
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
    decision = _decide(predictor, preds, name, method, min_cells,
                       parse_thresholds(confidence, tax.max_depth))
    ev = _evidence(predictor, preds, name, method, evidence)
    fitted = predictor.patient_model
    decision = refer_thin(tax, decision, ev, evidence, None if fitted is None
                          else fitted.positive)
    bad = [e for e in preds.errors if e is not None]
    unused = [display_path(p) for p in not_used]
    how = (f"patient model '{predictor.patient_model.model.name}'"
           if predictor.patient_model else f"aggregation: {method}")
    if tax.kind == "cells":
        return _write_cell_count(loaded, predictor, preds, out, view=view, sizes=sizes,
                                 name=name, alarm=alarm, bad=bad, unused=unused,
                                 top_cells=top_cells, heatmaps=heatmaps)
    body = "\n".join([
        f"<h1>Patient {esc(name)}</h1>",
        f"<p class='sub'>{len(ok)} cells analysed ({len(bad)} unreadable, {int(odd.sum())} "
        f"unclassifiable and left out); {esc(how)}; "
        f"model: {esc(loaded.source)}. For research use; not a diagnostic device.</p>",
        f"<p class='err' id='domain-shift'>{esc(alarm)}</p>" if alarm else "",
        f"<div class='diag{' refer' if decision.refer else ''}'>"
        f"{esc(_headline(tax, decision, len(ok), min_cells))}</div>",
        _promise_html(decision, predictor.patient_model),
        _evidence_html(tax, decision, ev),
        _levels_html(tax, decision, predictor.patient_model),
        _differential_html(predictor.cell_taxonomy, preds.cell_probs, ok),
        _unreadable_html(bad, unused),
        "<h2>The cells that drove the decision</h2>",
        _cell_grid(loaded, tax, view.img_size, preds, ok, decision.cell_weights, decision.leaf,
                   top_cells, heatmaps, decode_groups(view, len(sizes), sizes),
                   predictor.conformal),
        "<h2>Model card</h2>",
        model_card_html(predictor.model_config, tax, loaded.payload),
    ])
    out = Path(out)
    write_text(out, page(f"leukotree report: {name}", body))
    return {"patient": name, "diagnosis": decision.leaf, "refer": decision.refer,
            "call": decision.call,
            "reason": decision.reason, "n_cells": len(ok),
            "n_unclassifiable": int(odd.sum()), "domain_shift": alarm,
            "n_informative": ev.n_informative, "domain_alarm": ev.alarm is not None,
            "interval": None if ev.low is None or ev.high is None else {
                leaf: [round(float(ev.low[k]), 4), round(float(ev.high[k]), 4)]
                for k, leaf in enumerate(tax.leaves)},
            "reported_node": decision.reported_node, "unreadable": bad,
            "not_used": unused, "report": str(out)}


def _write_cell_count(loaded: LoadedModel, predictor: Predictor, preds: Predictions,
                      out: str | Path, *, view: ModelConfig, sizes: list[float | None],
                      name: str, alarm: str | None, bad: list[str], unused: list[str],
                      top_cells: int, heatmaps: bool) -> dict[str, Any]:
    """The report of a cell-type model (taxonomy kind ``cells``): the differential count
    (:func:`~leukotree.patients.differential.differential_count`) and the most probable
    cells of each predicted class, no diagnosis."""
    from leukotree.patients.differential import differential_count

    tax = predictor.taxonomy
    probs = np.nan_to_num(preds.leaf_probs)
    labels = [tax.leaves[int(p.argmax())] if ok else None
              for p, ok in zip(probs, preds.ok, strict=True)]
    count = differential_count(tax.leaves, labels, preds.unclassifiable)
    rows = [[leaf, str(n), f"{pct:.1f}"] for leaf, n, pct in
            zip(tax.leaves, count.counts, count.percent(), strict=True)]
    groups = decode_groups(view, len(sizes), sizes)
    ok = np.flatnonzero(preds.classified)
    present = [k for k, n in enumerate(count.counts) if n]
    per_class = max(1, top_cells // max(len(present), 1))
    grids = []
    for k in present:
        mine = ok[probs[ok].argmax(1) == k]
        grids.append(f"<h3>{esc(tax.leaves[k])} ({len(mine)})</h3>" + _cell_grid(
            loaded, tax, view.img_size, preds, mine, probs[mine, k], tax.leaves[k],
            per_class, heatmaps, groups))
    body = "\n".join([
        f"<h1>Patient {esc(name)}</h1>",
        f"<p class='sub'>{count.n_classified} cells analysed ({len(bad)} unreadable, "
        f"{count.n_unclassifiable} unclassifiable and counted apart); model: "
        f"{esc(loaded.source)}. For research use; not a diagnostic device.</p>",
        f"<p class='err' id='domain-shift'>{esc(alarm)}</p>" if alarm else "",
        "<h2 id='differential-count'>Differential count</h2>",
        table_html(["cell type", "cells", "%"], rows),
        f"<p class='sub'>% of the {count.n_classified} classified cells.</p>",
        _unreadable_html(bad, unused),
        "<h2>The cells, grouped by predicted class (the most probable first)</h2>",
        *grids,
        "<h2>Model card</h2>",
        model_card_html(predictor.model_config, tax, loaded.payload),
    ])
    out = Path(out)
    write_text(out, page(f"leukotree report: {name}", body))
    return {"patient": name, "kind": "cells", "diagnosis": None, "refer": False,
            "call": "", "reason": "", "n_cells": count.n_classified,
            "differential_count": count.to_dict(),
            "n_unclassifiable": count.n_unclassifiable, "domain_shift": alarm,
            "reported_node": tax.root, "unreadable": bad, "not_used": unused,
            "report": str(out)}


def _decide(predictor: Predictor, preds: Predictions, name: str, method: str,
            min_cells: int, thresholds: list[float]) -> PatientDecision:
    """The patient's decision (:func:`~leukotree.inference.decisions.decide_patients`, as
    ``predict --by-patient``) with each classified cell's weight in it."""
    return decide_patients(
        predictor.taxonomy, [name] * len(preds.paths), preds.leaf_probs.astype(np.float64),
        thresholds=thresholds, classified=preds.classified, features=preds.features,
        cell_probs=preds.cell_probs, extras=preds.member_arrays(),
        model=predictor.patient_model, aggregate=method, min_cells=min_cells,
        cell_weights=True)[0]


def _evidence(predictor: Predictor, preds: Predictions, name: str, method: str,
              settings: EvidenceSettings | None) -> Evidence:
    """The patient's evidence (:func:`~leukotree.inference.evidence.patient_evidence`,
    as ``predict --by-patient``)."""
    return patient_evidence(
        predictor.taxonomy, [name] * len(preds.paths), preds.leaf_probs.astype(np.float64),
        readable=preds.ok, flagged=preds.unclassifiable, features=preds.features,
        cell_probs=preds.cell_probs, extras=preds.member_arrays(),
        model=predictor.patient_model, aggregate=method,
        cell_taxonomy=predictor.cell_taxonomy, expected_ood=predictor.expected_ood,
        settings=settings)[name]


def _evidence_html(tax: Taxonomy, d: PatientDecision, ev: Evidence) -> str:
    """The diagnosis's probability with its interval and the informative cells."""
    parts = [f"{ev.n_informative} informative cells ({esc(ev.informative)} not flagged "
             "unclassifiable)"]
    if d.leaf is not None and d.probs is not None and ev.low is not None \
            and ev.high is not None:
        k = tax.leaf_index[d.leaf]
        parts.insert(0, f"P({esc(d.leaf)}) {float(d.probs[k]):.3f}, interval "
                        f"[{float(ev.low[k]):.3f}, {float(ev.high[k]):.3f}] (bootstrap over "
                        "the patient's cells: how much the cells agree, not how right the "
                        "model is)")
    return f"<p class='sub' id='evidence'>{'; '.join(parts)}.</p>"


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


def _promise_html(d: PatientDecision, fitted: FittedPatientModel | None) -> str:
    """The call with the miss rate it is made at, for a model that promises one."""
    text = None if fitted is None or d.miss_rate is None else fitted.promise()
    if text is None:
        return ""
    return f"<p class='sub' id='miss-rate'>Call: <b>{esc(d.call)}</b>. {esc(text)}</p>"


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


def _cell_grid(loaded: LoadedModel, tax: Taxonomy, size: int, preds: Predictions,
               ok: np.ndarray, weights: np.ndarray, leaf: str | None, top: int,
               heatmaps: bool, groups: list[tuple[np.ndarray, dict[str, Any]]],
               answers: ConformalAnswers | None = None) -> str:
    """The ``top`` readable cells by their weight in the decision, with heat maps of
    ``loaded``'s PyTorch model (each decoded as the predictions were: ``groups`` from
    :func:`~leukotree.inference.predictor.decode_groups`) and, with conformal ``answers``,
    each cell's answer node."""
    decode = {int(i): options for rows, options in groups for i in rows}
    if leaf is None:
        return "<p>No diagnosis, no cells shown.</p>"
    k = tax.leaf_index[leaf]
    probs = preds.leaf_probs[ok]
    order = np.argsort(-weights, kind="stable")[:top]
    cells = [load_rgb_array(preds.paths[ok[i]], size, **decode[ok[i]]) for i in order]
    maps, note = _heatmaps(loaded, cells, leaf) if heatmaps and cells else ({}, "")
    texts = None if answers is None else [
        answer_text(tax, p, node) for p, node in zip(probs, answer_nodes(tax, probs, answers),
                                                     strict=True)]
    items = []
    for rank, i in enumerate(order):
        pair = f"<img src='{png_data_uri(cells[rank])}' alt='cell'>"
        if rank in maps:
            pair += f"<img src='{png_data_uri(maps[rank])}' alt='heat map'>"
        answer = f"<br>answer: {esc(texts[i])}" if texts is not None else ""
        items.append(f"<div class='cell'>{pair}<br>{esc(preds.paths[ok[i]].name)}"
                     f"<br>P({esc(leaf)}) = {probs[i, k]:.2f}, weight {weights[i]:.3f}"
                     f"{answer}</div>")
    note_html = f"<p class='sub'>Heat maps not drawn: {esc(note)}</p>" if note else ""
    return note_html + "<div class='cells'>" + "".join(items) + "</div>"


def _heatmaps(loaded: LoadedModel, cells: list[np.ndarray], leaf: str,
              ) -> tuple[dict[int, np.ndarray], str]:
    """Grad-CAM overlays of ``leaf`` by the PyTorch model of ``loaded`` (a cv or ensemble
    folder's first member); none, with the reason, when they cannot be drawn (the explain
    extra is missing, the model has no spatial feature map, or it is an ONNX file)."""
    from leukotree.inference.explain import HeatMapper

    try:
        model: TreeClassifier = loaded.first_run().torch_model()
        with HeatMapper(model) as mapper:
            return {i: mapper.overlay(pixels, leaf) for i, pixels in enumerate(cells)}, ""
    except LeukotreeError as err:
        return {}, str(err)
