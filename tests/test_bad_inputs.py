"""A corpus of bad inputs, made at test time, one test per family (see the docs page
docs/guide/bad-input.md): every case ends in a clear message that names the file or the
option, the documented exit code, no traceback, no partial output and no markup that
user text could turn into script."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest
import torch

from conftest import html_tags
from leukotree.cli import main
from leukotree.data.discover import find_images
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.rundir import RunDir
from leukotree.taxonomy import Taxonomy, load_taxonomy

TAX = load_taxonomy("leukemia7")
EVIL_CLASS = "<img src=x onerror=alert(1)>"
EVIL_PATIENT = "<script>alert(2)</script>"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and output (stderr, then stdout) of one command; parse-time refusals exit
    as argparse does."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    text = captured.err + captured.out
    assert "Traceback" not in text
    return code, " ".join(text.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-data") / "data"
    generate(root, TAX, patients_per_class=3, cells_per_patient=2, size=32, seed=4,
             progress=False)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("bad-run") / "run"
    train(data, out, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "val_fraction": 0.34, "threads": 1}), progress=False)
    return out


# ----------------------------------------------------------------- script injection
def assert_no_live_markup(page: Path) -> None:
    tags = html_tags(page.read_text(encoding="utf-8"))
    assert "script" not in {t for t, _ in tags}, page
    for tag, attrs in tags:
        assert not any(k.startswith("on") for k in attrs), (page, tag, attrs)
        if tag == "img":  # only our embedded figures and cells
            assert (attrs.get("src") or "").startswith("data:image/png;base64,"), page


def test_class_names_patient_ids_and_paths_never_become_script(tmp_path, capsys):
    tax = tmp_path / "evil.yaml"
    tax.write_text(f'name: evil\ntree:\n  "{EVIL_CLASS}":\n  plain:\n', encoding="utf-8")
    folder = tmp_path / "<i onmouseover=alert(3)>"
    generate(folder, Taxonomy.from_yaml(tax), patients_per_class=4, cells_per_patient=2,
             size=32, seed=1, progress=False)
    rows = [{"path": str(p), "label": p.parent.parent.name,
             "patient": f"{EVIL_PATIENT}{p.parent.name}"}
            for p in sorted(folder.rglob("*.png"))]
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    common = ["-t", tax, "--preset", "tiny-test", "--epochs", "1", "--no-progress",
              "--threads", "1"]
    assert run_cli(capsys, "train", manifest, "--out", tmp_path / "run",
                   "--val-fraction", "0.34", *common)[0] == 0
    assert run_cli(capsys, "evaluate", tmp_path / "run", manifest, "--out",
                   tmp_path / "eval", "--no-progress")[0] == 0
    assert run_cli(capsys, "cv", manifest, "--out", tmp_path / "cv", "--folds", "2",
                   "--fold-val-fraction", "0", *common)[0] == 0
    assert run_cli(capsys, "report", tmp_path / "run", folder / EVIL_CLASS, "--patient",
                   EVIL_PATIENT, "--out", tmp_path / "r.html", "--no-progress")[0] == 0
    pages = sorted(tmp_path.rglob("*.html"))
    assert len(pages) >= 5  # evaluate, cv summary, 2 fold reports, patient report
    for page in pages:
        assert_no_live_markup(page)
    assert "&lt;script&gt;" in (tmp_path / "r.html").read_text()


# ----------------------------------------------------------------- wrong results, exit 0
def test_impossible_numbers_stop_before_any_output(run, data, tmp_path, capsys):
    code, err = run_cli(capsys, "predict", run, data, "--batch-size", "-5", "--out",
                        tmp_path / "p.csv")
    assert code == 2 and "--batch-size" in err and "[1, inf]" in err
    assert not (tmp_path / "p.csv").exists()
    code, err = run_cli(capsys, "train", data, "--out", tmp_path / "r", "--lr", "inf")
    assert code == 2 and "--lr" in err and "(0, 10]" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,flag,rule", [
    (["train", "d", "--out", "o", "--patience", "-1"], "--patience", "[0, 100000]"),
    (["train", "d", "--out", "o", "--focal-gamma", "-2"], "--focal-gamma", "[0, 10]"),
    (["train", "d", "--out", "o", "--weight-decay", "-0.1"], "--weight-decay", "[0, 10]"),
    (["train", "d", "--out", "o", "--warmup-epochs", "-1"], "--warmup-epochs", "[0, 100000]"),
    (["train", "d", "--out", "o", "--val-fraction", "0.7"], "--val-fraction", "[0, 0.5)"),
    (["evaluate", "r", "--out", "o", "--threshold", "1.5"], "--threshold", "[0, 1]"),
    (["evaluate", "r", "--out", "o", "--batch-size", "0"], "--batch-size", "[1, inf]"),
    (["report", "r", "x", "--out", "o", "--top-cells", "-1"], "--top-cells", "[0, 1000]"),
    (["report", "r", "x", "--out", "o", "--min-cells", "0"], "--min-cells", "[1, inf]"),
    (["predict", "r", "x", "--target-error", "0"], "--target-error", "(0, 1]"),
    (["data", "split", "d", "-t", "pbc", "--out", "o", "--val", "0.6"], "--val", "[0, 0.5)"),
    (["cv", "d", "--out", "o", "--folds", "1"], "--folds", "[2, inf]"),
    (["export", "r", "--onnx", "o", "--opset", "99"], "--opset", "[13, 23]"),
])
def test_every_numeric_option_states_its_rule(capsys, argv, flag, rule):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and flag in err and rule in err


# ----------------------------------------------------------------- console markup
def test_file_names_that_look_like_markup_print_as_they_are(run, tmp_path, capsys):
    folder = tmp_path / "cells"
    folder.mkdir()
    (folder / "[bold red]cell.png").write_bytes(b"not a png")
    (folder / "[link=x]notes.txt").write_text("x")
    code, err = run_cli(capsys, "predict", run, folder, "--out", tmp_path / "p.csv",
                        "--no-progress")
    assert code == 1  # nothing could be read
    assert "[bold red]cell.png" in err and "[link=x]notes.txt" in err
    code, err = run_cli(capsys, "data", "check", tmp_path / "nope[/]", "-t", "leukemia7")
    assert code == 2 and "nope[/]" in err


def test_install_hints_keep_the_extra_in_brackets(run, data, tmp_path, capsys, monkeypatch):
    import leukotree.inference.explain as explain

    def missing(module: str, *, extra: str, purpose: str):
        from leukotree.errors import MissingDependencyError
        from leukotree.optional import install_hint

        raise MissingDependencyError(f"{purpose} needs '{module}': {install_hint(extra)}.")

    monkeypatch.setattr(explain, "require", missing)
    cell = next((data / "ALL").rglob("*.png"))
    code, err = run_cli(capsys, "explain", run, cell, "--out", tmp_path / "maps")
    assert code == 2 and "pip install 'leukotree[explain]'" in err


# ----------------------------------------------------------------- run folders
def test_a_folder_that_is_not_a_run_is_never_overwritten(data, tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.docx").write_bytes(b"precious")
    code, err = run_cli(capsys, "train", data, "--out", mine, "--preset", "tiny-test")
    assert code == 2 and "chapter1.docx" in err and "not a leukotree run" in err
    assert sorted(p.name for p in mine.iterdir()) == ["chapter1.docx"]
    code, err = run_cli(capsys, "train", data, "--out", data / "run", "--preset", "tiny-test")
    assert code == 2 and "inside the data folder" in err and not (data / "run").exists()


def test_a_file_named_like_a_runs_does_not_make_a_folder_a_run(data, tmp_path, capsys):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: own settings\n")
    for extra in ([], ["--resume"]):
        code, err = run_cli(capsys, "train", data, "--out", mine, "--preset", "tiny-test",
                            *extra)
        assert code == 2 and "config.yaml" in err, err
        assert (mine / "config.yaml").read_text() == "my: own settings\n"
        assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]
    assert not RunDir(mine).is_run


def test_a_run_carries_its_marker_and_a_run_older_than_the_marker_resumes(run, tmp_path,
                                                                           capsys):
    import shutil

    assert RunDir(run).is_run and RunDir(run).marker.is_file()
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    RunDir(old).marker.unlink()  # as written before the marker existed
    assert RunDir(old).is_run  # config.yaml and last.pt, as every older run has
    RunDir(old).last.unlink()
    assert RunDir(old).is_run  # or best.pt alone (an older batch-norm adaptation)
    RunDir(old).marker.write_text('{"format": "something-else"}')
    assert not RunDir(old).is_run


def test_two_trainings_cannot_write_one_run_folder(data, tmp_path, capsys):
    with RunDir(tmp_path / "run").locked():
        code, err = run_cli(capsys, "train", data, "--out", tmp_path / "run", "--preset",
                            "tiny-test")
    assert code == 2 and "is being written by leukotree process" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resume_refuses_changed_options_and_changed_data(data, tmp_path, capsys):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    base = ["train", copy, "--out", tmp_path / "run", "--preset", "tiny-test", "--epochs",
            "2", "--val-fraction", "0.34", "--threads", "1", "--no-progress"]
    assert run_cli(capsys, *base)[0] == 0
    RunDir(tmp_path / "run").last.write_bytes(torch.load(tmp_path / "run" / "last.pt")
                                              and (tmp_path / "run" / "last.pt").read_bytes())
    code, err = run_cli(capsys, "train", copy, "--out", tmp_path / "run", "--resume",
                        "--lr", "0.05", "--epochs", "5")
    assert code == 2 and "lr: 0.003 in the run, 0.05 now" in err and "epochs: 2" in err
    code, err = run_cli(capsys, "train", copy, "--out", tmp_path / "run", "--resume",
                        "--threads", "2", "--no-progress")
    assert code == 0 and "threads: 1 -> 2" in err
    next((copy / "AML").rglob("*.png")).unlink()
    code, err = run_cli(capsys, "train", copy, "--out", tmp_path / "run", "--resume")
    assert code == 2 and "The data changed since the run started" in err


# ----------------------------------------------------------------- silent drops
def test_every_file_given_is_used_or_named(data, tmp_path, capsys, monkeypatch):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "ALL" / "cell.gif").write_bytes(b"GIF89a")
    (copy / "AML" / "cell.webp").write_bytes(b"RIFF")
    (copy / "CLL" / ".hidden.png").write_bytes(b"x")
    (copy / "CML" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    common = ["--preset", "tiny-test", "--epochs", "1", "--val-fraction", "0.34",
              "--threads", "1", "--no-progress"]
    code, err = run_cli(capsys, "train", copy, "--out", tmp_path / "r1", *common)
    assert code == 2 and "gone.png" in err and "--skip-unreadable" in err
    code, err = run_cli(capsys, "train", copy, "--out", tmp_path / "r2", "--skip-unreadable",
                        *common)
    assert code == 0
    for name in ("cell.gif", "cell.webp", ".hidden.png", "gone.png"):
        assert name in err
    run = RunDir(tmp_path / "r2")
    named = {Path(r["file"]).name for r in csv.DictReader(run.not_used.open())}
    assert named == {"cell.gif", "cell.webp", ".hidden.png"}
    assert [Path(r["file"]).name for r in csv.DictReader(run.skipped.open())] == ["gone.png"]
    code, err = run_cli(capsys, "predict", run.path, copy / "CML", copy / "ALL", "--out",
                        tmp_path / "p.csv", "--no-progress")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert code == 3 and "cell.gif" in err
    assert [r["error"] != "" for r in rows if r["path"].endswith("gone.png")] == [True]


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    (tmp_path / "a" / "locked").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = find_images(tmp_path / "a")
    assert [(d.name, why) for d, why in found.unlisted] == [("locked", "Permission denied")]


# ----------------------------------------------------------------- unhandled errors
def test_files_that_are_not_utf8_are_named(run, data, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("path,label\nzelle.png,ALL\n".encode("utf-16"))
    code, err = run_cli(capsys, "data", "check", manifest, "-t", "leukemia7")
    assert code == 2 and "m.csv" in err and "is not UTF-8" in err
    tax = tmp_path / "t.yaml"
    tax.write_bytes("tree:\n  Zelle\xe4:\n  B:\n".encode("latin-1"))
    code, err = run_cli(capsys, "taxonomy", tax)
    assert code == 2 and "t.yaml" in err and "is not UTF-8" in err
    odd = tmp_path / "odd"
    (odd / "ALL").mkdir(parents=True)
    name = os.fsdecode(b"cell-\xff.png")
    (odd / "ALL" / name).write_bytes((next((data / "ALL").rglob("*.png"))).read_bytes())
    code, err = run_cli(capsys, "data", "check", odd, "-t", "leukemia7")
    assert code == 1 and "cell-\\xff.png" in err and "not valid UTF-8" in err
    code, err = run_cli(capsys, "predict", run, odd / "ALL" / name, "--out", tmp_path / "p.csv",
                        "--no-progress")
    assert code == 0 and "cell-\\xff.png" in (tmp_path / "p.csv").read_text()


def test_missing_inputs_and_damaged_models_are_named(run, data, tmp_path, capsys):
    code, err = run_cli(capsys, "predict", run, tmp_path / "absent.csv")
    assert code == 2 and "absent.csv" in err and "does not exist" in err
    payload = torch.load(run / "best.pt", weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("weight"))
    payload["state_dict"][key] = torch.zeros(3, 3)
    torch.save(payload, tmp_path / "damaged.pt")
    code, err = run_cli(capsys, "predict", tmp_path / "damaged.pt", data / "ALL", "--engine",
                        "torch", "--no-progress")
    assert code == 2 and "damaged.pt" in err and "do not fit the model" in err


# ----------------------------------------------------------------- taxonomy files
@pytest.mark.parametrize("text,match", [
    ("tree:\n  A:\n    X:\n    Y:\n  A:\n    Z:\n", "the key 'A' appears twice"),
    ("x: &a [1]\ntree:\n  A: *a\n", "aliases"),
    ("tree:\n" + "".join("  " * (i + 1) + f"n{i}:\n" + "  " * (i + 2) + f"s{i}:\n"
                         for i in range(40)), "deeper than"),
])
def test_taxonomy_files_that_would_mislead_are_refused(tmp_path, capsys, text, match):
    path = tmp_path / "t.yaml"
    path.write_text(text, encoding="utf-8")
    code, err = run_cli(capsys, "taxonomy", path)
    assert code == 2 and match in err and "t.yaml" in err


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i-1}, *a{i-1}, *a{i-1}, *a{i-1}]" for i in range(1, 23)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\ntree: {A: *a22}\n")
    start = time.perf_counter()
    code, err = run_cli(capsys, "taxonomy", tmp_path / "bomb.yaml")
    assert code == 2 and "aliases" in err and time.perf_counter() - start < 5


# ----------------------------------------------------------------- exit codes
def test_exit_codes_of_predict(run, data, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    assert run_cli(capsys, "predict", run, data / "ALL", "--no-progress")[0] == 0
    assert run_cli(capsys, "predict", run, data / "ALL", bad, "--no-progress")[0] == 3
    assert run_cli(capsys, "predict", run, bad, "--no-progress")[0] == 1


# ----------------------------------------------------------------- ONNX cache
def test_onnx_exports_are_verified_and_kept_private(run, data, tmp_path, capsys, monkeypatch):
    import leukotree.inference.export as export

    planted = run / "best.onnx"
    planted.write_bytes(b"not the model")  # a file planted where the export goes
    assert run_cli(capsys, "predict", run, data / "ALL", "--engine", "onnx",
                   "--no-progress")[0] == 0
    assert planted.stat().st_size > 1000  # exported again, the planted file is gone
    monkeypatch.setattr(export.os, "access", lambda *a: False)  # a read-only run folder
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = export.cached_onnx(run)
    assert path.parent == tmp_path / "cache" / "leukotree" / "onnx"
    assert path.parent.stat().st_mode & 0o077 == 0
    assert export._export_source(path) == export.file_sha256(run / "best.pt")


# ----------------------------------------------------------------- found in review
def test_file_system_refusals_are_messages_not_tracebacks(data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = run_cli(capsys, "train", data, "--out", tmp_path / "afile", "--preset",
                        "tiny-test")
    assert code == 2 and "is a file" in err
    code, err = run_cli(capsys, "data", "check", data, "-t", "leukemia7", "--out", tmp_path,
                        "--no-progress")
    assert code == 2 and "cannot write or read" in err and str(tmp_path) in err


def test_yaml_keys_that_are_lists_are_refused(tmp_path, capsys):
    (tmp_path / "t.yaml").write_text("tree:\n  [1, 2]: x\n")
    code, err = run_cli(capsys, "taxonomy", tmp_path / "t.yaml")
    assert code == 2 and "keys must be plain names" in err


def test_manifest_inputs_strip_headers_and_name_empty_rows(run, data, tmp_path, capsys):
    from leukotree.data.discover import collect_inputs
    from leukotree.errors import DataError

    cell = next((data / "ALL").rglob("*.png"))
    (tmp_path / "m.csv").write_text(f" path , patient \n {cell} , P7 \n")
    assert [i.patient for i in collect_inputs([tmp_path / "m.csv"]).images] == ["P7"]
    (tmp_path / "short.csv").write_text("patient,path\nP1\n")
    with pytest.raises(DataError, match=r"short\.csv line 2: the 'path' cell is empty"):
        collect_inputs([tmp_path / "short.csv"])


def test_images_beside_label_folders_are_predicted_too(data, tmp_path):
    import shutil

    from leukotree.data.discover import collect_inputs

    new = tmp_path / "new"
    shutil.copytree(data / "ALL", new / "ALL")
    shutil.copy(next((data / "AML").rglob("*.png")), new / "loose.png")
    (new / ".cache").mkdir()
    (new / ".cache" / "x.png").write_bytes(b"x")
    found = collect_inputs([new], "folder", TAX)
    loose = [i for i in found.images if i.path.name == "loose.png"]
    assert len(loose) == 1 and loose[0].label is None
    assert {i.label for i in found.images} == {"ALL", None}
    assert [p.name for p in found.not_used] == ["x.png"]


def test_explain_resolves_node_lists_and_keeps_same_named_images_apart(run, data, tmp_path,
                                                                     capsys):
    import shutil

    a, b = tmp_path / "p1" / "c.png", tmp_path / "p2" / "c.png"
    for target, source in ((a, "ALL"), (b, "CML")):
        target.parent.mkdir()
        shutil.copy(next((data / source).rglob("*.png")), target)
    code, _ = run_cli(capsys, "explain", run, a, b, "--out", tmp_path / "maps", "--node",
                      "Leukemia, Acute")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "maps").glob("*_levels.png")) == [
        "000_c_levels.png", "001_c_levels.png"]
