"""``leukotree select`` on a tiny trained run: the queue file, the audit share, each file
once, exclusion of cells already reviewed, and the errors (the library's rules are in
test_select.py)."""

import csv

import pytest

from leukotree.cli import main
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    generate(root / "data", load_taxonomy("leukemia7"), patients_per_class=2,
             cells_per_patient=3, size=32, seed=4, progress=False)
    train(root / "data", root / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "val_fraction": 0.3}), progress=False)
    return root


def _rows(path):
    return list(csv.DictReader(path.open()))


def test_select_writes_n_rows_with_reasons_and_an_audit_share(run, tmp_path, capsys):
    out = tmp_path / "queue.csv"
    assert main(["select", str(run / "run"), str(run / "data"), "--n", "10", "--out",
                 str(out), "--no-progress", "--engine", "torch"]) == 0
    rows = _rows(out)
    assert list(rows[0])[:3] == ["path", "reason", "audit"]
    assert len(rows) == 10 and len({r["path"] for r in rows}) == 10
    assert sum(r["audit"] == "True" for r in rows) == 2  # 20% of 10
    assert all(r["reason"] == "audit (random)" for r in rows if r["audit"] == "True")
    assert all(r["reason"] and r["reason"] != "audit (random)" for r in rows
               if r["audit"] == "False")
    assert all(r["patient"] for r in rows)  # patients from the folders
    assert "chose 10 of 42 cell(s) (2 audit cells" in capsys.readouterr().err
    again = tmp_path / "again.csv"
    main(["select", str(run / "run"), str(run / "data"), "--n", "10", "--out", str(again),
          "--no-progress", "--engine", "torch"])
    assert _rows(again) == rows  # deterministic for a seed


def test_select_never_chooses_excluded_cells_again(run, tmp_path):
    first = tmp_path / "q1.csv"
    main(["select", str(run / "run"), str(run / "data"), "--n", "30", "--out", str(first),
          "--no-progress", "--engine", "torch", "--policy", "random"])
    second = tmp_path / "q2.csv"
    assert main(["select", str(run / "run"), str(run / "data"), "--n", "12", "--out",
                 str(second), "--exclude", str(first), "--no-progress",
                 "--engine", "torch"]) == 0
    assert {r["path"] for r in _rows(first)}.isdisjoint(r["path"] for r in _rows(second))


def test_select_errors_are_clear(run, tmp_path, capsys):
    out = tmp_path / "q.csv"
    base = ["select", str(run / "run"), str(run / "data" / "ALL"), "--out", str(out),
            "--no-progress", "--engine", "torch"]
    assert main([*base, "--n", "7"]) == 2
    assert "--n 7 is more than the 6 cell(s)" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main([*base, "--n", "0"])
    assert "--n: must be in [1, inf]; got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--n", "2", "--audit-share", "1"])
    assert "must be in [0, 1); got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--n", "2", "--policy", "smart"])
    assert "invalid choice: 'smart'" in capsys.readouterr().err
    assert main([*base, "--n", "2", "--exclude", str(tmp_path / "none.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
