"""Cross-validation and comparison tables on tiny synthetic data."""

import csv
import json
import shutil

import numpy as np
import pytest

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.evaluation.compare import bootstrap_ci
from leukotree.evaluation.cv import (
    compare_estimates,
    fold_scalars,
    mean_std,
    parse_protocols,
    repeat_spread,
)
from leukotree.taxonomy import load_taxonomy

TINY = ["--preset", "tiny-test", "--epochs", "1", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv-data")
    # 4 cells a patient: a fold's 2 training patients of a class give the 7 images a
    # validation part of 0.15 (1/7, stratified) needs
    generate(root, load_taxonomy("leukemia7"), patients_per_class=3, cells_per_patient=4,
             size=32, seed=4, progress=False)
    return root


@pytest.fixture(scope="module")
def cv_runs(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv")
    for head in ("flat", "multihead", "per-node"):
        assert main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", head,
                     "--out", str(out / head), *TINY]) == 0
    return out


def test_cv_writes_every_fold_and_the_table(cv_runs):
    summary = json.loads((cv_runs / "multihead" / "summary.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    accs = [f["accuracy"] for f in summary["folds"]]
    assert summary["mean"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["mean"]["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    for key in ("hF", "node:root", "node:Acute", "patient_accuracy", "ece_uncalibrated",
                "unclassifiable", "accuracy_kept"):
        assert key in summary["mean"]
    md = (cv_runs / "multihead" / "summary.md").read_text()
    assert "| Fold |" in md and "| 3 |" in md and "| mean ± std |" in md
    assert (cv_runs / "multihead" / "summary.html").exists()
    # each image is tested exactly once across the folds, patients never split
    seen: dict[str, int] = {}
    for k in range(3):
        split = (cv_runs / "multihead" / f"fold_{k}" / "split.csv").read_text().splitlines()
        for line in split[1:]:
            path, *_, part = line.split(",")
            if part == "test":
                seen[path] = seen.get(path, 0) + 1
        # calibrated on its own validation patients (never the test fold)
        fold = json.loads((cv_runs / "multihead" / f"fold_{k}" / "summary.json").read_text())
        assert fold["calibration"]["fitted_on"] == sum(
            line.endswith(",val") for line in split[1:])
        # and evaluated on its test fold
        predictions = (cv_runs / "multihead" / f"fold_{k}" / "eval" / "predictions.csv")
        assert ({line.split(",")[0] for line in predictions.read_text().splitlines()[1:]}
                == {line.split(",")[0] for line in split[1:] if line.endswith(",test")})
    assert set(seen.values()) == {1} and len(seen) == 7 * 3 * 4


def test_no_fold_is_chosen_on_its_own_test_images(cv_runs):
    # the preset monitors validation accuracy; in CV that would pick epochs on the test fold
    config = (cv_runs / "flat" / "cv_config.yaml").read_text()
    assert "monitor: last" in config and "patience: 0" in config
    for k in range(3):
        summary = json.loads((cv_runs / "flat" / f"fold_{k}" / "summary.json").read_text())
        assert summary["monitor"] == "last"


def test_a_cv_that_chose_epochs_on_its_test_folds_is_not_resumed(cv_runs, data, tmp_path,
                                                                  capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cv_runs / "flat", old)
    config = old / "cv_config.yaml"
    config.write_text(config.read_text().replace("monitor: last", "monitor: accuracy"))
    assert main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", "flat",
                 "--out", str(old), *TINY]) == 2
    assert "older leukotree" in capsys.readouterr().err


def test_a_cv_of_uncalibrated_folds_resumes_only_as_such(cv_runs, data, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    argv = ["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", "flat", "--out",
            str(old), *TINY]
    assert main([*argv, "--fold-val-fraction", "0"]) == 0
    for config in [old / "cv_config.yaml", *old.glob("fold_*/config.yaml")]:
        # as an older leukotree wrote them: no fold_val_fraction
        config.write_text("".join(line for line in config.read_text().splitlines(True)
                                  if not line.startswith("fold_val_fraction")))
    shutil.rmtree(old / "fold_2" / "eval")  # fold 2 left to finish
    assert main(argv) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "validate on their own test images" in said and "--fold-val-fraction 0" in said
    best = old / "fold_0" / "best.pt"
    before = best.stat().st_mtime_ns
    assert main([*argv, "--fold-val-fraction", "0"]) == 0
    assert best.stat().st_mtime_ns == before  # finished folds kept
    assert (old / "fold_2" / "eval" / "metrics.json").exists()


def test_evaluate_without_data_scores_a_fold_on_its_test_images(cv_runs, tmp_path):
    fold = cv_runs / "multihead" / "fold_1"
    assert main(["evaluate", str(fold), "--out", str(tmp_path / "ev"), "--no-progress"]) == 0
    tested = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()[1:]
    split = (fold / "split.csv").read_text().splitlines()[1:]
    assert ({line.split(",")[0] for line in tested}
            == {line.split(",")[0] for line in split if line.endswith(",test")})


def test_cv_resumes_without_retraining_finished_folds(cv_runs, data):
    best = cv_runs / "flat" / "fold_1" / "best.pt"
    before = best.stat().st_mtime_ns
    # with more threads and workers: how fast it runs, not what it computes
    assert main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", "flat",
                 "--out", str(cv_runs / "flat"), *TINY, "--threads", "2", "--workers",
                 "1"]) == 0
    assert best.stat().st_mtime_ns == before


def test_cv_refuses_other_options_in_the_same_folder(cv_runs, data, capsys):
    code = main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", "flat",
                 "--lr", "0.5", "--out", str(cv_runs / "flat"), *TINY])
    assert code == 2
    assert "other options" in capsys.readouterr().err


def test_compare_writes_tables_3_and_4_with_paired_tests(cv_runs, tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(cv_runs / "flat"), str(cv_runs / "multihead"),
                 str(cv_runs / "per-node"), "--out", str(out), "--bootstrap", "200"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["models"] == ["flat/test_resnet", "multihead/test_resnet",
                                "per-node/test_resnet"]
    for model in result["models"]:
        t3 = result["table3"][model]
        assert set(t3) == {"all_leaves", "root", "Leukemia", "Acute", "Chronic"}
        lo, hi = t3["all_leaves"]["ci95"]
        assert lo <= t3["all_leaves"]["accuracy"] <= hi
        assert set(result["table4"][model]) <= set(load_taxonomy("leukemia7").leaves)
    assert [t["model"] for t in result["paired_tests"]] == result["models"][1:]
    assert result["notes"] == []  # same data and seed: the same folds
    # the one-standard-error choice over the folds' accuracies, the folders simplest first
    pick = result["one_se"]
    assert pick["metric"] == "accuracy" and pick["chosen"] in result["models"]
    means = {m: float(np.mean([f["accuracy"] for f in json.loads(
        (cv_runs / m.split("/")[0] / "summary.json").read_text())["folds"]]))
        for m in result["models"]}
    assert pick["means"] == pytest.approx(means)
    assert pick["chosen"] == next(m for m in result["models"] if means[m] >= pick["bound"])
    assert "One-standard-error choice" in (out / "comparison.md").read_text()
    assert main(["compare", str(cv_runs / "flat"), "--out", str(tmp_path / "c2"),
                 "--select-by", "nope"]) != 0
    md = (out / "comparison.md").read_text()
    assert "Table 3" in md and "Table 4" in md and "Paired tests" in md


def test_bootstrap_ci_and_mean_std_by_hand():
    assert bootstrap_ci(np.ones(10, bool), np.arange(10)) == (1.0, 1.0)
    lo, hi = bootstrap_ci(np.array([1, 0] * 50, bool), np.arange(100) // 2, n_boot=500)
    # every patient has one right and one wrong cell: every resample gives exactly 0.5
    assert lo == hi == 0.5
    assert mean_std([0.5, 0.7]) == pytest.approx({"mean": 0.6, "std": np.std([0.5, 0.7],
                                                                               ddof=1)})


def test_a_cv_folder_is_evaluated_as_its_folds_averaged(cv_runs, data, tmp_path):
    assert main(["evaluate", str(cv_runs / "multihead"), str(data), "--out",
                 str(tmp_path / "ev"), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 7 * 3 * 4
    # calibrated folds: the averaged model flags cells; no single model's raw ECE
    assert "ood" in metrics and "uncalibrated" not in metrics["calibration"]


def test_a_folds_conformal_coverage_enters_the_summary():
    metrics = {"accuracy": 0.5, "conformal": {"coverage": 0.92, "leaf_share": 0.8,
                                              "mean_depth": 2.5, "per_class": {}}}
    scalars = fold_scalars(metrics)
    assert (scalars["conformal_coverage"], scalars["conformal_leaf_share"],
            scalars["conformal_mean_depth"]) == (0.92, 0.8, 2.5)
    assert "conformal_coverage" not in fold_scalars({"accuracy": 0.5})


def test_pooled_out_of_fold_calls_give_the_observed_miss_rate():
    from leukotree.evaluation.cv import pooled_patient_metrics
    from leukotree.report.tables import cv_document

    # 4 APL (one called negative at its fold's threshold, one referred), 2 AML (one referred)
    calls = {"a1": ("APL", "AML", "negative", 0.1), "a2": ("APL", "APL", "positive", 0.9),
             "a3": ("APL", "AML", "referred", 0.4), "a4": ("APL", "APL", "positive", 0.8),
             "m1": ("AML", "AML", "negative", 0.05), "m2": ("AML", "AML", "referred", 0.3)}
    patients = {p: {"truth": t, "decision": d, "call": c, "p_APL": s, "p_AML": 1 - s}
                for p, (t, d, c, s) in calls.items()}
    last = {"patient_level": {"patient_positive": "APL",
                              "miss_rate": {"alpha": 0.3, "confidence": 0.8}}}
    pooled = pooled_patient_metrics(patients, last)
    block = pooled["miss_rate"]
    assert (block["n_positive"], block["missed"], block["referred"]) == (4, 1, 2)
    assert block["observed_miss_rate"] == 0.25 and block["referred_share"] == pytest.approx(1 / 3)
    assert (block["alpha"], block["confidence"]) == (0.3, 0.8)
    summary = {"model": "m", "patient_model": "mean", "folds": [{}], "mean": {},
               "patient_level": [pooled]}
    assert pooled["fn"] == 2  # the referred APL patient is not diagnosed APL either
    text = cv_document([summary]).to_markdown()
    assert "observed miss rate" in text and "| m repeat 1 | 4 | 1 | 0.2500 |" in text


def test_the_miss_rate_is_pooled_over_the_folds_that_state_one():
    from leukotree.evaluation.cv import pooled_patient_metrics

    # a1, m1: a fold that states the promise; a2, a3: a fold whose training patients could
    # not (no call), as a held-out cluster of APL patients leaves
    calls = {"a1": ("APL", "negative", 0.1), "m1": ("AML", "negative", 0.2),
             "a2": ("APL", None, 0.3), "a3": ("APL", None, 0.2)}
    patients = {p: {"truth": t, "decision": "AML", "p_APL": s, "p_AML": 1 - s}
                | ({"call": c} if c else {}) for p, (t, c, s) in calls.items()}
    last = {"patient_level": {"patient_positive": "APL"}}  # the last fold states none
    promise = {"alpha": 0.3, "confidence": 0.8}
    block = pooled_patient_metrics(patients, last, promise)["miss_rate"]
    assert (block["n_patients"], block["n_positive"], block["missed"]) == (2, 1, 1)
    assert block["patients_without_promise"] == 2
    assert "miss_rate" not in pooled_patient_metrics(patients, last)


def test_a_fold_that_cannot_state_the_miss_rate_trains_without_it(tmp_path):
    from leukotree.data.discover import Sample
    from leukotree.engine.config import resolve_config
    from leukotree.engine.trainer import Trainer
    from leukotree.errors import LeukotreeError

    apl = [Sample(tmp_path / f"{k}.png", "APL", patient=f"p{k}") for k in range(4)]
    overrides = {"patient_model": "mean", "patient_miss_rate": 0.1, "taxonomy": "aml-apl"}
    trainer = Trainer(tmp_path, tmp_path / "run", resolve_config(
        preset="tiny-test", overrides=overrides | {"fold": 1}))
    trainer._check_miss_rate_support(load_taxonomy("aml-apl"), apl)
    assert trainer._miss_rate is None  # 4 APL patients support 43.8%, not 10%
    single = Trainer(tmp_path, tmp_path / "run2", resolve_config(
        preset="tiny-test", overrides=overrides))
    with pytest.raises(LeukotreeError, match="4 APL patient"):
        single._check_miss_rate_support(load_taxonomy("aml-apl"), apl)


@pytest.fixture(scope="module")
def two_protocols(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv-protocols") / "cv"
    assert main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--protocol",
                 "kfold,cluster", "--out", str(out), *TINY]) == 0
    return out


def _test_groups(fold_dir) -> set[str]:
    lines = (fold_dir / "split.csv").read_text().splitlines()
    col = lines[0].split(",").index("group")
    return {line.split(",")[col] for line in lines[1:] if line.endswith(",test")}


def test_kfold_and_cluster_estimates_side_by_side(two_protocols):
    import csv

    summary = json.loads((two_protocols / "summary.json").read_text())
    est = summary["estimates"]
    assert set(est["protocols"]) == {"kfold", "cluster"}
    kfold, cluster = est["protocols"]["kfold"], est["protocols"]["cluster"]
    assert kfold["accuracy"] == summary["patient_level"][0]["accuracy"]
    worst = "cluster" if cluster["accuracy"] <= kfold["accuracy"] else "kfold"
    assert est["pessimistic"] == worst and est["by"] == "accuracy"  # 7 leaves: no AUROC
    assert "protocol" not in summary  # the plain k-fold summary keeps its keys
    inner = json.loads((two_protocols / "cluster" / "summary.json").read_text())
    assert inner["protocol"] == "cluster" and inner["patient_level"][0]["accuracy"] == (
        cluster["accuracy"])
    assert "Estimates: plain k-fold beside" in (two_protocols / "summary.md").read_text()
    # the clusters are the folds: each fold's test patients are one cluster of folds.csv
    rows = list(csv.DictReader((two_protocols / "cluster" / "folds.csv").open()))
    assert {"group", "fold", "cluster", "mean_L"} <= set(rows[0])
    for k in range(3):
        assert _test_groups(two_protocols / "cluster" / f"fold_{k}") == {
            r["group"] for r in rows if r["fold"] == str(k)}
    # and k-fold lists its folds' test patients, each patient once
    rows = list(csv.DictReader((two_protocols / "folds.csv").open()))
    assert len({r["group"] for r in rows}) == len(rows) == 21
    for k in range(3):
        assert _test_groups(two_protocols / f"fold_{k}") == {
            r["group"] for r in rows if r["fold"] == str(k)}


def test_protocols_are_refused_before_training(data, tmp_path, capsys):
    for protocol, message in (("kfold,repeated", "'protocol' parameter"),
                              ("loo", "'protocol' parameter"),
                              ("repeated", "--repeats of at least 2")):
        assert main(["cv", str(data), "-t", "leukemia7", "--protocol", protocol,
                     "--out", str(tmp_path / "x"), *TINY]) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_repeat_spread_and_estimates_by_hand():
    pooled = [{"auroc": 0.8, "accuracy": 0.7, "n_patients": 10, "auroc_ci95": (0.6, 0.9)},
              {"auroc": 0.6, "accuracy": 0.5, "n_patients": 10},
              {"auroc": 0.7, "accuracy": 0.9, "n_patients": 10}]
    spread = repeat_spread(pooled)
    assert spread["auroc"] == pytest.approx({"mean": 0.7, "std": 0.1, "min": 0.6, "max": 0.8,
                                             "n": 3})
    assert spread["accuracy"]["std"] == pytest.approx(0.2)
    est = compare_estimates({"repeated": {"patient_level": pooled},
                             "cluster": {"patient_level": [{"auroc": 0.65, "accuracy": 0.8,
                                                            "n_patients": 10}]}})
    assert est["protocols"]["repeated"]["auroc"] == pytest.approx(0.7)
    assert est["protocols"]["repeated"]["auroc_ci95"] == (0.6, 0.9)  # the first repeat's
    assert est["pessimistic"] == "cluster" and est["by"] == "auroc"
    assert parse_protocols(" kfold , cluster") == ["kfold", "cluster"]


def test_cv_colour_swap_rescores_the_folds_without_training(cv_runs, data, tmp_path, capsys):
    out = tmp_path / "cv"
    shutil.copytree(cv_runs / "multihead", out)
    before = (out / "fold_0" / "last.pt").stat().st_mtime
    assert main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", "multihead",
                 "--protocol", "kfold,colour-swap,stain-swap", "--out", str(out),
                 *TINY]) == 0
    assert (out / "fold_0" / "last.pt").stat().st_mtime == before  # nothing retrained
    summary = json.loads((out / "summary.json").read_text())
    inner = json.loads((out / "colour-swap" / "summary.json").read_text())
    assert inner["protocol"] == "colour-swap" and [f["fold"] for f in inner["folds"]] == [
        0, 1, 2]
    assert inner["patient_level"][0]["n_patients"] == summary["patient_level"][0][
        "n_patients"] == 21
    assert inner["p_change"]["n"] == 21 and inner["colour_only"]["n_patients"] == 21
    assert set(summary["estimates"]["protocols"]) == {"kfold", "colour-swap", "stain-swap"}
    stain = json.loads((out / "stain-swap" / "summary.json").read_text())
    assert (inner["colour_features"], stain["colour_features"]) == ("stats", "parts")
    assert stain["p_change"]["n"] == 21
    # each feature set read once, beside the folds, for every protocol that moves it
    assert "dark_b" in (out / "colour_parts.csv").read_text().splitlines()[0]
    assert "std_b" in (out / "colour_stats.csv").read_text().splitlines()[0]
    assert not list(out.glob("*/colour_*.csv"))
    # each fold's recoloured test images are its test images, one copy each
    split = list(csv.DictReader((out / "fold_1" / "split.csv").open()))
    part = "test" if any(r["split"] == "test" for r in split) else "val"
    test = [r for r in split if r["split"] == part]
    rows = list(csv.DictReader((out / "colour-swap" / "fold_1" / "manifest.csv").open()))
    assert [(r["label"], r["patient"]) for r in rows] == [(r["label"], r["patient"])
                                                          for r in test]
    capsys.readouterr()
    assert main(["cv", str(data), "-t", "leukemia7", "--folds", "3", "--head", "multihead",
                 "--protocol", "kfold,colour-swap", "--out", str(out), *TINY]) == 0
    assert "colour-swap, fold 1 (repeat 1): already evaluated, kept" in capsys.readouterr().err
