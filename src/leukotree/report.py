"""``leukotree report``: one self-contained HTML page for one patient's cells.

The page holds the diagnosis (majority vote or mean probability) with the
probability of every level of its path, the vote shares, the number of cells,
the referral flag, the most telling cells with their heat maps, and the model
card (taxonomy, training data, validation metrics). Images are embedded, so the
file opens offline.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from leukotree.checkpoint import load_model
from leukotree.errors import LeukotreeError
from leukotree.images import load_rgb_array
from leukotree.inference import predict_paths
from leukotree.metrics import aggregate_patients, node_probabilities
from leukotree.predict import collect_inputs, decide, parse_thresholds

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 980px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
.diag { font-size: 1.6em; padding: 0.6em 1em; border-radius: 8px; background: #eef6ee; }
.refer { background: #fff3e0; border: 2px solid #f0a040; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.bar { display: inline-block; height: 0.8em; background: #4a7; vertical-align: middle; }
.cells { display: flex; flex-wrap: wrap; gap: 12px; }
.cell { text-align: center; font-size: 0.85em; }
.cell img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #bbb; }
pre { background: #f6f6f6; padding: 0.8em; }
"""


def _png_uri(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


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
) -> dict[str, Any]:
    """Write the HTML report for the cells in ``inputs``; returns the decision."""
    model, payload = load_model(run)
    tax = model.taxonomy
    size, crop = model.config.img_size, model.config.crop_fraction
    images = collect_inputs(inputs)
    preds = predict_paths(model, [i.path for i in images], size, progress=progress,
                          on_error="report")
    ok = np.flatnonzero(preds.ok)
    if len(ok) == 0:
        raise LeukotreeError("None of the given images can be read; nothing to report.")
    probs = preds.leaf_probs[ok].astype(np.float64)
    name = patient or "patient"
    agg = aggregate_patients([name] * len(ok), probs, method=method, min_cells=min_cells)[name]
    mean_nodes = node_probabilities(tax, agg["mean_probs"][None])[0]
    thresholds = parse_thresholds(confidence, tax.max_depth)
    if agg["decision"] is None:
        leaf, confident, refer = None, tax.root, True
        headline = f"Insufficient: {len(ok)} readable cell(s), at least {min_cells} needed"
    else:
        leaf = tax.leaves[agg["decision"]]
        share = float(agg["vote_shares"][agg["decision"]])
        _, confident, refer, _ = decide(tax, mean_nodes, thresholds)
        refer = refer or (method == "majority" and share < thresholds[-1])
        headline = " → ".join(tax.path(leaf))
        if refer:
            known = " → ".join(tax.path(confident)) if confident != tax.root else "no level"
            headline = f"{known}, finer class uncertain (referral advised); best guess {leaf}"
    path_rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{mean_nodes[tax.node_index[n]]:.3f}</td>"
        f"<td><span class='bar' style='width:{int(200 * mean_nodes[tax.node_index[n]])}px'>"
        "</span></td></tr>" for n in (tax.path(leaf) if leaf else ()))
    vote_rows = "".join(
        f"<tr><td>{html.escape(lf)}</td><td>{agg['vote_shares'][i]:.2f}</td>"
        f"<td>{agg['mean_probs'][i]:.3f}</td></tr>" for i, lf in enumerate(tax.leaves))
    cells_html = _cell_grid(run, model, preds, ok, probs, leaf, tax, size, crop, top_cells,
                            heatmaps)
    bad = [e for e in preds.errors if e is not None]
    extra = payload.get("extra", {})
    metrics = extra.get("metrics", {})
    card = (f"<pre>{html.escape(tax.render())}</pre>"
            f"<table><tr><th>item</th><th>value</th></tr>"
            f"<tr><td>head / backbone</td><td>{html.escape(model.config.head)} / "
            f"{html.escape(model.config.backbone)}</td></tr>"
            f"<tr><td>image size, centre crop</td><td>{size}px, {crop:.2f}</td></tr>"
            f"<tr><td>training data</td><td>{html.escape(str(extra.get('data', '?')))} "
            f"({extra.get('train_images', '?')} train / {extra.get('val_images', '?')} val "
            "images)</td></tr>"
            f"<tr><td>best epoch</td><td>{extra.get('epoch', '?')}</td></tr>"
            + "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>"
                      for k, v in metrics.items() if k.startswith("val_"))
            + f"<tr><td>leukotree</td><td>{payload['environment'].get('leukotree')}</td></tr>"
            "</table>")
    page = f"""<!DOCTYPE html><html><head><meta charset="utf-8">
<title>leukotree report: {html.escape(name)}</title><style>{_CSS}</style></head><body>
<h1>Patient {html.escape(name)}</h1>
<p class="sub">{len(ok)} cells analysed ({len(bad)} unreadable); aggregation: {method};
model: {html.escape(str(run))}. For research use; not a diagnostic device.</p>
<div class="diag{' refer' if refer else ''}">{html.escape(headline)}</div>
<h2>Probability of each level (mean over cells)</h2>
<table><tr><th>node</th><th>P</th><th></th></tr>{path_rows}</table>
<h2>Votes and mean probabilities per class</h2>
<table><tr><th>class</th><th>vote share</th><th>mean P</th></tr>{vote_rows}</table>
<h2>Most telling cells</h2>{cells_html}
<h2>Model card</h2>{card}
</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return {"patient": name, "diagnosis": leaf, "refer": bool(refer), "n_cells": len(ok),
            "reported_node": confident, "unreadable": len(bad), "report": str(out)}


def _cell_grid(run: str | Path, model: Any, preds: Any, ok: np.ndarray, probs: np.ndarray,
               leaf: str | None, tax: Any, size: int, crop: float, top: int,
               heatmaps: bool) -> str:
    if leaf is None:
        return "<p>No diagnosis, no cells shown.</p>"
    k = tax.leaf_index[leaf]
    order = np.argsort(-probs[:, k])[:top]
    maps: dict[int, np.ndarray] = {}
    if heatmaps:
        try:
            maps = _heatmaps(model, [preds.paths[ok[i]] for i in order], leaf, size, crop)
        except LeukotreeError:
            maps = {}
    items = []
    for rank, i in enumerate(order):
        pixels = load_rgb_array(preds.paths[ok[i]], size, crop=crop)
        pair = f"<img src='{_png_uri(pixels)}' alt='cell'>"
        if rank in maps:
            pair += f"<img src='{_png_uri(maps[rank])}' alt='heat map'>"
        items.append(f"<div class='cell'>{pair}<br>{html.escape(preds.paths[ok[i]].name)}"
                     f"<br>P({html.escape(leaf)}) = {probs[i, k]:.2f}</div>")
    return "<div class='cells'>" + "".join(items) + "</div>"


def _heatmaps(model: Any, paths: list[Path], leaf: str, size: int, crop: float,
              ) -> dict[int, np.ndarray]:
    import torch

    from leukotree.explain import NodeScores, _cam_class, _module_for, find_target_layer

    try:
        from pytorch_grad_cam.utils.image import show_cam_on_image
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise LeukotreeError("no pytorch-grad-cam") from None
    scorer = NodeScores(model).eval()
    layer, reshape = find_target_layer(model, _module_for(model, leaf))
    out = {}
    with _cam_class("gradcam")(model=scorer, target_layers=[layer],
                               reshape_transform=reshape) as cam:
        for i, path in enumerate(paths):
            pixels = load_rgb_array(path, size, crop=crop)
            x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float()
            heat = cam(input_tensor=x, targets=[ClassifierOutputTarget(
                model.taxonomy.node_index[leaf])])[0]
            out[i] = show_cam_on_image(pixels.astype(np.float32) / 255, heat, use_rgb=True)
    return out
