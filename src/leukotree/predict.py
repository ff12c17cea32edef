"""``leukotree predict``: per-image tree probabilities, referral flags, per-patient diagnoses.

A prediction walks the tree from the root and stops where the model is not
confident enough: at each inner node the most probable child is taken if its
conditional probability ``P(child | node) = P(child) / P(node)`` reaches that
level's threshold; otherwise the image is *referred* and the deepest confident
node is reported ("Leukemia > Acute, subtype uncertain") instead of a guess.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from leukotree.data import CNMC_PATTERN, compile_rule, match_group
from leukotree.errors import DataError, LeukotreeError
from leukotree.export import load_any
from leukotree.images import is_image_file
from leukotree.inference import Predictions, predict_paths
from leukotree.metrics import aggregate_patients, node_probabilities
from leukotree.taxonomy import Taxonomy


@dataclass(frozen=True)
class InputImage:
    path: Path
    patient: str | None = None


def collect_inputs(inputs: Sequence[str | Path], patients: str = "none") -> list[InputImage]:
    """Images from files, folders (recursively) and CSV manifests (column ``path``).

    ``patients``: ``none``, ``folder`` (the image's parent folder), ``cnmc``,
    ``re:<regex>`` on the file name, or ``manifest`` (a manifest's ``patient``
    column, the default for manifests).
    """
    rule = None
    if patients.startswith("re:"):
        rule = compile_rule(patients[3:], "patient")
    elif patients not in {"none", "folder", "cnmc", "manifest"}:
        raise LeukotreeError(f"Invalid --patients value {patients!r}: use none, folder, cnmc, "
                             "manifest or re:<regex>.")
    out: list[InputImage] = []

    def patient_of(path: Path) -> str | None:
        if patients == "folder":
            return path.parent.name
        if patients == "cnmc":
            return match_group(CNMC_PATTERN, path.name, "patient")
        if rule is not None:
            return match_group(rule, path.name, "patient")
        return None

    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and is_image_file(p)
                           and not any(part.startswith(".") for part in p.parts))
            if not files:
                raise DataError(f"Folder '{item}' holds no images (JPEG, PNG, BMP, TIFF).")
            out.extend(InputImage(p, patient_of(p)) for p in files)
        elif item.suffix.lower() == ".csv":
            with item.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle)
                if "path" not in (reader.fieldnames or []):
                    raise DataError(f"Manifest '{item}' has no 'path' column (columns: "
                                    f"{reader.fieldnames}).")
                for row in reader:
                    p = Path(row["path"])
                    p = p if p.is_absolute() else item.parent / p
                    pid = (row.get("patient") or None) if patients in {"none", "manifest"} \
                        else patient_of(p)
                    out.append(InputImage(p, pid))
        elif item.exists():
            out.append(InputImage(item, patient_of(item)))
        else:
            raise DataError(f"Input '{item}' does not exist.")
    return out


def parse_thresholds(spec: str | None, depth: int) -> list[float]:
    """``"0.8"`` for every level or ``"0.9,0.8,0.7"`` per level (root's choice first)."""
    if spec is None:
        return [0.0] * depth
    try:
        values = [float(v) for v in str(spec).split(",")]
    except ValueError:
        raise LeukotreeError(f"--confidence must be a number or comma-separated numbers; "
                             f"got {spec!r}.") from None
    if any(not 0 <= v <= 1 for v in values):
        raise LeukotreeError(f"--confidence values must be in [0, 1]; got {spec!r}.")
    if len(values) == 1:
        return values * depth
    if len(values) != depth:
        raise LeukotreeError(f"--confidence needs 1 or {depth} values (one per level); got "
                             f"{len(values)}.")
    return values


def decide(taxonomy: Taxonomy, node_p: np.ndarray, thresholds: Sequence[float],
           decode: str = "argmax") -> tuple[str, str, bool, list[float]]:
    """Pick a leaf, then walk its path from the root while each step is confident.

    ``decode``: ``argmax`` (the most probable leaf) or ``greedy`` (top-down, the
    most probable child at each node). Returns ``(leaf, deepest confident node,
    refer, conditional probabilities along the path)``.
    """
    if decode == "argmax":
        leaf_p = [node_p[taxonomy.node_index[leaf]] for leaf in taxonomy.leaves]
        leaf = taxonomy.leaves[int(np.argmax(leaf_p))]
    elif decode == "greedy":
        leaf = taxonomy.root
        while not taxonomy.is_leaf(leaf):
            kids = taxonomy.children(leaf)
            leaf = kids[int(np.argmax([node_p[taxonomy.node_index[k]] for k in kids]))]
    else:
        raise LeukotreeError(f"The 'decode' parameter must be argmax or greedy; got {decode!r}.")
    confident, p_parent, stopped = taxonomy.root, 1.0, False
    conds: list[float] = []
    for level, node in enumerate(taxonomy.path(leaf)):
        p = float(node_p[taxonomy.node_index[node]])
        cond = p / p_parent if p_parent > 0 else 0.0
        conds.append(cond)
        if not stopped and cond >= thresholds[level]:
            confident = node
        else:
            stopped = True
        p_parent = p
    return leaf, confident, confident != leaf, conds


def calibrate_thresholds(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                         target_error: float) -> list[float]:
    """Per level, the lowest threshold keeping the error of accepted decisions <= target.

    Decisions at a level are the choices among the children of the nodes at that
    depth, on images whose true path continues below them.
    """
    node_p = node_probabilities(taxonomy, leaf_probs)
    targets = taxonomy.encode_heads(list(truth))
    out = []
    for level in range(taxonomy.max_depth):
        confs, hits = [], []
        for k, node in enumerate(taxonomy.inner_nodes):
            if (0 if node == taxonomy.root else taxonomy.depth(node)) != level:
                continue
            rows = np.flatnonzero(targets[:, k] >= 0)
            cols = [taxonomy.node_index[c] for c in taxonomy.children(node)]
            parent = (np.ones(len(rows)) if node == taxonomy.root
                      else node_p[rows, taxonomy.node_index[node]])
            cond = node_p[rows][:, cols] / np.clip(parent[:, None], 1e-12, None)
            confs.extend(cond.max(1).tolist())
            hits.extend((cond.argmax(1) == targets[rows, k]).tolist())
        if not confs:
            out.append(0.0)
            continue
        order = np.argsort(confs)[::-1]
        conf_sorted, hit_sorted = np.array(confs)[order], np.array(hits)[order]
        errors = np.cumsum(~hit_sorted) / np.arange(1, len(order) + 1)
        ok = np.flatnonzero(errors <= target_error)
        out.append(float(conf_sorted[ok[-1]]) if len(ok) else 1.0)
    return out


def prediction_rows(taxonomy: Taxonomy, images: list[InputImage], preds: Predictions,
                    thresholds: Sequence[float], decode: str = "argmax",
                    ) -> list[dict[str, Any]]:
    node_p = node_probabilities(taxonomy, np.nan_to_num(preds.leaf_probs))
    rows = []
    for i, img in enumerate(images):
        row: dict[str, Any] = {"path": str(img.path), "patient": img.patient or ""}
        if preds.errors[i] is not None:
            row.update({"predicted_leaf": "", "decoded_path": "", "reported_node": "",
                        "refer": "", "message": "", "error": preds.errors[i]})
            row.update({f"p_{n}": "" for n in taxonomy.nodes})
            rows.append(row)
            continue
        leaf, confident, refer, _ = decide(taxonomy, node_p[i], thresholds, decode)
        if refer:
            shown = (" > ".join(taxonomy.path(confident)) if confident != taxonomy.root
                     else "no level")
            message = f"{shown}, {'subtype' if confident != taxonomy.root else 'class'} uncertain"
        else:
            message = " > ".join(taxonomy.path(leaf))
        row.update({"predicted_leaf": leaf, "decoded_path": taxonomy.path_string(leaf),
                    "reported_node": confident, "refer": refer, "message": message,
                    "error": ""})
        row.update({f"p_{n}": round(float(node_p[i, taxonomy.node_index[n]]), 6)
                    for n in taxonomy.nodes})
        rows.append(row)
    return rows


def patient_rows(taxonomy: Taxonomy, images: list[InputImage], preds: Predictions,
                 method: str, min_cells: int) -> list[dict[str, Any]]:
    ok = preds.ok
    patients = [img.patient if ok[i] else None for i, img in enumerate(images)]
    if not any(patients):
        raise LeukotreeError("--by-patient needs patient ids: use --patients folder, cnmc, "
                             "re:<regex>, or a manifest with a 'patient' column.")
    agg = aggregate_patients(patients, np.nan_to_num(preds.leaf_probs), method=method,
                             min_cells=min_cells)
    out = []
    for patient, a in agg.items():
        decision = taxonomy.leaves[a["decision"]] if a["decision"] is not None else None
        out.append({
            "patient": patient, "n_cells": a["n_cells"],
            "diagnosis": decision or "insufficient",
            "path": taxonomy.path_string(decision) if decision else "",
            **{f"votes_{leaf}": round(float(v), 4) for leaf, v in zip(
                taxonomy.leaves, a["vote_shares"], strict=True)},
            **{f"mean_p_{leaf}": round(float(v), 4) for leaf, v in zip(
                taxonomy.leaves, a["mean_probs"], strict=True)},
        })
    return out


def run_predict(
    run: str | Path,
    inputs: Sequence[str | Path],
    *,
    patients: str = "none",
    confidence: str | None = None,
    target_error: float | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    tta: bool = False,
    engine: str = "auto",
) -> tuple[Taxonomy, list[InputImage], Predictions, list[float]]:
    """Predict every input image; returns what the writers need.

    ``engine``: see :func:`leukotree.export.load_any`.
    """
    model, payload = load_any(run, engine)
    if progress or payload.get("engine_note"):
        note = f" ({payload['engine_note']})" if payload.get("engine_note") else ""
        Console(stderr=True).print(f"engine: {payload['engine']}{note}", highlight=False)
    taxonomy = model.taxonomy
    img_size = int(payload["model_config"]["img_size"])
    images = collect_inputs(inputs, patients)
    preds = predict_paths(model, [i.path for i in images], img_size, batch_size=batch_size,
                          workers=workers, progress=progress, on_error="report", tta=tta)
    if target_error is not None:
        from leukotree.evaluate import split_rows

        if str(run).endswith(".onnx"):
            raise LeukotreeError("--target-error needs the run folder (its validation split); "
                                 "with an ONNX file, give --confidence instead.")
        val = split_rows(Path(run), "val")
        vp = predict_paths(model, [Path(r["path"]) for r in val], img_size, progress=False,
                           on_error="raise", batch_size=batch_size, tta=tta)
        thresholds = calibrate_thresholds(taxonomy, [r["label"] for r in val], vp.leaf_probs,
                                          target_error)
    else:
        thresholds = parse_thresholds(confidence, taxonomy.max_depth)
    return taxonomy, images, preds, thresholds


def write_rows(rows: list[dict[str, Any]], out: Path | None, as_json: bool) -> str | None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
            writer.writeheader()
            writer.writerows(rows)
    return json.dumps(rows, indent=2, default=str) if as_json else None
