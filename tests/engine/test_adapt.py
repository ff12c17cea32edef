"""``leukotree adapt``: batch-norm statistics re-estimated on another lab's cells."""

import csv
import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from leukotree.cli import main
from leukotree.data.images import to_tensor
from leukotree.data.synth import generate
from leukotree.engine.adapt import estimating_batch_norm, pseudo_labels
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.errors import LeukotreeError
from leukotree.models.checkpoint import load_model, read_checkpoint
from leukotree.taxonomy import load_taxonomy


def test_running_statistics_become_those_of_the_new_cells():
    bn = nn.BatchNorm2d(3)
    bn.running_mean.fill_(7.0)
    rng = np.random.default_rng(0)
    batches = [rng.integers(100, 200, (4, 8, 8, 3), dtype=np.uint8) for _ in range(3)]
    seen = 0
    with torch.no_grad(), estimating_batch_norm(bn):
        for pixels in batches:
            bn(to_tensor(pixels))
            seen += len(pixels)
    every = np.concatenate(batches).astype(np.float64)
    assert seen == 12 and not bn.training and bn.momentum == 0.1
    np.testing.assert_allclose(bn.running_mean.numpy(), every.mean(axis=(0, 1, 2)), rtol=1e-4)
    # the cumulative average of per-batch unbiased variances, as PyTorch defines it
    per_batch = [b.astype(np.float64).reshape(-1, 3).var(0, ddof=1) for b in batches]
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean(per_batch, 0), rtol=1e-4)


def test_a_model_without_batch_norm_is_refused():
    with (pytest.raises(LeukotreeError, match="no batch-normalisation layer"),
          estimating_batch_norm(nn.Linear(3, 3))):
        pass


@pytest.fixture(scope="module")
def run_and_new_lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    tax = load_taxonomy("leukemia7")
    generate(root / "data", tax, patients_per_class=2, cells_per_patient=4, size=32, seed=5,
             progress=False)
    train(root / "data", root / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "val_fraction": 0.3}), progress=False)
    generate(root / "other", tax, patients_per_class=1, cells_per_patient=4, size=48, seed=9,
             progress=False)
    return root


def test_adapt_writes_a_run_with_the_same_weights_and_new_statistics(run_and_new_lab, tmp_path,
                                                                     capsys):
    root = run_and_new_lab
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "adapted"
    code = main(["adapt", str(root / "run"), str(root / "other"), str(bad), "--out", str(out),
                 "--method", "batch-norm", "--batch-size", "8", "--no-progress"])
    assert code == 3  # adapted, with one unreadable input named
    assert "broken.png" in capsys.readouterr().err
    report = json.loads((out / "adapt.json").read_text())
    assert report["n_cells"] == 7 * 4 and len(report["unreadable"]) == 1
    for name in ("config.yaml", "taxonomy.yaml", "split.csv", "best.pt"):
        assert (out / name).exists(), name
    before, payload = load_model(root / "run")
    after, new_payload = load_model(out)
    old_state, new_state = before.state_dict(), after.state_dict()
    stats = [k for k in old_state if k.endswith(("running_mean", "running_var"))]
    assert stats and any(not torch.equal(old_state[k], new_state[k]) for k in stats)
    weights = [k for k in old_state if k not in stats and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(old_state[k], new_state[k]) for k in weights)
    # the source lab's temperatures and distances do not fit the adapted features
    assert "calibration" in payload and "ood" in payload
    assert "calibration" not in new_payload and "ood" not in new_payload
    assert report["not_carried_over"] == ["calibration", "ood"]
    assert read_checkpoint(out)["extra"]["adapted"]["n_cells"] == 28
    # the adapted run predicts like any run
    assert main(["predict", str(out), str(root / "other"), "--no-progress"]) == 0


def test_adapt_refuses_an_existing_folder(run_and_new_lab, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code = main(["adapt", str(run_and_new_lab / "run"), str(run_and_new_lab / "other"),
                 "--out", str(tmp_path / "taken"), "--no-progress"])
    assert code == 2 and "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_run_adapted_at_a_pixel_size_decodes_its_lab_at_that_size(run_and_new_lab,
                                                                    tmp_path):
    root = run_and_new_lab
    run = tmp_path / "run"
    train(root / "data", run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "pixel_size": 0.5}), progress=False)
    out = tmp_path / "adapted"
    assert main(["adapt", str(run), str(root / "other"), "--out", str(out),
                 "--method", "batch-norm", "--pixel-size", "1.0", "--no-progress"]) == 0
    assert load_model(out)[0].config.input_pixel_size == 1.0

    def probs(*extra: str, engine: str = "auto") -> list[str]:
        csv_out = tmp_path / f"p{len(list(tmp_path.glob('p*.csv')))}.csv"
        assert main(["predict", str(out), str(root / "other"), "--out", str(csv_out),
                     "--no-progress", "--engine", engine, *extra]) == 0
        return [line.split(",", 3)[-1] for line in csv_out.read_text().splitlines()]

    # adapted again, to a lab of unknown pixel size: the last lab's size is not kept
    again = tmp_path / "again"
    assert main(["adapt", str(out), str(root / "other"), "--out", str(again),
                 "--method", "batch-norm", "--no-progress"]) == 0
    assert load_model(again)[0].config.input_pixel_size is None
    for engine in ("torch", "onnx"):
        default = probs(engine=engine)
        assert default == probs("--pixel-size", "1.0", engine=engine)
        assert default != probs("--pixel-size", "0.5", engine=engine)


def test_pseudo_labels_keep_the_surest_share_of_each_predicted_class():
    probs = np.array([[0.9, 0.1, 0.0],   # class 0, surest
                      [0.6, 0.4, 0.0],   # class 0
                      [0.7, 0.3, 0.0],   # class 0, flagged: never labelled
                      [0.5, 0.2, 0.3],   # class 0, least sure
                      [0.2, 0.8, 0.0],   # class 1
                      [0.1, 0.2, 0.7],   # class 2
                      [np.nan] * 3])     # unreadable
    flagged = np.array([False, False, True, False, False, False, False])
    # class 0 keeps ceil(0.5 * 3) = 2 of its 3 unflagged cells; 1 and 2 ceil(0.5) = 1 each
    np.testing.assert_array_equal(pseudo_labels(probs, flagged, 0.5), [0, 1, 4, 5])
    np.testing.assert_array_equal(pseudo_labels(probs, flagged, 0.3), [0, 4, 5])
    np.testing.assert_array_equal(pseudo_labels(probs, flagged, 1.0), [0, 1, 3, 4, 5])
    assert pseudo_labels(probs[6:], flagged[6:], 1.0).size == 0
    with pytest.raises(LeukotreeError, match="'keep' parameter must be in"):
        pseudo_labels(probs, flagged, 0.0)


def test_self_training_fine_tunes_on_its_own_labels_and_replays_the_source(
        run_and_new_lab, tmp_path, capsys, monkeypatch):
    root = run_and_new_lab
    source_files = sorted(p.name for p in (root / "run").iterdir())
    (tmp_path / "lab").mkdir()
    shutil.copytree(root / "other", tmp_path / "lab" / "other")
    (tmp_path / "lab" / "broken.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path / "lab")  # the inputs given relative to here
    twice = str(next((tmp_path / "lab" / "other").rglob("*.png")))
    with (root / "run" / "split.csv").open() as handle:
        own = next(csv.DictReader(handle))["path"]  # one of the source run's images
    code = main(["adapt", str(root / "run"), "other", "broken.png", twice, own,
                 "--out", "../tuned", "--method", "self-train", "--epochs", "1",
                 "--batch-size", "8", "--no-progress"])
    out = tmp_path / "tuned"
    assert code == 3  # adapted, with one unreadable input named
    assert sorted(p.name for p in (root / "run").iterdir()) == source_files  # untouched
    said = " ".join(capsys.readouterr().err.split())
    assert "broken.png" in said and "self-trained on" in said
    assert "1 of the given images are the source run's own" in said
    report = json.loads((out / "adapt.json").read_text())
    # the image given twice is used once; the source's own image left out
    assert report["n_cells"] == 28 and len(report["unreadable"]) == 1
    assert report["in_source_run"] == 1
    with (out / "pseudo_labels.csv").open() as handle:
        labelled = list(csv.DictReader(handle))
    # of each class the source model predicts, the surer half of its cells not flagged
    before = tmp_path / "before.csv"
    main(["predict", str(root / "run"), "other", "--out", str(before), "--no-progress"])
    with before.open() as handle:
        predicted = {os.path.abspath(r["path"]): r for r in csv.DictReader(handle)
                     if r["unclassifiable"] == "False"}
    counts = Counter(r["predicted_leaf"] for r in predicted.values())
    assert report["pseudo_labelled"] == {k: math.ceil(n / 2) for k, n in counts.items()}
    assert len(labelled) == sum(report["pseudo_labelled"].values())
    for row in labelled:  # absolute paths: the manifest is read from its own folder
        assert row["label"] == predicted[row["path"]]["predicted_leaf"]
        assert float(row["probability"]) == pytest.approx(
            float(predicted[row["path"]][f"p_{row['label']}"]), abs=1e-5)

    def split(run):
        with (run / "split.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        return ({r["path"] for r in rows if r["split"] == "train"},
                {r["path"] for r in rows if r["split"] == "val"})

    # trained on the labelled cells and the replayed source images; validated (and
    # calibrated) on the source's validation images, with their real labels
    source_train, source_val = split(root / "run")
    tuned_train, tuned_val = split(out)
    assert tuned_train == source_train | {r["path"] for r in labelled}
    assert tuned_val == source_val
    assert read_checkpoint(out)["extra"]["adapted"]["keep"] == 0.5
    # the cells it only labelled are not known cells to the out-of-distribution score
    assert "ood_reference: replayed" in (out / "config.yaml").read_text()
    # a quarter of the source run's learning rate (tiny-test: 3e-3)
    assert report["lr"] == pytest.approx(0.75e-3) and report["patient_model"] is None
    assert main(["predict", str(out), "other", "--no-progress"]) == 0


def test_self_training_refuses_what_it_cannot_adapt(run_and_new_lab, tmp_path, capsys):
    root = run_and_new_lab
    new = str(root / "other")

    def refused(*argv: str) -> str:
        assert main(["adapt", *argv, "--no-progress"]) == 2
        return " ".join(capsys.readouterr().err.split())

    assert "--pixel-size is not supported" in refused(
        str(root / "run"), new, "--out", str(tmp_path / "a"), "--pixel-size", "0.5")
    assert "--keep, --epochs only apply to --method self-train" in refused(
        str(root / "run"), new, "--out", str(tmp_path / "b"), "--method", "batch-norm",
        "--keep", "0.3", "--epochs", "2")
    assert "lies inside the input folder" in refused(
        str(root / "run"), new, "--out", str(root / "other" / "adapted"))
    pixels = tmp_path / "pixels"
    shutil.copytree(root / "run", pixels)
    config = (pixels / "config.yaml").read_text()
    (pixels / "config.yaml").write_text(config.replace("pixel_size: null",
                                                       "pixel_size: 0.4"))
    said = refused(str(pixels), new, "--out", str(tmp_path / "c"), "--method", "self-train")
    assert "cannot adapt" in said and "--pixel-size" in said
    assert not (tmp_path / "c").exists()  # refused before anything was written
    # too few cells to label (ceil(0.1 * n) of each predicted class): refused after
    # predicting, and the folder it had begun is gone
    said = refused(str(root / "run"), new, "--out", str(tmp_path / "d"), "--keep", "0.1")
    assert "needs at least 10 cells the model can label" in said
    assert not (tmp_path / "d").exists()
    (tmp_path / "e").mkdir()  # an empty folder given is left empty
    assert "needs at least 10" in refused(str(root / "run"), new, "--out",
                                          str(tmp_path / "e"), "--keep", "0.1")
    assert not any((tmp_path / "e").iterdir())


def test_self_training_fits_the_patient_model_again_on_the_source_patients(
        run_and_new_lab, tmp_path):
    root = run_and_new_lab
    source = tmp_path / "source"
    train(root / "data", source, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "val_fraction": 0.3, "patient_model": "mean"}), progress=False)
    with (source / "split.csv").open() as handle:
        train_patients = {r["patient"] for r in csv.DictReader(handle)
                          if r["split"] == "train"}
    out = tmp_path / "tuned"
    assert main(["adapt", str(source), str(root / "other"), "--out", str(out), "--keep", "1",
                 "--epochs", "1", "--lr", "1e-3", "--no-progress"]) == 0
    report = json.loads((out / "adapt.json").read_text())
    assert report["lr"] == 1e-3
    assert report["patient_model"].startswith("'mean', fitted again")
    # fitted on the replayed training patients alone: the new cells have no patient id
    assert report["training"]["patient_level"]["train_patients"] == len(train_patients)
    assert read_checkpoint(out)["patient_model"]["name"] == "mean"
    # a self-trained run adapted again: it replays its own labelled cells (no patient id)
    generate(tmp_path / "third", load_taxonomy("leukemia7"), patients_per_class=1,
             cells_per_patient=4, size=40, seed=13, progress=False)
    again = tmp_path / "again"
    assert main(["adapt", str(out), str(tmp_path / "third"), "--out", str(again), "--keep",
                 "1", "--epochs", "1", "--no-progress"]) == 0
    report = json.loads((again / "adapt.json").read_text())
    assert report["training"]["patient_level"]["train_patients"] == len(train_patients)


def test_self_training_names_an_unknown_option_of_the_source_config(run_and_new_lab,
                                                                   tmp_path, capsys):
    root = run_and_new_lab
    odd = tmp_path / "odd"
    shutil.copytree(root / "run", odd)
    with (odd / "config.yaml").open("a") as handle:
        handle.write("learning_rat: 0.1\n")
    assert main(["adapt", str(odd), str(root / "other"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "Unknown option 'learning_rat' in the config file" in said
    assert str(odd / "config.yaml") in said and not (tmp_path / "o").exists()


def test_a_stopped_self_training_resumes(run_and_new_lab, tmp_path, capsys, monkeypatch):
    import leukotree.engine.trainer as trainer
    from leukotree.engine.adapt import self_train

    root = run_and_new_lab
    out = tmp_path / "tuned"
    real_train = trainer.train

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # stopped once the cells are labelled

    monkeypatch.setattr(trainer, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        self_train(root / "run", [root / "other"], out, epochs=2, progress=False)
    monkeypatch.setattr(trainer, "train", real_train)
    labelled = json.loads((out / "self_training.json").read_text())
    assert (out / "pseudo_labels.csv").exists() and not (out / "adapt.json").exists()
    argv = ["adapt", str(root / "run"), str(root / "other"), "--out", str(out),
            "--no-progress"]
    assert main(argv) == 2
    assert "holds a stopped self-training; add --resume" in capsys.readouterr().err
    assert main([*argv, "--resume", "--epochs", "3"]) == 2
    assert "keeps its options" in capsys.readouterr().err
    assert main([*argv, "--resume", "--method", "batch-norm"]) == 2
    assert "--resume only apply to --method self-train" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    report = json.loads((out / "adapt.json").read_text())
    assert report["pseudo_labelled"] == labelled["pseudo_labelled"]
    assert report["epochs"] == 2 and len(report["training"]["history"]) == 2
    assert main([*argv, "--resume"]) == 2
    assert "has finished" in capsys.readouterr().err
    # stopped after its last epoch, before the report: resumed from last.pt
    (out / "adapt.json").unlink()
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "adapt.json").read_text())["training"]["history"] == report[
        "training"]["history"]
    # resumed with the run it adapts only
    other = tmp_path / "other-run"
    shutil.copytree(root / "run", other)
    (out / "adapt.json").unlink()
    assert main(["adapt", str(other), str(root / "other"), "--out", str(out), "--resume",
                 "--no-progress"]) == 2
    assert "resume it with that run" in capsys.readouterr().err


def test_a_self_training_stopped_mid_fine_tune_continues_from_its_last_epoch(
        run_and_new_lab, tmp_path, monkeypatch):
    from leukotree.engine.adapt import self_train
    from leukotree.engine.trainer import Trainer

    root = run_and_new_lab
    out = tmp_path / "tuned"
    end_epoch = Trainer._end_epoch

    def stop_after_first(self, state, *args, **kwargs):
        stop = end_epoch(self, state, *args, **kwargs)
        if state.epoch == 1:
            raise KeyboardInterrupt  # last.pt of epoch 1 written
        return stop

    monkeypatch.setattr(Trainer, "_end_epoch", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        self_train(root / "run", [root / "other"], out, epochs=3, progress=False)
    monkeypatch.setattr(Trainer, "_end_epoch", end_epoch)
    first = (out / "history.csv").read_text().splitlines()
    assert len(first) == 2 and (out / "last.pt").exists()
    assert main(["adapt", str(root / "run"), str(root / "other"), "--out", str(out),
                 "--resume", "--no-progress"]) == 0
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 4 and history[:2] == first  # epoch 1 kept, 2 and 3 trained
