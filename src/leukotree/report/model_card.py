"""The model card of a run: ``RUN/model_card.md``, and the card shown in reports and serve.

The Markdown card follows the sections of a MONAI bundle's model README: overview and
intended use, data (training and validation images per class, patients), input and
output, performance (validation metrics of the kept epoch, the leaf expected calibration
error before and after calibration, the share of validation cells flagged unclassifiable,
patient-level metrics when a patient model was fitted), limitations, and references.
Everything is read from the run folder (``config.yaml``, ``split.csv``, ``summary.json``
and the checkpoint's payload, through :class:`~leukotree.rundir.RunDir`); nothing is
measured again. :func:`model_card_html` is the short form (the same overview rows) that
``leukotree report`` and ``leukotree serve`` show.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from leukotree.models.checkpoint import read_checkpoint
from leukotree.models.heads import ModelConfig
from leukotree.report.html import esc, table_html
from leukotree.report.tables import Document, fmt
from leukotree.rundir import RunDir, read_yaml, write_text
from leukotree.taxonomy import Taxonomy

#: Works a card cites, by what the run uses.
REFERENCES = {
    "hierarchy": "Sharshar et al. 2025: hierarchical classification of leukemia from blood "
                 "smear images (the multi-head model: one shared backbone, one head per "
                 "inner node; leukotree's comparison tables follow theirs).",
    "calibration": "Guo et al. 2017, On Calibration of Modern Neural Networks (temperature "
                   "scaling); Tomani et al. 2023, density-aware calibration (the distance "
                   "softening).",
    "ood": "Lee et al. 2018, A Simple Unified Framework for Detecting Out-of-Distribution "
           "Samples and Adversarial Attacks (Mahalanobis distance, feature ensemble).",
    "mil": "Ilse et al. 2018, Attention-based Deep Multiple Instance Learning.",
    "fraction": "Sidhom et al. 2021, Deep learning for diagnosis of acute promyelocytic "
                "leukemia via recognition of genomically imprinted morphologic features "
                "(DeepAPL; the promyelocyte-fraction baseline).",
}

LIMITATIONS = (
    "Trained on one data set (one lab's smears, stain and camera, unless the training data "
    "mixed several): another lab's cells are read less accurately; check the model on a "
    "few labelled cells of a new lab first (`leukotree evaluate`), and adapt it "
    "(`leukotree adapt`, `leukotree train --init --replay`).",
    "Not a diagnostic device: a research tool whose output a qualified person reviews.",
    "Cell types it was never trained on (blasts of other lineages, smudge cells...) have "
    "no class of their own: most are flagged unclassifiable, some are given a trained "
    "class.",
    "The validation figures above are of the images that chose the kept epoch and fitted "
    "the calibration: they are optimistic; held-out images measure the model "
    "(`leukotree evaluate RUN DATA`).",
)


def overview_rows(config: ModelConfig, payload: dict[str, Any]) -> list[list[str]]:
    """Architecture, input, training data, kept epoch, validation metrics and version of a
    checkpoint's ``payload``: the rows both cards show."""
    extra = payload.get("extra", {})
    return [
        ["head / backbone", f"{config.head} / {config.arch_name}"],
        ["image size, centre crop", f"{config.img_size}px, {config.crop_fraction:.2f}"],
        ["training data", f"{extra.get('data', '?')} ({extra.get('train_images', '?')} train "
                          f"/ {extra.get('val_images', '?')} val images)"],
        ["best epoch", str(extra.get("epoch", "?"))],
        *([k, f"{v:.4f}"] for k, v in extra.get("metrics", {}).items() if k.startswith("val_")),
        ["leukotree", str(payload.get("environment", {}).get("leukotree"))],
    ]


def model_card_html(config: ModelConfig, taxonomy: Taxonomy, payload: dict[str, Any]) -> str:
    """Taxonomy, architecture, training data and validation metrics of a checkpoint (its
    ``payload``; empty for an ONNX file: unknown items show as ``?``)."""
    return (f"<pre>{esc(taxonomy.render())}</pre>"
            + table_html(["item", "value"], overview_rows(config, payload)))


def _data_section(doc: Document, run: RunDir, taxonomy: Taxonomy) -> None:
    rows = run.read_split() if run.split.exists() else []
    counts = Counter((r["label"], r["split"]) for r in rows)
    parts = [p for p in ("train", "val", "test") if any(s == p for _, s in counts)]
    doc.heading("Data")
    if not rows:
        doc.paragraph(f"The run lists no images (no `{RunDir.SPLIT}`).")
        return
    labels = [n for n in taxonomy.nodes if any(lab == n for lab, _ in counts)]
    doc.table(["class", *parts],
              [[label, *(str(counts[label, p]) for p in parts)] for label in labels]
              + [["all", *(str(sum(counts[lab, p] for lab in labels)) for p in parts)]])
    patients = {p: {r["patient"] for r in rows if r["split"] == p and r.get("patient")}
                for p in parts}
    if any(patients.values()):
        doc.paragraph("Patients: " + ", ".join(f"{len(patients[p])} {p}" for p in parts)
                      + " (no patient on two sides).")
    else:
        doc.paragraph("No patient ids: every image was its own group, so cells of one "
                      "patient may sit on both sides of the split.")


def _io_section(doc: Document, config: ModelConfig, payload: dict[str, Any]) -> None:
    doc.heading("Input and output")
    reading = [f"the central {config.crop_fraction:.2f} of the image "
               f"({config.crop_mode} crop) resized to {config.img_size} x {config.img_size} "
               "px"]
    if config.context_radius:
        reading.append(f"the smear beyond {config.context_radius:.2f} of the side from the "
                       "centre flattened to one colour")
    if config.stain_norm != "none":
        reading.append(f"stain normalisation '{config.stain_norm}'")
    if config.pixel_size:
        reading.append(f"trained at {config.pixel_size} µm per pixel (other pixel sizes "
                       "are cropped to the same field)")
    doc.paragraph("Input: one RGB image of one white blood cell (JPEG, PNG, BMP or TIFF); "
                  "the model reads " + "; ".join(reading) + ".")
    out = ["a probability for every node of the taxonomy (the leaves sum to one, each "
           "inner node is the sum of its children)"]
    if payload.get("ood"):
        out.append("a cell unlike the training cells is reported unclassifiable")
    if payload.get("patient_model"):
        out.append(f"per patient, a diagnosis by the patient model "
                   f"'{payload['patient_model'].get('name', '?')}'")
    doc.paragraph("Output: " + "; ".join(out) + ".")


def _performance_section(doc: Document, config: ModelConfig, payload: dict[str, Any],
                         summary: dict[str, Any]) -> None:
    doc.heading("Performance (validation images)")
    doc.table(["item", "value"], overview_rows(config, payload)[1:-1])
    rows = []
    cal = summary.get("calibration")
    if cal:
        rows.append(["leaf ECE, before -> after calibration",
                     f"{fmt(cal.get('ece_before'))} -> {fmt(cal.get('ece_after'))} (fitted on "
                     f"{cal.get('fitted_on', '?')} cells)"])
    ood = summary.get("ood")
    if ood:
        rows.append(["validation cells flagged unclassifiable",
                     f"{fmt(ood.get('val_flagged'), percent=True)}% (threshold: the "
                     f"{fmt(ood.get('quantile'))} quantile)"])
    if rows:
        doc.table(["calibration", "value"], rows)
    patients = summary.get("patient_level")
    if patients:
        keys = ("n_patients", "accuracy", "auroc", "sensitivity", "specificity", "threshold",
                "train_patients")
        binary = patients.get("binary") or {}
        doc.table(["patient level", "value"],
                  [[k, fmt(patients.get(k, binary.get(k)))] for k in keys
                   if patients.get(k, binary.get(k)) is not None])


def _references(payload: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    keys = ["hierarchy"]
    keys += [k for k in ("calibration", "ood") if payload.get(k) or summary.get(k)]
    patient = (payload.get("patient_model") or {}).get("name")
    keys += [patient] if patient in REFERENCES else []
    return [REFERENCES[k] for k in keys]


def model_card_markdown(run_dir: str | Path) -> str:
    """The Markdown model card of a run folder (see the module docstring)."""
    run = RunDir.of(run_dir)
    payload = read_checkpoint(run.best)
    config = ModelConfig.from_dict(payload["model_config"], source=f"'{run.best}'")
    taxonomy = Taxonomy.from_dict(payload["taxonomy"], source=str(run.best))
    summary = run.read_summary() if run.summary.exists() else {}
    options = read_yaml(run.config, "Run configuration") if run.config.exists() else {}
    doc = Document(f"Model card: {run.path.name}")
    doc.heading(f"Model card: {run.path.name}", level=1)
    doc.heading("Overview")
    doc.paragraph(f"A {config.head} hierarchical classifier of blood-cell images "
                  f"({config.arch_name} backbone) over the taxonomy '{taxonomy.name}' "
                  f"({len(taxonomy.leaves)} leaves), trained with leukotree "
                  f"{payload.get('environment', {}).get('leukotree', '?')}"
                  + (f" (preset '{options['preset']}')" if options.get("preset") else "")
                  + f"; options in `{RunDir.CONFIG}`.")
    doc.paragraph("```\n" + taxonomy.render() + "\n```")
    adapted = payload.get("extra", {}).get("adapted")
    if adapted:
        doc.paragraph(f"Adapted to another lab's cells (`leukotree adapt`): "
                      f"{adapted.get('method', '?')}, from `{adapted.get('source', '?')}`; "
                      f"details in `{RunDir.ADAPT}`.")
    doc.heading("Intended use")
    doc.paragraph("Research and decision support in a haematology lab: ranking and "
                  "pre-classifying the white blood cells of a smear for review by a "
                  "technologist or haematologist, and a per-patient summary. Not for "
                  "diagnosis without that review.")
    _data_section(doc, run, taxonomy)
    _io_section(doc, config, payload)
    _performance_section(doc, config, payload, summary)
    doc.heading("Limitations")
    for item in LIMITATIONS:
        doc.paragraph(f"- {item}")
    doc.heading("References")
    doc.paragraph("Cite leukotree (this software, version "
                  f"{payload.get('environment', {}).get('leukotree', '?')}) and the data set "
                  "the model was trained on.")
    for ref in _references(payload, summary):
        doc.paragraph(f"- {ref}")
    return doc.to_markdown()


def write_model_card(run_dir: str | Path) -> Path:
    """Write ``RUN/model_card.md`` (:func:`model_card_markdown`); returns its path."""
    run = RunDir.of(run_dir)
    return write_text(run.model_card, model_card_markdown(run.path))
