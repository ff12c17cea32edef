"""The training engine end to end on tiny synthetic data (CPU, tiny timm models)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import Trainer, train
from leukotree.errors import LeukotreeError
from leukotree.models.checkpoint import load_model, read_checkpoint
from leukotree.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-train")
    generate(root, load_taxonomy("leukemia7"), patients_per_class=4, cells_per_patient=6,
             size=32, seed=1, inner_fraction=0.1, progress=False)
    return root


def _history(run):
    with open(run / "history.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("head", ["flat", "multihead", "per-node", "hybrid"])
def test_two_epochs_of_every_head_from_the_cli(synth_data, tmp_path, head):
    run = tmp_path / head
    code = main(["train", str(synth_data), "-t", "leukemia7", "--out", str(run),
                 "--preset", "tiny-test", "--head", head, "--epochs", "2", "--no-progress"])
    assert code == 0
    for name in ("config.yaml", "environment.json", "taxonomy.yaml", "split.csv",
                 "history.csv", "best.pt", "last.pt", "summary.json"):
        assert (run / name).exists(), name
    assert len(_history(run)) == 2
    model, payload = load_model(run)
    assert payload["class_order"] == list(load_taxonomy("leukemia7").leaves)
    assert payload["model_config"]["head"] == head
    with torch.no_grad():
        probs = model(torch.rand(2, 3, 32, 32) * 255)["leaf_logp"].exp()
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)


def test_split_keeps_patients_apart_and_is_saved(synth_data, tmp_path):
    run = tmp_path / "run"
    train(synth_data, run, resolve_config(preset="tiny-test", overrides={"epochs": 1}),
          progress=False)
    with open(run / "split.csv") as handle:
        rows = list(csv.DictReader(handle))
    sides: dict[str, set[str]] = {}
    for row in rows:
        sides.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert {r["split"] for r in rows} == {"train", "val"}


def test_same_seed_gives_the_same_metrics(synth_data, tmp_path):
    cfg = resolve_config(preset="tiny-test", overrides={"epochs": 2, "threads": 1})
    a = train(synth_data, tmp_path / "a", cfg, progress=False)
    b = train(synth_data, tmp_path / "b", cfg, progress=False)
    keys = ("train_loss", "val_loss", "val_accuracy")
    assert [[h[k] for k in keys] for h in a["history"]] == \
        [[h[k] for k in keys] for h in b["history"]]


def test_kill_9_mid_run_then_resume_finishes_with_the_same_result(synth_data, tmp_path):
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "leukotree", "train", str(synth_data), "-t", "leukemia7",
            "--out", str(run), "--preset", "tiny-test", "--epochs", "6", "--threads", "1",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_history(run)) if (run / "history.csv").exists() else 0
    assert done < 6, "the run finished before it could be killed"
    assert (run / "last.pt").exists()
    assert main(["train", str(synth_data), "--out", str(run), "--resume", "--no-progress"]) == 0
    resumed = _history(run)
    assert [int(r["epoch"]) for r in resumed] == list(range(1, 7))
    ref = train(synth_data, tmp_path / "ref", resolve_config(
        preset="tiny-test", overrides={"epochs": 6, "threads": 1}), progress=False)
    assert float(resumed[-1]["val_loss"]) == pytest.approx(ref["history"][-1]["val_loss"],
                                                          rel=1e-5)


def test_existing_run_is_not_overwritten(synth_data, tmp_path):
    cfg = resolve_config(preset="tiny-test", overrides={"epochs": 1})
    train(synth_data, tmp_path / "r", cfg, progress=False)
    with pytest.raises(LeukotreeError, match="--resume"):
        train(synth_data, tmp_path / "r", cfg, progress=False)


def test_checkpoint_is_self_describing_and_loads_without_code(synth_data, tmp_path):
    train(synth_data, tmp_path / "r", resolve_config(preset="tiny-test", overrides={
        "epochs": 1}), progress=False)
    payload = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert payload["format"] == "leukotree-model/1"
    assert set(payload) >= {"taxonomy", "model_config", "class_order", "state_dict",
                            "environment"}
    assert len(payload["model_config"]["mean"]) == 3
    bogus = tmp_path / "bogus.pt"
    torch.save({"hello": 1}, bogus)
    with pytest.raises(LeukotreeError, match="not a leukotree model"):
        read_checkpoint(bogus)


def test_config_file_sets_defaults_and_rejects_unknown_keys(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 3\nhead: flat\n")
    cfg = resolve_config(config_file=good, overrides={"epochs": 5})
    assert (cfg.epochs, cfg.head) == (5, "flat")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    with pytest.raises(LeukotreeError, match="Did you mean 'epochs'"):
        resolve_config(config_file=bad)
    with pytest.raises(LeukotreeError, match="'loss'"):
        resolve_config(overrides={"loss": "hinge"})


def test_ema_run_saves_the_average_as_best_and_keeps_it_for_resume(synth_data, tmp_path):
    run = tmp_path / "ema"
    assert main(["train", str(synth_data), "--out", str(run), "--preset", "tiny-test",
                 "--epochs", "1", "--ema-decay", "0.9", "--no-progress"]) == 0
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)["state_dict"]
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items()
                if k.startswith("module.")}
    assert set(averaged) == set(best)
    assert all(torch.equal(best[k], averaged[k]) for k in best)
    assert not all(torch.equal(best[k], last["model"][k]) for k in best)


def test_ddp_with_two_gloo_processes_gives_a_checkpoint(synth_data, tmp_path):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "leukotree", "train", str(synth_data), "-t", "leukemia7", "--out", str(run),
         "--preset", "tiny-test", "--threads", "1", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    model, payload = load_model(run)
    assert payload["format"] == "leukotree-model/1"
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32) * 255)["leaf_logp"].shape == (1, 7)
    env_json = (run / "environment.json").read_text()
    assert '"world_size": 2' in env_json


def test_hybrid_head_takes_one_weights_file_per_backbone(synth_data, tmp_path):
    import timm

    whole = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "test_resnet.pth"
    torch.save(whole.state_dict(), path)
    run = tmp_path / "hybrid"
    assert main(["train", str(synth_data), "--out", str(run), "--preset", "tiny-test",
                 "--head", "hybrid", "--epochs", "1", "--lr", "1e-12",
                 "--weights", f"test_resnet={path}", "--no-progress"]) == 0
    state = torch.load(run / "best.pt", weights_only=True)["state_dict"]
    conv = whole.state_dict()["conv1.0.weight"]
    assert torch.allclose(state["extractors.0.conv1.0.weight"], conv, atol=1e-6)
    assert main(["train", str(synth_data), "--out", str(tmp_path / "bad"), "--preset",
                 "tiny-test", "--head", "hybrid", "--weights", str(path),
                 "--no-progress"]) == 2


def test_training_leaves_threads_and_random_state_as_it_found_them(synth_data, tmp_path):
    import matplotlib

    threads, rng, backend = torch.get_num_threads(), torch.random.get_rng_state(), \
        matplotlib.get_backend()
    cfg = resolve_config(preset="tiny-test", overrides={"epochs": 1, "threads": 1,
                                                        "seed": 3})
    train(synth_data, tmp_path / "run", cfg, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert matplotlib.get_backend() == backend
    assert (tmp_path / "run" / "learning_curves.png").stat().st_size > 0


def test_eval_every_validates_on_its_epochs_and_after_the_last(synth_data, tmp_path):
    cfg = resolve_config(preset="tiny-test", overrides={"epochs": 3, "eval_every": 2,
                                                        "threads": 1})
    summary = train(synth_data, tmp_path / "run", cfg, progress=False)
    validated = [h["val_loss"] == h["val_loss"] for h in summary["history"]]  # not NaN
    assert validated == [False, True, True]
    assert summary["best_epoch"] in {2, 3}
    assert _history(tmp_path / "run")[0]["val_loss"] == "nan"


def test_a_finished_run_resumed_trains_nothing_more(synth_data, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", str(synth_data), "-t", "leukemia7", "--out", str(run), "--preset",
            "tiny-test", "--epochs", "1", "--threads", "1", "--no-progress"]
    assert main(base) == 0
    before = (run / "history.csv").read_text()
    assert main([*base[:6], "--resume", "--no-progress"]) == 0
    assert "nothing left to train" in capsys.readouterr().err
    assert (run / "history.csv").read_text() == before


def test_a_run_saved_on_a_gpu_machine_resumes_here_with_device_cpu(synth_data, tmp_path):
    run = tmp_path / "run"
    base = ["train", str(synth_data), "-t", "leukemia7", "--out", str(run), "--preset",
            "tiny-test", "--epochs", "1", "--threads", "1", "--no-progress"]
    assert main(base) == 0
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("device: auto", "device: cuda"))
    assert main(["train", str(synth_data), "--out", str(run), "--resume", "--device", "cpu",
                 "--no-progress"]) == 0


def test_fold_and_separate_validation_data_exclude_each_other(synth_data, tmp_path):
    with pytest.raises(LeukotreeError, match="'fold' and 'val_data'"):
        resolve_config(overrides={"fold": 0, "val_data": str(synth_data)})
    from leukotree.evaluation.cv import cross_validate

    cfg = resolve_config(preset="tiny-test", overrides={"val_data": str(synth_data)})
    with pytest.raises(LeukotreeError, match="remove 'val_data'"):
        cross_validate(synth_data, tmp_path / "cv", cfg, folds=2)


def test_calibration_and_ood_threshold_are_fitted_on_validation_and_stored(synth_data,
                                                                           tmp_path):
    run = tmp_path / "run"
    summary = train(synth_data, run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "val_fraction": 0.3}), progress=False)
    payload = read_checkpoint(run)
    temps = payload["calibration"]["temperatures"]
    assert set(temps) == set(load_taxonomy("leukemia7").inner_nodes)
    assert all(0.05 <= t <= 20 for t in temps.values())
    # the fit minimises the validation NLL, so it is never worse than no temperature
    assert payload["calibration"]["nll_after"] <= payload["calibration"]["nll_before"] + 1e-4
    ood = payload["ood"]
    assert ood["quantile"] == 0.95 and ood["threshold"] > 0 and ood["val_flagged"] <= 0.1
    assert summary["ood"]["threshold"] == ood["threshold"]
    # the last three backbone stages, each scaled by its validation quantile
    assert ood["stages"] == 3 and len(ood["means"]) == len(ood["scales"]) == 3
    assert all(s > 0 for s in ood["scales"])
    model, _ = load_model(run)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32) * 255)["ood_score"].shape == (2,)
    single = tmp_path / "single"
    train(synth_data, single, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "val_fraction": 0.3, "ood_layers": 1}), progress=False)
    ood = read_checkpoint(single)["ood"]
    assert ood["stages"] == 1 and ood["means"].ndim == 2 and "scales" not in ood


def test_the_stored_model_gives_the_calibration_it_was_fitted_to(synth_data, tmp_path):
    # temperatures and distance power are fitted on the validation cells' outputs; the
    # stored model (OOD score, then tempering) must reproduce the reported NLL on them
    from pathlib import Path

    from leukotree.inference.loader import load
    from leukotree.inference.predictor import predict_paths
    from leukotree.models.calibration import tree_nll

    run = tmp_path / "run"
    train(synth_data, run, resolve_config(preset="tiny-test", overrides={
        "epochs": 2, "val_fraction": 0.4}), progress=False)
    cal = read_checkpoint(run)["calibration"]
    assert 0 <= cal.get("distance_power", 0.0) <= 2
    with (run / "split.csv").open() as handle:
        val = [r for r in csv.DictReader(handle) if r["split"] == "val"]
    predictor = load(run).predictor()
    probs = predict_paths(predictor, [Path(r["path"]) for r in val], progress=False,
                          workers=1).leaf_probs
    taxonomy = load_taxonomy("leukemia7")
    assert tree_nll(taxonomy, [r["label"] for r in val], probs) == pytest.approx(
        cal["nll_after"], abs=1e-3)
    plain = tmp_path / "plain"
    train(synth_data, plain, resolve_config(preset="tiny-test", overrides={
        "epochs": 2, "val_fraction": 0.4, "distance_temperature": False}), progress=False)
    assert "distance_power" not in read_checkpoint(plain)["calibration"]


def test_a_cross_validation_fold_is_calibrated_on_its_own_validation_patients_only(
        synth_data, tmp_path):
    run = tmp_path / "fold"
    train(synth_data, run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "fold": 0, "folds": 3}), progress=False)
    with (run / "split.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    patients = {part: {r["patient"] for r in rows if r["split"] == part}
                for part in ("train", "val", "test")}
    # the test fold is fold 0 of the same folds; the validation patients are carved
    # from the other folds' patients; no patient on two sides
    assert all(patients.values())
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    n_test = sum(r["split"] == "test" for r in rows)
    assert 0.2 < n_test / len(rows) < 0.5
    fold0 = tmp_path / "fold0"
    train(synth_data, fold0, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "fold": 0, "folds": 3, "fold_val_fraction": 0}), progress=False)
    with (fold0 / "split.csv").open() as handle:
        old = list(csv.DictReader(handle))
    assert ({r["path"] for r in old if r["split"] == "val"}
            == {r["path"] for r in rows if r["split"] == "test"})
    # fitted on the validation patients, never on the test fold
    payload = read_checkpoint(run)
    assert "calibration" in payload and "ood" in payload
    summary = json.loads((run / "summary.json").read_text())
    assert summary["calibration"]["fitted_on"] == len([r for r in rows if r["split"] == "val"])
    # validated on the test fold itself: nothing fitted
    payload = read_checkpoint(fold0)
    assert "calibration" not in payload and "ood" not in payload


def test_init_fine_tunes_from_a_trained_model_and_refuses_one_that_does_not_fit(synth_data,
                                                                               tmp_path):
    first = tmp_path / "first"
    train(synth_data, first, resolve_config(preset="tiny-test", overrides={"epochs": 1}),
          progress=False)
    source, _ = load_model(first)
    tuned = tmp_path / "tuned"
    train(synth_data, tuned, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "init": str(first), "lr": 1e-9, "seed": 5}), progress=False)
    model, _ = load_model(tuned)
    # with a vanishing learning rate the fine-tuned weights are the source's
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values(),
                            strict=True):
        if "running" not in name and "num_batches" not in name:
            assert torch.allclose(a, b, atol=1e-6), name
    assert model.config.mean == source.config.mean  # the source's normalisation
    with pytest.raises(LeukotreeError, match="norm is 'batch', this training's 'group'"):
        train(synth_data, tmp_path / "gn", resolve_config(preset="tiny-test", overrides={
            "epochs": 1, "init": str(first), "norm": "group"}), progress=False)
    with pytest.raises(LeukotreeError, match="stain_norm is 'none', this training's "
                                             "'reinhard'"):
        train(synth_data, tmp_path / "st", resolve_config(preset="tiny-test", overrides={
            "epochs": 1, "init": str(first), "stain_norm": "reinhard"}), progress=False)
    with pytest.raises(LeukotreeError, match="img_size is 32, this training's 40"):
        train(synth_data, tmp_path / "bad", resolve_config(preset="tiny-test", overrides={
            "epochs": 1, "init": str(first), "img_size": 40}), progress=False)
    with pytest.raises(LeukotreeError, match="is not a trained model"):
        resolve_config(preset="tiny-test", overrides={"init": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("kind", ["white", "reinhard"])
def test_a_stain_normalised_run_carries_the_training_images_target(kind, synth_data,
                                                                   tmp_path):
    import numpy as np

    from leukotree.data.images import load_rgb_array
    from leukotree.models.stain import fit_stain_target

    run = tmp_path / "stain"
    train(synth_data, run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "stain_norm": kind}), progress=False)
    model, payload = load_model(run)
    assert payload["model_config"]["stain_norm"] == kind
    target = model.config.stain_target
    with (run / "split.csv").open() as handle:
        paths = [r["path"] for r in csv.DictReader(handle) if r["split"] == "train"]
    # the training images' statistics, as decoded for training (to the rounding of
    # resizing from the padded cache)
    pixels = np.stack([load_rgb_array(p, 32) for p in paths])
    np.testing.assert_allclose(target, fit_stain_target(kind, pixels), rtol=0.05, atol=0.5)
    fine = tmp_path / "fine"  # fine-tuning keeps the source's target
    train(synth_data, fine, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "stain_norm": kind, "init": str(run)}), progress=False)
    assert load_model(fine)[0].config.stain_target == target


def _second_lab(tmp_path):
    """A manifest of other synthetic cells whose patients are named apart (``lab2-...``)."""
    root = tmp_path / "lab2"
    generate(root, load_taxonomy("leukemia7"), patients_per_class=3, cells_per_patient=2,
             size=32, seed=7, progress=False)
    manifest = tmp_path / "lab2.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient"])
        for image in sorted(root.rglob("*.png")):
            writer.writerow([image, image.parent.parent.name, f"lab2-{image.parent.name}"])
    return manifest


def _split(run):
    with open(run / "split.csv") as handle:
        rows = list(csv.DictReader(handle))
    return ({r["path"] for r in rows if r["split"] == "train"},
            {r["path"] for r in rows if r["split"] == "val"})


def test_replay_trains_on_the_source_runs_images_beside_the_new_ones(synth_data, tmp_path,
                                                                     capsys):
    first = tmp_path / "first"
    train(synth_data, first, resolve_config(preset="tiny-test", overrides={"epochs": 1}),
          progress=False)
    lab2 = _second_lab(tmp_path)
    tuned = tmp_path / "tuned"
    capsys.readouterr()
    train(lab2, tuned, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "init": str(first), "replay": str(first / "best.pt"),  # its model file
        "val_fraction": 0.34}),
          progress=False)
    source_train, _ = _split(first)
    tuned_train, tuned_val = _split(tuned)
    assert source_train <= tuned_train  # every training image of the first lab replayed
    assert not source_train & tuned_val  # and none validated on
    assert all("lab2" in path for path in tuned_val)
    new = len(tuned_train - source_train)
    # 28 new images beside 144 replayed: repeated round(144 / 28) = 5 times (share 0.5),
    # 140 of the epoch's 284 images
    assert (new, len(source_train)) == (28, 144)
    assert (f"replaying {len(source_train)} training images of {first / 'best.pt'}: the {new} "
            "new ones "
            "are repeated 5x, 49% of each epoch") in (said := " ".join(
                capsys.readouterr().err.split()))
    # 14 validation cells cannot pick an epoch, and the run says so
    assert ("only 14 validation images: one image moves their accuracy by 7.1 points" in said)
    # a data folder replays its images the same way
    folder = tmp_path / "folder"
    train(lab2, folder, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "replay": str(synth_data), "val_fraction": 0.34}),
          progress=False)
    folder_train, _ = _split(folder)
    assert len(folder_train) == new + len(source_train) + len(_split(first)[1])


def test_replay_refuses_images_of_the_validation_patients(synth_data, tmp_path):
    first = tmp_path / "first"
    train(synth_data, first, resolve_config(preset="tiny-test", overrides={"epochs": 1}),
          progress=False)
    # the same data again: its validation patients are among the first run's training ones
    with pytest.raises(LeukotreeError, match=r"are validation \(or test\) images or of such "
                                             r"a patient .*leaks"):
        train(synth_data, tmp_path / "leak", resolve_config(preset="tiny-test", overrides={
            "epochs": 1, "replay": str(first), "seed": 3}), progress=False)
    # nor may it train a cross-validation fold on its test patients
    with pytest.raises(LeukotreeError, match=r"are validation \(or test\) images"):
        train(synth_data, tmp_path / "leak-fold", resolve_config(
            preset="tiny-test", overrides={"epochs": 1, "replay": str(first), "fold": 0,
                                           "folds": 3}), progress=False)
    with pytest.raises(LeukotreeError, match=r"--replay .* does not exist"):
        resolve_config(preset="tiny-test", overrides={"replay": str(tmp_path / "nowhere")})


def test_a_cell_centred_run_keeps_its_crop_for_prediction(synth_data, tmp_path):
    run = tmp_path / "cell"
    train(synth_data, run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "crop_mode": "cell", "crop_fraction": 0.8}), progress=False)
    model, payload = load_model(run)
    assert payload["model_config"]["crop_mode"] == model.config.crop_mode == "cell"
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(synth_data / "ALL"), "--out", str(out),
                 "--no-progress"]) == 0
    n = sum(1 for p in (synth_data / "ALL").rglob("*") if p.is_file())
    assert len(out.read_text().splitlines()) == 1 + n


def test_resuming_a_finished_run_keeps_its_calibration(synth_data, tmp_path):
    run = tmp_path / "run"
    cfg = resolve_config(preset="tiny-test", overrides={"epochs": 1, "val_fraction": 0.3})
    train(synth_data, run, cfg, progress=False)
    before = read_checkpoint(run)
    train(synth_data, run, cfg, resume=True, progress=False)
    after = read_checkpoint(run)
    assert after["calibration"]["temperatures"] == before["calibration"]["temperatures"]
    assert after["ood"]["threshold"] == pytest.approx(before["ood"]["threshold"])


def test_a_run_with_a_pixel_size_sees_one_physical_field_at_any_magnification(synth_data,
                                                                             tmp_path):
    import numpy as np
    from PIL import Image

    from leukotree.data.images import load_rgb_array
    from leukotree.inference.options import InferenceOptions

    run = tmp_path / "run"
    train(synth_data, run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "pixel_size": 0.5, "crop_fraction": 0.8}), progress=False)
    model, _ = load_model(run)
    assert model.config.pixel_size == 0.5
    assert model.config.field_um == pytest.approx(0.8 * 32 * 0.5)  # synthetic images: 32 px
    # The same cell photographed at twice the magnification (0.25 um per pixel) and
    # framed more widely: with its pixel size, the model sees what it saw in training.
    original = next(p for p in sorted(synth_data.rglob("*.png")))
    big = np.asarray(Image.open(original).convert("RGB").resize((64, 64), Image.BILINEAR))
    framed = np.pad(big, ((20, 20), (20, 20), (0, 0)), mode="edge")
    Image.fromarray(framed).save(tmp_path / "zoomed.png")
    own = load_rgb_array(original, 32, **model.config.decode_options())
    cfg = InferenceOptions(pixel_size=0.25).input_config(model.config)
    assert model.config.input_pixel_size is None  # a new view; the model's own is kept
    assert cfg.decode_options()["window"] == pytest.approx(0.8 * 32 * 0.5 / 0.25)
    with pytest.raises(LeukotreeError, match="no effect with crop mode 'cell'"):
        InferenceOptions(crop_mode="cell", pixel_size=0.25).input_config(model.config)
    with pytest.raises(LeukotreeError, match=r"'pixel_size' parameter must be float; got 'x'"):
        InferenceOptions(pixel_size="x")
    seen = load_rgb_array(tmp_path / "zoomed.png", 32, **cfg.decode_options())
    naive = load_rgb_array(tmp_path / "zoomed.png", 32, **model.config.decode_options())
    err = np.abs(seen.astype(int) - own).mean()
    assert err < 6 < np.abs(naive.astype(int) - own).mean()
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(tmp_path / "zoomed.png"), "--pixel-size", "0.25",
                 "--out", str(out), "--no-progress", "--engine", "torch"]) == 0
    assert len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):  # argparse: "must be in (0, 1000]; got -1"
        main(["predict", str(run), str(tmp_path / "zoomed.png"), "--pixel-size", "-1"])


def test_a_training_manifest_pixel_size_column_must_agree_with_the_pixel_size(synth_data,
                                                                             tmp_path):
    files = sorted(synth_data.rglob("*.png"))
    rows = [f"{p},{p.parent.parent.name},{p.parent.name},{'0.5' if i % 2 else ''}"
            for i, p in enumerate(files)]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient,pixel_size\n" + "\n".join(rows) + "\n")
    cfg = {"epochs": 1, "patients": "manifest"}
    with pytest.raises(LeukotreeError, match=r"gives 0\.5 micrometres per pixel .*--pixel-size "
                                             r"\(none\)"):
        train(manifest, tmp_path / "a", resolve_config(preset="tiny-test", overrides=cfg),
              progress=False)
    with pytest.raises(LeukotreeError, match="One training uses one pixel size"):
        train(manifest, tmp_path / "b", resolve_config(preset="tiny-test", overrides={
            **cfg, "pixel_size": 0.25}), progress=False)
    # rows without a value are read at --pixel-size, like the rows that give it
    train(manifest, tmp_path / "c", resolve_config(preset="tiny-test", overrides={
        **cfg, "pixel_size": 0.5}), progress=False)
    assert load_model(tmp_path / "c")[0].config.pixel_size == 0.5


def test_audit_cells_of_a_manifest_are_never_trained_on_and_are_named(synth_data, tmp_path):
    files = sorted(synth_data.rglob("*.png"))
    audit = {str(p) for p in files[::5]}  # as serve's /api/corrections.csv writes them
    rows = [f"{p},{p.parent.parent.name},{p.parent.name},{str(p) in audit}" for p in files]
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,patient,audit\n" + "\n".join(rows) + "\n")
    train(manifest, tmp_path / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "patients": "manifest"}), progress=False)
    split = {r["path"] for r in csv.DictReader((tmp_path / "run" / "split.csv").open())}
    assert split == {str(p) for p in files} - audit
    named = list(csv.DictReader((tmp_path / "run" / "not_used.csv").open()))
    assert len(named) == len(audit) and all("never trained on" in r["reason"] for r in named)


def test_balanced_class_weights_count_each_image_as_often_as_an_epoch_shows_it(tmp_path):
    trainer = Trainer(tmp_path, tmp_path / "run", resolve_config(
        preset="tiny-test", overrides={"class_weights": "balanced"}))
    taxonomy = load_taxonomy("leukemia7")
    train_split = SimpleNamespace(samples=[SimpleNamespace(label=label)
                                           for label in ("ALL", "ALL", "ALL", "AML")])
    model = SimpleNamespace(is_hierarchical=True)
    leaf = {name: k for k, name in enumerate(taxonomy.leaves)}
    # once each: ALL 3, AML 1 -> w = 4 / (7 * n): 4/21 and 4/7
    once = trainer._criterion(model, taxonomy, train_split, np.arange(4)).leaf_weights
    assert once[leaf["ALL"]].item() == pytest.approx(4 / 21)
    assert once[leaf["AML"]].item() == pytest.approx(4 / 7)
    # the AML image repeated 3x (a replay epoch's new image): 3 and 3 -> 6 / 21 each
    shown = trainer._criterion(model, taxonomy, train_split,
                               np.array([0, 1, 2, 3, 3, 3])).leaf_weights
    assert shown[leaf["ALL"]].item() == pytest.approx(6 / 21)
    assert shown[leaf["AML"]].item() == pytest.approx(6 / 21)


def test_ood_reference_replayed_measures_distance_to_the_replayed_cells_only(synth_data,
                                                                             tmp_path):
    # a first lab without CML; a second lab's cells include CML
    rows = [f"{p},{p.parent.parent.name},{p.parent.name}" for p in sorted(synth_data.rglob("*.png"))
            if p.parent.parent.name != "CML"]
    first_data = tmp_path / "first.csv"
    first_data.write_text("path,label,patient\n" + "\n".join(rows) + "\n")
    first = tmp_path / "first"
    train(first_data, first, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "patients": "manifest"}), progress=False)
    lab2 = _second_lab(tmp_path)
    classes = {}
    for reference in ("training", "replayed"):
        out = tmp_path / reference
        train(lab2, out, resolve_config(preset="tiny-test", overrides={
            "epochs": 1, "init": str(first), "replay": str(first), "val_fraction": 0.34,
            "ood_reference": reference}), progress=False)
        classes[reference] = set(read_checkpoint(out / "best.pt")["ood"]["classes"])
    assert "CML" in classes["training"] and "CML" not in classes["replayed"]
    with pytest.raises(LeukotreeError, match="--ood-reference replayed needs --replay"):
        resolve_config(preset="tiny-test", overrides={"ood_reference": "replayed"})


def test_a_fold_too_small_for_its_validation_part_says_why_and_what_to_do(synth_data,
                                                                          tmp_path, capsys):
    # 2 folds: 14 training patients, too few for one in 20 (0.05)
    assert main(["train", str(synth_data), "-t", "leukemia7", "--preset", "tiny-test",
                 "--fold", "0", "--folds", "2", "--fold-val-fraction", "0.05", "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "Fold 0's training images cannot spare a validation part" in said
    assert "14 patient groups, fewer than the 20" in said and "--fold-val-fraction 0" in said


def test_classes_without_a_validation_image_are_named(synth_data, tmp_path, capsys):
    other = tmp_path / "other"
    generate(other, load_taxonomy("leukemia7"), patients_per_class=1, cells_per_patient=3,
             size=32, seed=8, progress=False)
    rows = [f"{p},{p.parent.parent.name}" for label in ("ALL", "CLL")
            for p in sorted((other / label).rglob("*.png"))]
    (tmp_path / "val.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert main(["train", str(synth_data), "-t", "leukemia7", "--preset", "tiny-test",
                 "--epochs", "1", "--val", str(tmp_path / "val.csv"), "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    said = " ".join(capsys.readouterr().err.split())
    named = said.split("no validation image of ")[1].split(":")[0].split(", ")
    assert {"AML", "APML", "CML", "Normal", "Reactive"} <= set(named)
    assert "ALL" not in named and "CLL" not in named


def test_a_fold_file_fixes_the_held_out_patients(tmp_path):
    from leukotree.data.discover import Sample, SampleSet
    from leukotree.data.splits import write_fold_groups
    from leukotree.engine.config import TrainConfig
    from leukotree.engine.trainer import choose_split
    from leukotree.taxonomy import load_taxonomy

    tax = load_taxonomy("aml-apl")
    samples = [Sample(tmp_path / f"{p}_{c}.png", "APL" if p < 4 else "AML", f"p{p}")
               for p in range(8) for c in range(2)]
    found = SampleSet(samples, tax, tmp_path, "manifest")
    fixed = tmp_path / "folds.csv"
    write_fold_groups(fixed, [{"group": f"patient:p{p}", "fold": int(p in (0, 4))}
                              for p in range(8)])
    config = TrainConfig(taxonomy="aml-apl", fold=1, folds=2, fold_groups=str(fixed),
                         fold_val_fraction=0.0)
    parts = choose_split(found, config)
    held = {s.patient for s, part in zip(samples, parts, strict=True) if part == "val"}
    assert held == {"p0", "p4"}  # the file's fold 1, not a stratified draw
