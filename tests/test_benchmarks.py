"""The benchmark scripts run end to end on tiny settings and print the JSON they promise.

These check the scripts' plumbing, never their timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from leukotree.errors import LeukotreeError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout[result.stdout.index("{\n"):])


def test_train_speed_bench_reports_every_ratio():
    report = _run("bench_train_speed.py", "--models", "test_resnet", "--sizes", "32",
                  "--batch", "4", "--rounds", "1", "--threads", "1", "--matmul-n", "256")
    assert report["matmul_gflop_per_s"] > 0
    (row,) = report["results"]
    assert set(row["images_per_s"]) == {
        "engine_multihead_channels_last", "engine_multihead_contiguous",
        "engine_flat_channels_last", "plain_channels_last", "plain_contiguous"}
    assert row["engine_vs_plain"] > 0 and row["fraction_of_ceiling"] > 0
    assert row["train_gflop_per_image"] > 0


def test_predict_bench_compares_the_paths_and_names_the_default(synth_dir):
    report = _run("bench_predict.py", "--data", str(synth_dir), "--n", "16", "--model",
                  "test_resnet", "--size", "32", "--batch", "8", "--no-compile")
    assert report["images"] == 16
    for path in ("eager", "channels_last", "onnxruntime"):
        assert report[path]["end_to_end"] > 0 and report[path]["model_only"] > 0
    assert report["default"] == "onnxruntime"
    assert report["fastest_end_to_end"] in {"eager", "channels_last", "onnxruntime"}


def test_cv_heads_bench_runs_every_head_on_the_same_folds(synth_dir, tmp_path):
    report = _run("bench_cv_heads.py", str(synth_dir), "--taxonomy", "leukemia7", "--out",
                  str(tmp_path / "cv"), "--heads", "flat", "multihead", "--folds", "2",
                  "--epochs", "1", "--img-size", "32", "--model", "test_resnet",
                  "--threads", "1")
    assert set(report["heads"]) == {"flat", "multihead"}
    assert all(len(h["fold_accuracy"]) == 2 for h in report["heads"].values())
    assert report["paired_tests"][0]["reference"] == "flat/test_resnet"
    assert (tmp_path / "cv" / "comparison" / "comparison.md").exists()


def test_serve_bench_loses_no_cell_under_concurrent_cases():
    report = _run("bench_serve.py", "--cells", "5", "--cases", "2", "--concurrent", "3",
                  "--backbone", "test_resnet", "--size", "32")
    assert report["sequential"]["n"] == 2 and report["sequential"]["cases_per_minute"] > 0
    assert report["health_while_busy"]["n"] >= 1
    conc = report["concurrent"]
    assert conc["finished"] == 3 and conc["failed_cases"] == 0 and conc["lost_cells"] == 0


def test_cross_lab_bench_runs_on_stand_in_labs(tmp_path):
    import csv

    from leukotree.data.synth import generate
    from leukotree.taxonomy import load_taxonomy

    generate(tmp_path / "pbc", load_taxonomy("pbc"), patients_per_class=1,
             cells_per_patient=10, size=32, seed=1, progress=False)
    generate(tmp_path / "jhh" / "cells", load_taxonomy("pbc"), patients_per_class=2,
             cells_per_patient=6, size=40, seed=2, progress=False)
    types = {"neutrophil": "segmented-neutrophils", "ig": "promyelocyte",
             "platelet": "giant-thrombocyte", "eosinophil": "eosinophils"}
    rows = [{"path": str(p.relative_to(tmp_path / "jhh")), "label": "AML",
             "patient": f"P{k % 4}", "cell_type": types.get(p.parts[-3], p.parts[-3])}
            for k, p in enumerate(sorted((tmp_path / "jhh" / "cells").rglob("*.png")))]
    rows[0]["cell_type"] = "smudge-cells"  # a type the model never saw
    with (tmp_path / "jhh" / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = _run("bench_cross_lab.py", "--out", str(tmp_path / "out"), "--pbc",
                  str(tmp_path / "pbc"), "--jhh", str(tmp_path / "jhh"), "--preset",
                  "tiny-test", "--set", "epochs=1", "--set", "val_fraction=0.3",
                  "--labelled-per-class", "5")
    assert report["in_lab_pbc_test"]["n"] == 8 * 2  # 20% of 10 per class held out
    low, high = report["cross_lab_jhh"]["accuracy_ci"]
    assert 0 <= low <= report["cross_lab_jhh"]["accuracy"] <= high <= 1
    assert report["cross_lab_jhh"]["n"] == len(rows) - 1
    assert report["cross_lab_jhh_adapted"]["n"] == len(rows) - 1
    assert report["unseen_types"]["smudge-cells"]["n"] == 1
    assert 0 <= report["ood_auroc_unseen_vs_known_jhh"] <= 1
    assert 0 < report["labelled_cells"] <= 5 * 8 and report["heldout_patients"] == 2
    tuned = report["cross_lab_jhh_heldout_trained_fine_tuned"]
    assert tuned["n"] == report["cross_lab_jhh_heldout_trained"]["n"] > 0
    assert report["cross_lab_jhh_heldout_trained_fine_tuned_no_replay"]["n"] == tuned["n"]
    # the fine-tunes are also scored on the held-out PBC cells (what they forgot)
    assert (report["in_lab_pbc_test_fine_tuned"]["n"]
            == report["in_lab_pbc_test_fine_tuned_no_replay"]["n"] == 8 * 2)
    with open(tmp_path / "out" / "fine-tuned" / "split.csv") as handle:
        replayed = sum(r["path"].startswith(str(tmp_path / "pbc")) for r in csv.DictReader(handle))
    assert replayed > 0  # the PBC training images were replayed
    assert (tmp_path / "out" / "cross_lab.md").read_text().count("|") > 20


def test_startup_bench_times_each_command_and_finds_no_heavy_import(tmp_path):
    out = tmp_path / "startup.json"
    report = _run("bench_startup.py", "--runs", "1", "--only=--help", "--only", "taxonomy pbc",
                  "--json", str(out))
    doc = json.loads(out.read_text())
    assert doc["results"] == report and doc["benchmark"] == "startup"
    assert doc["meta"]["machine"]["cores"] >= 1 and doc["meta"]["versions"]["python"]
    rows = {r["command"]: r for r in report["commands"]}
    assert set(rows) == {"leukotree --help", "leukotree taxonomy pbc"}
    for row in rows.values():
        assert row["heavy"] == "none" and row["modules"] > 50 and row["median_s"] > 0
        assert 0 < row["cpu_median_s"] < 60
    assert rows["leukotree --help"]["goal_s"] == 0.5


def test_demo_bench_writes_its_results_file(tmp_path):
    results = tmp_path / "demo.json"
    report = _run("bench_demo.py", "--out", str(tmp_path / "demo"), "--folds", "2",
                  "--epochs", "1", "--img-size", "16", "--json", str(results))
    assert report["images"] == 320 and len(report["folds"]) == 2
    assert sum(f["n_images"] for f in report["folds"]) == 320  # every image tested once
    doc = json.loads(results.read_text(encoding="utf-8"))
    assert doc["benchmark"] == "demo" and doc["results"] == report
    assert doc["meta"]["command"].startswith("python benchmarks/bench_demo.py --out ")
    assert {"date", "commit", "machine", "versions"} <= set(doc["meta"])
    # a folder that is not new is refused: the figures never mix two runs
    failed = subprocess.run([sys.executable, str(BENCH / "bench_demo.py"), "--out",
                             str(tmp_path / "demo")], capture_output=True, text=True)
    assert failed.returncode != 0 and "choose a new folder" in failed.stderr


def test_guarantees_bench_measures_coverage_before_and_after_calibrate(tmp_path):
    import csv

    from leukotree.cli import main
    from leukotree.data.synth import generate
    from leukotree.taxonomy import load_taxonomy

    generate(tmp_path / "pbc", load_taxonomy("pbc"), patients_per_class=1,
             cells_per_patient=10, size=32, seed=1, progress=False)
    generate(tmp_path / "jhh" / "cells", load_taxonomy("pbc"), patients_per_class=2,
             cells_per_patient=6, size=40, seed=2, progress=False)
    generate(tmp_path / "apl", load_taxonomy("aml-apl"), patients_per_class=6,
             cells_per_patient=4, size=32, seed=3, progress=False)
    rows = [{"path": str(p.relative_to(tmp_path / "jhh")),
             "label": "APL" if k % 2 else "AML", "patient": f"P{k % 6}",
             "cell_type": {"neutrophil": "segmented-neutrophils"}.get(p.parts[-3], p.parts[-3])}
            for k, p in enumerate(sorted((tmp_path / "jhh" / "cells").rglob("*.png")))]
    with (tmp_path / "jhh" / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # a real (tiny) patient CV whose patient model promises a miss rate
    assert main(["cv", str(tmp_path / "apl"), "-t", "aml-apl", "--folds", "2", "--preset",
                 "tiny-test", "--epochs", "1", "--threads", "1", "--no-progress",
                 "--patient-model", "mean", "--positive", "APL", "--patient-miss-rate", "0.5",
                 "--confidence", "0.5", "--fold-val-fraction", "0",
                 "--out", str(tmp_path / "cv")]) == 0
    report = _run("bench_guarantees.py", "--out", str(tmp_path / "out"), "--pbc",
                  str(tmp_path / "pbc"), "--jhh", str(tmp_path / "jhh"), "--preset",
                  "tiny-test", "--set", "epochs=1", "--set", "val_fraction=0.3",
                  "--coverage", "0.8", "--sizes", "20", "--draws", "2",
                  "--cv", str(tmp_path / "cv"))
    pbc = report["pbc_heldout"]
    assert pbc["n"] == 8 * 2 and pbc["target_coverage"] == pytest.approx(0.8)
    assert pbc["coverage_ci95"][0] <= pbc["coverage"] <= pbc["coverage_ci95"][1]
    assert 0 <= pbc["leaf_share"] <= 1
    tested = report["jhh_before"]["n"]
    assert 0 < tested < len(rows)  # the other half of the patients only
    after = report["jhh_after"]["20"]
    assert len(after["draws"]) == 2 and all(d["n"] == tested for d in after["draws"])
    assert all(d["fitted_on"] == 20 for d in after["draws"])  # the 20 cells re-fitted it
    assert after["coverage_min"] <= after["coverage_mean"] <= after["coverage_max"]
    apl = report["apl"]
    (pooled,) = apl["repeats"]
    assert pooled["alpha"] == 0.5 and pooled["n_positive"] == 6
    assert apl["cohort_positive_patients"] == 3  # the stand-in manifest's APL patients
    assert apl["achievable_miss_rate_cohort"] == pytest.approx(1 - 0.5 ** (1 / 3))
    assert "| PBC held out (same lab) | 16 |" in (tmp_path / "out" / "guarantees.md").read_text()


def test_lab_loop_bench_gates_each_round_and_never_trains_on_audit_cells(tmp_path):
    import csv

    from leukotree.data.synth import generate
    from leukotree.taxonomy import load_taxonomy

    generate(tmp_path / "pbc", load_taxonomy("pbc"), patients_per_class=1,
             cells_per_patient=10, size=32, seed=1, progress=False)
    generate(tmp_path / "jhh" / "cells", load_taxonomy("pbc"), patients_per_class=2,
             cells_per_patient=6, size=40, seed=2, progress=False)
    # three cells in four are neutrophils, as in a blood smear: the fine-tune's stratified
    # validation split needs a class with 5 cells among the 8 trained on in round 1
    rows = [{"path": str(p.relative_to(tmp_path / "jhh")), "label": "AML",
             "patient": f"P{k % 4}",
             "cell_type": "segmented-neutrophils" if k % 4 != 3 else {
                 "neutrophil": "band-neutrophils", "ig": "myelocyte",
                 "platelet": "giant-thrombocyte",
                 "eosinophil": "eosinophils"}.get(p.parts[-3], p.parts[-3])}
            for k, p in enumerate(sorted((tmp_path / "jhh" / "cells").rglob("*.png")))]
    with (tmp_path / "jhh" / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    args = ["--out", str(out), "--pbc", str(tmp_path / "pbc"), "--jhh", str(tmp_path / "jhh"),
            "--preset", "tiny-test", "--set", "epochs=1", "--set", "val_fraction=0.3",
            "--rounds", "2", "--per-round", "10", "--epochs", "1", "--poison-round", "2",
            "--min-audit", "3", "--tolerance", "1", "--json", str(tmp_path / "lab_loop.json")]
    report = _run("bench_lab_loop.py", *args)
    assert set(report["policies"]) == {"active", "random"}
    with (out / "jhh-pool-unlabelled.csv").open(newline="") as handle:
        pool = list(csv.DictReader(handle))
    assert "label" not in pool[0] and report["pool_cells"] == len(pool) == 48
    for policy, rounds in report["policies"].items():
        assert [r["round"] for r in rounds] == [1, 2]
        seen: set[str] = set()
        for r in rounds:
            assert r["n_new"] == 10 and r["n_new_audit"] == 2  # round(0.2 * 10)
            assert r["n_reviewed"] == 10 * r["round"] == r["n_audit"] + r["n_train"]
            assert r["n_audit"] == 2 * r["round"]
            gate = r["gate"]
            assert gate["figures"]["n_audit"] == r["n_audit"]  # all audit cells so far
            assert r["promoted"] == gate["passed"]
            # round 1: 2 audit cells, fewer than --min-audit 3: no candidate is trained
            assert (r["candidate"] is None) == (r["round"] == 1) == bool(gate.get("skipped"))
            assert r["active"] == (r["candidate"] if r["promoted"] else r["parent"])
            assert not r["calibrated"]  # fewer than 20 audit cells
            assert r["jhh_test"]["n"] == len(rows) - len(pool)
            low, high = r["jhh_test"]["accuracy_ci"]
            assert 0 <= low <= r["jhh_test"]["accuracy"] <= high <= 1
            assert r["pbc_test"]["n"] == 8 * 2
            folder = out / policy / f"round-{r['round']}"
            with (folder / "audit.csv").open(newline="") as handle:
                audit = {Path(a["path"]).resolve() for a in csv.DictReader(handle)}
            assert len(audit) == r["n_audit"]
            runs = (["candidate"] if r["candidate"] else []) + (
                ["poisoned-candidate"] if "poisoned" in r else [])
            for run in runs:  # the candidate's training cells, replayed images included
                with (folder / run / "split.csv").open(newline="") as handle:
                    trained = {Path(t["path"]).resolve() for t in csv.DictReader(handle)}
                assert not trained & audit and trained & {Path(p["path"]).resolve()
                                                           for p in pool}
            with (folder / "train.csv").open(newline="") as handle:
                train_cells = {Path(t["path"]).resolve() for t in csv.DictReader(handle)}
            assert len(train_cells) == r["n_train"] and not train_cells & audit
            assert seen <= train_cells | audit  # the earlier rounds' cells are kept...
            seen = train_cells | audit
            assert len(seen) == r["n_reviewed"]  # ...and no cell is reviewed twice
    # with 4 audit cells in round 2 and any forgetting allowed, candidates pass: promoted
    assert any(r["promoted"] for rs in report["policies"].values() for r in rs)
    assert "only 2 reviewed audit cells" in report["policies"]["random"][0]["gate"]["message"]
    (poisoned,) = [r for r in report["policies"]["active"] if "poisoned" in r]
    assert poisoned["round"] == 2
    assert "random" not in {p for p, rs in report["policies"].items()
                            for r in rs if "poisoned" in r}
    assert poisoned["poisoned"]["refused"] == (not poisoned["poisoned"]["gate"]["passed"])
    assert poisoned["poisoned"]["gate"]["figures"]["n_audit"] == 4
    assert poisoned["active"] != poisoned["poisoned"]["candidate"]  # never made active
    assert report["goals"]["poisoned_refused"] == poisoned["poisoned"]["refused"]
    table = (out / "lab_loop.md").read_text()
    assert "| source model | 0 |" in table and "Poisoned candidate" in table
    assert "no candidate: too few audit cells" in table
    assert (out / "lab_loop.png").stat().st_size > 1000
    doc = json.loads((tmp_path / "lab_loop.json").read_text())
    assert doc["benchmark"] == "lab_loop" and doc["results"] == report
    # resumable: the rounds are read back, not redone
    stamp = (out / "active" / "round-1" / "round.json").stat().st_mtime
    again = _run("bench_lab_loop.py", *args, "--rounds", "1")
    assert again["policies"]["active"] == report["policies"]["active"][:1]
    assert (out / "active" / "round-1" / "round.json").stat().st_mtime == stamp


def test_patient_models_bench_compares_protocols_and_chooses_by_one_standard_error(tmp_path):
    import csv
    import random
    import shutil

    from leukotree.cli import main
    from leukotree.data.synth import generate
    from leukotree.taxonomy import load_taxonomy

    sys.path.insert(0, str(BENCH))
    from resultfile import patient_model_rows, patient_models_table

    generate(tmp_path / "data", load_taxonomy("aml-apl"), patients_per_class=6,
             cells_per_patient=5, size=32, seed=0, progress=False)
    rng = random.Random(0)
    rows = [{"path": str(p), "label": p.parent.parent.name, "patient": p.parent.name,
             "cell_type": rng.choice(["blast", "promyelocyte", "lymphocyte"])}
            for p in sorted((tmp_path / "data").rglob("*.png"))]
    with (tmp_path / "m.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cv = tmp_path / "cv"
    assert main(["cv", str(tmp_path / "m.csv"), "--out", str(cv), "--folds", "3",
                 "-t", "aml-apl", "--cell-taxonomy",
                 "jhh-cells", "--cell-labels", "column:cell_type", "--patient-model", "mean",
                 "--patient-threshold", "0.5", "--fold-val-fraction", "0", "--preset",
                 "tiny-test", "--epochs", "1", "--monitor", "last", "--threads", "1",
                 "--no-progress"]) == 0
    # the same folds stand for a second protocol (the script reads the protocol's name only)
    shutil.copytree(cv, tmp_path / "cluster")
    summary = json.loads((tmp_path / "cluster" / "summary.json").read_text())
    (tmp_path / "cluster" / "summary.json").write_text(json.dumps(summary | {
        "protocol": "cluster"}))
    report = _run("bench_patient_models.py", str(cv), str(tmp_path / "cluster"), "--stacked",
                  "--models", "mean", "cell-mix", "--workers", "0",
                  "--json", str(tmp_path / "pm.json"))
    assert set(report["protocols"]) == {"kfold", "cluster"}
    sel = report["selection"]
    assert sel["by"] == "cluster"
    assert sel["order"] == ["mean", "mean, stacked", "cell-mix", "cell-mix, stacked"]
    models = report["protocols"]["cluster"]["models"]
    assert models["mean"]["patients"] == 12 and models["cell-mix, stacked"]["patients"] == 12
    best = max(sel["order"], key=lambda c: models[c]["auroc"])
    bound = models[best]["auroc"] - models[best]["auroc_se"]
    # the simplest candidate within one standard error of the best
    assert sel["chosen"] == next(c for c in sel["order"] if models[c]["auroc"] >= bound - 1e-12)
    table = patient_models_table(report)
    assert f"**{sel['chosen']}**" in table and "kfold AUROC [95% CI]" in table
    kfold, cluster = patient_model_rows(report)  # the README's rows: the chosen model
    assert f"(`{sel['chosen']}`)" in kfold[0] and "pessimistic protocol" in cluster[0]
    assert "patient-grouped 3-fold CV" in kfold[0]  # the folds the CV had
    assert "leave-cluster-out CV (3 clusters of patients" in cluster[0]
    assert cluster[1].startswith(f"AUROC {models[sel['chosen']]['auroc']:.3f} [")
    assert json.loads((tmp_path / "pm.json").read_text())["results"] == report


def test_colour_shift_bench_rescores_each_recipe_on_recoloured_patients(tmp_path):
    from leukotree.data.synth import generate
    from leukotree.errors import LeukotreeError
    from leukotree.taxonomy import load_taxonomy

    sys.path.insert(0, str(BENCH))
    from bench_colour_shift import parse_recipe
    from resultfile import colour_shift_rows, colour_shift_table

    assert parse_recipe("as-is") == ("as-is", {})
    assert parse_recipe("w:stain_norm=white, lr=0.001") == ("w", {"stain_norm": "white",
                                                                  "lr": 0.001})
    with pytest.raises(LeukotreeError, match="KEY=VALUE"):
        parse_recipe("w:stain_norm")
    generate(tmp_path / "data", load_taxonomy("aml-apl"), patients_per_class=3,
             cells_per_patient=4, size=32, seed=0, progress=False)
    config = tmp_path / "recipe.yaml"
    config.write_text("taxonomy: aml-apl\nmodel: test_resnet\nimg_size: 32\nepochs: 1\n"
                      "batch_size: 16\nthreads: 1\nworkers: 1\npatient_threshold: 0.5\n")
    report = _run("bench_colour_shift.py", str(tmp_path / "data"), "--config", str(config),
                  "--recipe", "white:stain_norm=white", "--folds", "2",
                  "--out", str(tmp_path / "out"), "--json", str(tmp_path / "cs.json"))
    row = report["recipes"]["white"]
    assert row["options"] == {"stain_norm": "white"}
    for protocol in ("kfold", "colour", "colour-swap", "stain", "stain-swap"):
        assert row[protocol]["n_patients"] == 6
    assert row["colour"]["p_change"]["n"] == 6 and report["colour_only"]["n_patients"] == 6
    assert report["stain_only"]["n_patients"] == 6
    assert (tmp_path / "out" / "white" / "stain-swap" / "summary.json").exists()
    table = colour_shift_table(report)
    assert "| white | stain_norm=white | `stain-swap`: nuclei and plasma" in table
    assert "colours of nuclei and plasma alone" in table
    (readme_row,) = colour_shift_rows(report)  # the README's row
    assert "with `stain_norm: white`" in readme_row[0]
    assert readme_row[0].endswith("with the other diagnosis's nuclei and plasma colours")
    assert readme_row[1].count("→") == 3
    assert readme_row[1].startswith(f"{row['kfold']['auroc']:.3f} → {row['colour']['auroc']:.3f}")
    assert json.loads((tmp_path / "cs.json").read_text())["results"] == report
    # a second recipe joins the same file; the first is kept with who measured it
    both = _run("bench_colour_shift.py", str(tmp_path / "data"), "--config", str(config),
                "--recipe", "as-is", "--folds", "2", "--out", str(tmp_path / "out"),
                "--json", str(tmp_path / "cs.json"))
    assert list(both["recipes"]) == ["white", "as-is"]
    assert both["recipes"]["white"]["kfold"] == row["kfold"]
    assert both["recipes"]["white"]["measured"]["command"].endswith("cs.json")
    assert "measured" not in both["recipes"]["as-is"]
    assert "Recipe `white` was measured earlier" in colour_shift_table(both)
    white_row, as_is_row = colour_shift_rows(both)[:2]
    day = both["recipes"]["white"]["measured"]["date"][:10]
    assert f"`stain_norm: white` (measured {day})" in white_row[0]  # a kept row is dated
    assert "recipe as it is" in as_is_row[0]
    done = subprocess.run([sys.executable, str(BENCH / "bench_colour_shift.py"),
                           str(tmp_path / "data"), "--config", str(config), "--recipe", "as-is",
                           "--folds", "3", "--out", str(tmp_path / "out3"),
                           "--json", str(tmp_path / "cs.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and "measured with folds 2" in done.stderr


def test_colour_shift_bench_measures_the_colours_of_cells_without_the_disease(tmp_path):
    from PIL import Image

    from leukotree.engine.config import resolve_config

    sys.path.insert(0, str(BENCH))
    from bench_colour_shift import batch_colours
    from resultfile import colour_shift_rows, colour_shift_table

    rng = np.random.default_rng(0)
    rows = ["path,label,patient,cell_type"]
    for p in range(8):
        label = "APL" if p % 2 else "AML"
        for c, cell in enumerate(("lymphocyte", "lymphocyte", "blast", "smudge-cells")):
            img = np.full((24, 24, 3), 220, np.int16)
            img[8:16, 8:16] = (90, 60, 140)  # a nucleus
            img[8:16, 8:16, 2] += 25 if label == "AML" else 0  # AML slides: bluer nuclei
            img += rng.integers(-3, 4, img.shape, dtype=np.int16)
            path = tmp_path / f"P{p}_{c}.png"
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
            rows.append(f"{path},{label},P{p},{cell}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "recipe.yaml"
    config.write_text("taxonomy: aml-apl\ncell_taxonomy: jhh-cells\ncell_labels: "
                      "column:cell_type\npatients: manifest\nmodel: test_resnet\nworkers: 1\n")
    batch = batch_colours(tmp_path / "m.csv", resolve_config(config_file=config),
                          "lymphoid,smudge-cell")
    assert batch["none"]["n_images"] == 24 and batch["none"]["n_patients"] == 8
    assert batch["none"]["separability"]["auroc"] == pytest.approx(1.0)
    assert batch["reinhard"]["by_label"]["AML"]["dark_b"] < batch["reinhard"]["by_label"][
        "APL"]["dark_b"]  # bluer nuclei, also after a per-image normalisation
    estimate = {"n_patients": 8, "auroc": 0.9, "auroc_ci95": [0.8, 1.0], "accuracy": 0.75}
    r = {"folds": 2, "recipes": {"as-is": {"options": {}, "kfold": estimate}},
         "batch": batch}
    assert "(lymphoid, smudge-cell; 24 images)" in colour_shift_table(r)
    assert colour_shift_rows(r)[-1][1] == (
        f"AUROC {batch['none']['separability']['auroc']:.3f} → "
        f"{batch['reinhard']['separability']['auroc']:.3f}")
    no_cells = tmp_path / "plain.yaml"
    no_cells.write_text("taxonomy: aml-apl\npatients: manifest\nmodel: test_resnet\n")
    with pytest.raises(LeukotreeError, match="--batch-cells needs a recipe with"):
        batch_colours(tmp_path / "m.csv", resolve_config(config_file=no_cells), "lymphoid")
