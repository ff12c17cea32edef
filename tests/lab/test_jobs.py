"""Training jobs: the manifest, the command line, progress, and a job interrupted after
its training that a restart scores, gates and (auto-)promotes."""

import csv
import shutil
import sys

from test_versions import database

from leukotree.lab.gate import GateRule
from leukotree.lab.jobs import SCHEMA as JOBS
from leukotree.lab.jobs import (
    Lab,
    LabCell,
    LabSettings,
    epochs_done,
    export_manifest,
    train_command,
)
from leukotree.lab.select import audit_flag
from leukotree.lab.versions import SCHEMA as VERSIONS
from leukotree.rundir import RunDir


def test_the_manifest_holds_the_reviewed_cells(tmp_path):
    cells = [LabCell("c1", 0, tmp_path / "a.png", "AML", "P1", 3),
             LabCell("c1", 2, tmp_path / "b.png", "CLL", "P1", 8, "lymphocyte")]
    path = export_manifest(cells, tmp_path / "job" / "cells.csv")
    rows = list(csv.DictReader(path.open()))
    assert rows == [{"path": str(tmp_path / "a.png"), "label": "AML", "patient": "P1",
                     "cell_type": ""},
                    {"path": str(tmp_path / "b.png"), "label": "CLL", "patient": "P1",
                     "cell_type": "lymphocyte"}]


def test_the_lab_splits_cells_by_their_stored_audit_flag_only(tmp_path):
    # the flag comes with the cell (the store decided it once); the lab never re-decides
    # it: stored flags opposite to what the hash rule says now are still obeyed
    rule = [audit_flag(f"c1:{k}") for k in range(20)]
    assert any(rule) and not all(rule)
    cells = [LabCell("c1", k, tmp_path / f"{k}.png", "AML", "P1", k, audit=not rule[k])
             for k in range(20)]
    lab = Lab(database(tmp_path / "db.sqlite3"), tmp_path / "lab", lambda: cells,
              lambda version: None)
    train, audit = lab.split_cells()
    assert [c.index for c in train] == [k for k in range(20) if rule[k]]
    assert [c.index for c in audit] == [k for k in range(20) if not rule[k]]


def test_the_command_fine_tunes_the_parent_replaying_the_source(tmp_path):
    settings = LabSettings(epochs=3, lr=1e-3, threads=2)
    command = train_command(tmp_path / "cells.csv", tmp_path / "run", tmp_path / "v2",
                            tmp_path / "v1", settings, cell_labels=True)
    assert command[:4] == [sys.executable, "-m", "leukotree", "train"]
    assert command[command.index("--init") + 1] == str(tmp_path / "v2")
    assert command[command.index("--replay") + 1] == str(tmp_path / "v1")
    assert command[command.index("--config") + 1] == str(tmp_path / "v2" / "config.yaml")
    assert command[command.index("--epochs") + 1] == "3"
    assert command[command.index("--cell-labels") + 1] == "column:cell_type"
    assert command[command.index("--threads") + 1] == "2"
    resume = train_command(tmp_path / "cells.csv", tmp_path / "run", tmp_path / "v2",
                           tmp_path / "v1", settings, resume=True)
    assert resume[-1] == "--resume" and "--init" not in resume  # the run keeps its options


def test_progress_counts_the_rows_of_the_history(tmp_path):
    assert epochs_done(tmp_path) == 0
    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.5\n2,0.4\n")
    assert epochs_done(tmp_path) == 2


def test_a_job_stopped_after_training_is_scored_and_promoted_on_restart(served_run, tmp_path):
    connect = database(tmp_path / "db.sqlite3")
    with connect() as db:
        db.executescript(VERSIONS + JOBS)
    paths = sorted((served_run / "data").rglob("*.png"))
    cells = [LabCell("case", k, p, p.parent.parent.name, "P1", k + 1, audit=k % 4 == 0)
             for k, p in enumerate(paths)]
    swapped = []
    settings = LabSettings(epochs=1, min_reviews=4, auto_promote=True,
                           gate=GateRule(alpha=1e-12, tolerance=1.0, min_audit=1))
    lab = Lab(connect, tmp_path / "lab", lambda: cells, swapped.append, settings)
    lab.versions.ensure_initial(served_run / "run")
    train = [c for c in cells if c.index % 4]
    job = lab.jobs.create(1, tmp_path / "lab" / "jobs", [c.review for c in train], len(train), 1)
    folder = tmp_path / "lab" / "jobs" / job
    export_manifest(train, folder / "cells.csv")
    shutil.copytree(served_run / "run", folder / "run")  # its training had finished
    lab.jobs.update(job, status="running", attempts=1)  # ...when the server stopped

    lab.start(served_run / "run")
    lab.futures[job].result(timeout=120)
    lab.shutdown()
    row = lab.jobs.get(job)
    assert (row["status"], row["model"], row["attempts"]) == ("done", 2, 2), row["error"]
    version = lab.versions.get(2)
    assert version.state == "active" and version.parent == 1 and version.forced_by is None
    assert version.audit["n"] == len(cells) - len(train)
    assert version.gate["passed"] and version.gate["against"] == 1
    assert version.source["n"] == len(RunDir(served_run / "run").read_split("val")) > 0
    assert [v.id for v in swapped] == [2] and swapped[0].run.endswith("calibrated")
    assert version.calibration["done"] and lab.versions.get(1).state == "retired"

