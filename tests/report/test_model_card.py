"""The run's model card (``model_card.md``): written by training, read from the run folder."""

import re

from leukotree.models.checkpoint import read_checkpoint, save_model
from leukotree.models.heads import ModelConfig, build_model
from leukotree.report.model_card import model_card_html, model_card_markdown, write_model_card
from leukotree.rundir import RunDir, write_csv, write_json, write_text
from leukotree.taxonomy import load_taxonomy

SECTIONS = ["Overview", "Intended use", "Data", "Input and output",
            "Performance (validation images)", "Limitations", "References"]


def _sections(card: str) -> list[str]:
    return re.findall(r"^## (.+)$", card, re.M)


def test_training_writes_the_card_of_its_run(served_run):
    run = RunDir(served_run / "run")
    card = run.model_card.read_text(encoding="utf-8")
    assert _sections(card) == SECTIONS
    assert card.startswith("# Model card: run\n")
    # the data table counts split.csv's rows per class and part
    rows = run.read_split()
    n_train = sum(r["split"] == "train" for r in rows)
    n_val = sum(r["split"] == "val" for r in rows)
    assert f"| all | {n_train} | {n_val} |" in card
    n_aml = sum(r["label"] == "AML" and r["split"] == "train" for r in rows)
    assert re.search(rf"^\| AML \| {n_aml} \| \d+ \|$", card, re.M)
    # the calibration figures are the run's summary, not measured again
    cal = run.read_summary()["calibration"]
    assert f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f}" in card
    assert "Not a diagnostic device" in card and "patient level" not in card
    # a run folder with its card is still a run: --out accepts it again
    assert run.foreign_files() == []
    assert write_model_card(run.path) == run.model_card  # rewriting gives the same card
    assert run.model_card.read_text(encoding="utf-8") == card


def _hand_made_run(tmp_path, *, patient_model: bool):
    """A run folder written by hand: 3 train + 1 val images of two patients, fixed figures."""
    taxonomy = load_taxonomy("aml-apl")
    model = build_model(taxonomy, ModelConfig(head="multihead", backbone="test_resnet",
                                              img_size=32, context_radius=0.35,
                                              stain_norm="white", stain_target=[1.0] * 3))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_model(run.best, model, extra={"data": "cells.csv", "train_images": 3, "val_images": 1,
                                       "epoch": 4, "metrics": {"val_accuracy": 0.75,
                                                               "train_loss": 0.5}},
               patient_model={"name": "mean", "params": {}, "positive": "APL",
                              "threshold": 0.5, "rule": "fixed", "state": {}}
               if patient_model else None)
    leaves = list(taxonomy.leaves)
    write_csv(run.split, [
        {"path": "a.png", "label": leaves[0], "patient": "P1", "split": "train"},
        {"path": "b.png", "label": leaves[0], "patient": "P1", "split": "train"},
        {"path": "c.png", "label": leaves[1], "patient": "P1", "split": "train"},
        {"path": "d.png", "label": leaves[1], "patient": "P2", "split": "val"},
    ], ["path", "label", "patient", "split"])
    summary = {"best": 0.75, "best_epoch": 4,
               "calibration": {"ece_before": 0.2, "ece_after": 0.05, "fitted_on": 1},
               "ood": {"val_flagged": 0.05, "quantile": 0.95}}
    if patient_model:
        summary["patient_level"] = {"n_patients": 1, "accuracy": 1.0, "auroc": 0.875,
                                    "binary": {"sensitivity": 0.5, "specificity": 1.0},
                                    "threshold": 0.5, "train_patients": 1}
    write_json(run.summary, summary)
    write_text(run.config, "preset: cpu-fast\n")
    return run, leaves


def test_card_sections_from_a_hand_made_run(tmp_path):
    run, leaves = _hand_made_run(tmp_path, patient_model=True)
    card = model_card_markdown(run.path)
    assert _sections(card) == SECTIONS
    assert f"| {leaves[0]} | 2 | 0 |" in card and f"| {leaves[1]} | 1 | 1 |" in card
    assert "| all | 3 | 1 |" in card
    assert "Patients: 1 train, 1 val" in card
    assert "0.2000 -> 0.0500 (fitted on 1 cells)" in card
    assert "5.00% (threshold: the 0.9500 quantile)" in card
    assert "| val_accuracy | 0.7500 |" in card and "train_loss" not in card
    assert "| best epoch | 4 |" in card and "preset 'cpu-fast'" in card
    # the patient-level block, its binary figures included
    for row in ("| auroc | 0.8750 |", "| sensitivity | 0.5000 |", "| specificity | 1.0000 |"):
        assert row in card
    assert "patient model 'mean'" in card
    assert "flattened to one colour" in card and "stain normalisation 'white'" in card
    assert "Guo et al. 2017" in card and "Lee et al. 2018" in card


def test_card_without_patients_or_calibration_says_so(tmp_path):
    run, _ = _hand_made_run(tmp_path, patient_model=False)
    write_csv(run.split, [{"path": "a.png", "label": "APL", "patient": "", "split": "train"}],
              ["path", "label", "patient", "split"])
    write_json(run.summary, {"best": 0.5})
    card = model_card_markdown(run.path)
    assert "No patient ids" in card and "patient level" not in card
    assert "calibration |" not in card and "Guo et al." not in card


def test_html_card_shows_the_same_overview(tmp_path):
    run, _ = _hand_made_run(tmp_path, patient_model=False)
    payload = read_checkpoint(run.best)
    model = build_model(load_taxonomy("aml-apl"), ModelConfig.from_dict(payload["model_config"]))
    html = model_card_html(model.config, model.taxonomy, payload)
    assert "multihead / test_resnet" in html and "val_accuracy" in html
    assert "cells.csv (3 train / 1 val images)" in html
