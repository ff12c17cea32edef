"""The command line, called in-process through ``leukotree.cli.main``."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

import leukotree
from conftest import truncate_file, write_image
from leukotree.cli import main
from leukotree.taxonomy import load_taxonomy


def flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare on collapsed whitespace."""
    return " ".join(text.split())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def groups_in_two_folds(rows: list[dict[str, str]], column: str = "fold") -> set[str]:
    seen: dict[str, set[str]] = {}
    for row in rows:
        seen.setdefault(row["group"], set()).add(row[column])
    return {g for g, parts in seen.items() if len(parts) > 1}


# ------------------------------------------------------------------ taxonomy
def test_taxonomy_lists_builtins(capsys):
    assert main(["taxonomy"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == ["aml-apl", "cnmc", "jhh-cells", "leukemia7", "pbc", "pbc-fine"]
    assert "7 leaves, depth 3" in out


def test_taxonomy_draws_the_tree(capsys):
    assert main(["taxonomy", "leukemia7"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("root")
    for node in load_taxonomy("leukemia7").nodes:
        assert node in out
    assert "└── CML" in out


def test_taxonomy_as_yaml(capsys):
    assert main(["taxonomy", "pbc", "--yaml"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["root"] == "blood_cell"
    assert doc["tree"]["platelet"] is None


def test_unknown_taxonomy_is_a_clear_error(capsys):
    assert main(["taxonomy", "leukemia8"]) == 2
    captured = capsys.readouterr()
    err = flat(captured.err)
    assert "error:" in err
    assert "Did you mean 'leukemia7'?" in err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_unknown_taxonomy_in_data_check(capsys, synth_dir):
    code = main(["data", "check", str(synth_dir), "-t", "leukemia_7", "--no-progress"])
    assert code == 2
    assert "Did you mean 'leukemia7'" in flat(capsys.readouterr().err)


def test_bad_arguments_exit_with_usage():
    with pytest.raises(SystemExit) as excinfo:
        main(["data", "check"])
    assert excinfo.value.code == 2


# ------------------------------------------------------------------ data check
def test_data_check_json_on_synthetic_data(capsys, synth_dir, tmp_path):
    out_file = tmp_path / "reports" / "check.json"
    code = main(["data", "check", str(synth_dir), "-t", "leukemia7", "--json",
                 "--no-progress", "--out", str(out_file)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] is True
    assert report["n_images"] == 84
    assert report["n_readable"] == 84
    assert report["patient_source"] == "folder"
    assert len(report["per_patient"]) == 21
    # 32 px images are below the default --min-size 64: warnings, not errors
    assert len(report["small_images"]) == 84
    assert json.loads(out_file.read_text()) == report


def test_data_check_strict_fails_on_warnings(capsys, synth_dir):
    args = ["data", "check", str(synth_dir), "-t", "leukemia7", "--no-progress"]
    assert main([*args, "--strict"]) == 1
    assert main([*args, "--strict", "--min-size", "16"]) == 0
    out = flat(capsys.readouterr().out)
    assert "usable" in out


def test_data_check_truncated_image_returns_1(capsys, tmp_path):
    for i in range(4):
        write_image(tmp_path / "ALL" / "P1" / f"{i}.png", "png", size=(70, 70), seed=i)
    truncate_file(write_image(tmp_path / "CLL" / "P2" / "cut.jpg", "jpeg", size=(256, 256)))
    code = main(["data", "check", str(tmp_path), "-t", "leukemia7", "--json", "--no-progress"])
    assert code == 1
    report = json.loads(capsys.readouterr().out)
    assert report["usable"] is False
    assert [Path(r["path"]).name for r in report["unreadable"]] == ["cut.jpg"]


def test_data_check_human_report(capsys, tmp_path):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png", size=(70, 70))
    write_image(tmp_path / "Bogus" / "P1" / "b.png", "png", size=(70, 70))
    code = main(["data", "check", str(tmp_path), "-t", "leukemia7", "--no-progress"])
    assert code == 1
    out = flat(capsys.readouterr().out)
    assert "Bogus" in out
    assert "NOT usable" in out


# ------------------------------------------------------------------ data split
def test_data_split_writes_grouped_folds(capsys, synth_dir, tmp_path):
    out = tmp_path / "f.csv"
    code = main(["data", "split", str(synth_dir), "-t", "leukemia7", "--folds", "3",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    rows = read_csv(out)
    assert len(rows) == 84
    assert set(rows[0]) == {"path", "label", "patient", "slide", "group", "fold"}
    assert {row["fold"] for row in rows} == {"0", "1", "2"}
    assert groups_in_two_folds(rows) == set()
    assert all(row["group"] == f"patient:{row['patient']}" for row in rows)
    assert "wrote" in capsys.readouterr().out


def test_data_split_json_with_test_part_and_filters(capsys, synth_dir, tmp_path):
    out = tmp_path / "split.csv"
    code = main(["data", "split", str(synth_dir), "-t", "leukemia7", "--folds", "2",
                 "--test", "0.34", "--min-images-per-patient", "4", "--drop-duplicates",
                 "exact", "--out", str(out), "--json", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out)
    assert summary["dropped"] is None
    assert set(summary["parts"]) == {"fold 0", "fold 1", "test"}
    rows = read_csv(out)
    assert groups_in_two_folds(rows) == set()
    test_groups = {r["group"] for r in rows if r["fold"] == "-1"}
    assert test_groups and not test_groups & {r["group"] for r in rows if r["fold"] != "-1"}


def test_data_split_single_split(synth_dir, tmp_path):
    out = tmp_path / "s.csv"
    code = main(["data", "split", str(synth_dir), "-t", "leukemia7", "--folds", "0",
                 "--val", "0.2", "--test", "0.2", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = read_csv(out)
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert groups_in_two_folds(rows, "split") == set()


def test_data_split_refuses_data_with_problems(capsys, tmp_path):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png")
    write_image(tmp_path / "Bogus" / "P2" / "b.png", "png")
    code = main(["data", "split", str(tmp_path), "-t", "leukemia7", "--out",
                 str(tmp_path / "x.csv"), "--no-progress"])
    assert code == 2
    assert "Bogus" in flat(capsys.readouterr().err)
    assert not (tmp_path / "x.csv").exists()


def test_data_split_too_many_folds(capsys, synth_dir, tmp_path):
    code = main(["data", "split", str(synth_dir), "-t", "leukemia7", "--folds", "22",
                 "--out", str(tmp_path / "x.csv"), "--no-progress"])
    assert code == 2
    assert "--folds 21 or fewer" in flat(capsys.readouterr().err)


def test_data_split_few_images_per_class_is_a_clear_error(capsys, tmp_path):
    # Regression (fixed): see test_splits.py::test_assign_folds_with_few_images_per_class_...:
    # 6 patients with one image each (3 ALL, 3 CLL) and --folds 5 make
    # StratifiedGroupKFold raise a bare ValueError, which cli.main does not catch:
    # the user gets a traceback instead of "error: ..." and exit code 2.
    for i in range(6):
        label = "ALL" if i < 3 else "CLL"
        write_image(tmp_path / label / f"P{i}" / "a.png", "png", seed=i)
    out = tmp_path / "x.csv"
    code = main(["data", "split", str(tmp_path), "-t", "leukemia7", "--folds", "5",
                 "--out", str(out), "--no-progress"])
    if code == 0:  # a fix may instead produce 5 valid folds
        assert {r["fold"] for r in read_csv(out)} == {"0", "1", "2", "3", "4"}
    else:
        assert code == 2
        assert "error:" in capsys.readouterr().err


# ------------------------------------------------------------------ synth and demo
def test_synth_writes_images(capsys, tmp_path):
    out = tmp_path / "synth"
    code = main(["synth", str(out), "-t", "cnmc", "--patients-per-class", "2",
                 "--cells-per-patient", "3", "--size", "16", "--format", "bmp",
                 "--no-progress"])
    assert code == 0
    files = sorted(out.rglob("*.bmp"))
    assert len(files) == 2 * 2 * 3
    assert {p.parent.parent.name for p in files} == {"all", "hem"}
    assert "wrote 12 images" in capsys.readouterr().out


def test_synth_bad_parameter_is_refused_at_parse_time(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path / "s"), "--size", "4", "--no-progress"])
    assert exc.value.code == 2
    assert "--size: must be in [16, 4096]; got 4" in flat(capsys.readouterr().err)
    assert not (tmp_path / "s").exists()


def test_demo_writes_its_artefacts(capsys, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--no-progress", "--folds", "3", "--epochs", "1",
                 "--img-size", "32"]) == 0
    check = json.loads((out / "check.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert check["usable"] is True
    assert check["taxonomy"] == "pbc"
    assert summary["usable"] is True
    assert summary["images"] == check["n_images"] > 0
    assert summary["folds"] == str(out / "folds.csv")
    rows = read_csv(out / "folds.csv")
    assert len(rows) == check["n_images"]
    assert {r["fold"] for r in rows} == {"0", "1", "2"}
    assert groups_in_two_folds(rows) == set()
    cv = json.loads((out / "cv" / "summary.json").read_text())
    assert [f["fold"] for f in cv["folds"]] == [0, 1, 2]
    assert 0 <= cv["mean"]["accuracy"]["mean"] <= 1
    for k in range(3):
        assert (out / "cv" / f"fold_{k}" / "eval" / "metrics.json").exists()
    assert "| mean ± std |" in (out / "cv" / "summary.md").read_text()
    page = (out / "report.html").read_text()
    assert "Patient demo-sample" in page
    # 12 cells of fold 0's test images: the calibrated fold model leaves out any it flags
    counted = re.search(r"(\d+) cells analysed \(0 unreadable, (\d+) unclassifiable", page)
    assert counted and int(counted[1]) + int(counted[2]) == 12
    test_images = {r["path"] for r in read_csv(out / "cv" / "fold_0" / "split.csv")
                   if r["split"] == "test"}
    assert len(test_images) > 12
    assert "demo finished" in capsys.readouterr().out


# ------------------------------------------------------------------ entry points
def test_version_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "leukotree", "--version"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"leukotree {leukotree.__version__}"


def test_console_script_is_declared():
    scripts = tuple(entry_points(group="console_scripts", name="leukotree"))
    assert [ep.value for ep in scripts] == ["leukotree.cli:main"]
    assert scripts[0].load() is main
