"""Learning in the background: reviewed cells make a candidate model, which is scored,
gated and, when asked (or with ``--auto-promote``), promoted.

A training job (:meth:`Lab.start_training`):

1. writes the reviewed **non-audit** cells (by the flag the store decided once per
   cell, :attr:`LabCell.audit`; images from the store, labels from the reviews) as a
   manifest ``JOB/cells.csv``; the review ids are recorded with the job;
2. fine-tunes the active model on them in a separate process,
   ``python -m leukotree train JOB/cells.csv --out JOB/run --config ACTIVE/config.yaml
   --init ACTIVE --replay SOURCE ...`` (:func:`train_command`), replaying the source
   run's training images (``SOURCE``: version 1's run) so that it does not forget them;
   the epochs done are read from the run's ``history.csv`` as it grows;
3. adds the run as a ``candidate`` version and scores it and the active model on the
   reviewed **audit** cells and on the source run's validation images; the gate
   (:mod:`leukotree.lab.gate`) is applied and its decision stored.

Everything is in the database and the job folder, so a restart loses nothing: a job
that was queued or running is run again, resuming the training run where its
``last.pt`` left it (``train --resume``), or going straight to scoring when the run was
finished. A job that fails keeps its reason; a new one can be started.

A promotion (:meth:`Lab.promote`) re-applies the gate on the audit cells reviewed by
then (unless forced: recorded with who forced it), re-fits the candidate's
temperatures, out-of-distribution threshold and conformal answers on the audit cells
(:func:`leukotree.calibrate.run.calibrate_run`, when there are enough of them), and
hands the re-calibrated run to the server, which swaps the model new cases use.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from leukotree.errors import LeukotreeError
from leukotree.lab.gate import GateResult, GateRule, decide
from leukotree.lab.versions import Connect, LabConflict, LabNotFound, Version, Versions
from leukotree.rundir import RunDir

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    parent INTEGER NOT NULL, folder TEXT NOT NULL, reviews TEXT NOT NULL, n_cells INTEGER,
    epochs_done INTEGER NOT NULL DEFAULT 0, epochs INTEGER NOT NULL, attempts INTEGER NOT
    NULL DEFAULT 0, model INTEGER, error TEXT);
"""

JOB_STATES = ("queued", "running", "done", "failed")


class TooFewReviews(LeukotreeError):
    """Too few reviewed non-audit cells to train on (HTTP 422, with the number needed)."""


@dataclass(frozen=True)
class LabCell:
    """A reviewed cell of the store: where its image is, its label, the review, and
    whether it is an audit cell (the flag the store decided once when the cell was
    stored: never trained on, the lab's test set)."""

    case: str
    index: int
    path: Path
    label: str
    patient: str
    review: int
    cell_type: str = ""
    audit: bool = False


@dataclass(frozen=True)
class LabSettings:
    """How the lab trains and gates. ``epochs``, ``lr``: the fine-tune's (as the cross-lab
    benchmark's: a few epochs at 5e-4, the last epoch kept); ``min_reviews``: the reviewed
    non-audit cells a training needs; ``engine``: how both models are scored;
    ``auto_promote``: promote when the gate passes; ``threads``: the training process's
    CPU threads (0: the run's own setting)."""

    epochs: int = 5
    lr: float = 5e-4
    min_reviews: int = 20
    gate: GateRule = field(default_factory=GateRule)
    engine: str = "torch"
    auto_promote: bool = False
    threads: int = 0


def export_manifest(cells: Sequence[LabCell], path: Path) -> Path:
    """The cells as a training manifest ``path,label,patient,cell_type``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "patient", "cell_type"])
        writer.writeheader()
        writer.writerows({"path": str(c.path), "label": c.label, "patient": c.patient,
                          "cell_type": c.cell_type} for c in cells)
    return path


def train_command(manifest: Path, out: Path, parent_run: str | Path, source_run: str | Path,
                  settings: LabSettings, *, resume: bool = False,
                  cell_labels: bool = False) -> list[str]:
    """The ``leukotree train`` command line of a job: the parent's options, started from
    its weights, the source run's training images replayed; split by image (a lab's
    reviews have a few cells per patient), the last epoch kept. ``resume``: continue the
    interrupted run (its options are saved in it)."""
    command = [sys.executable, "-m", "leukotree", "train", str(manifest), "--out", str(out),
               "--no-progress"]
    if resume:
        return [*command, "--resume"]
    command += ["--config", str(RunDir(parent_run).config), "--init", str(parent_run),
                "--replay", str(source_run), "--epochs", str(settings.epochs),
                "--lr", str(settings.lr), "--warmup-epochs", "0.5", "--patients", "none",
                "--labels", "folder", "--balance", "none", "--monitor", "last",
                "--val-fraction", "0.2"]
    if cell_labels:
        command += ["--cell-labels", "column:cell_type"]
    if settings.threads:
        command += ["--threads", str(settings.threads)]
    return command


def epochs_done(run: Path) -> int:
    """Rows of the run's ``history.csv`` (one per finished epoch; 0 before the first)."""
    history = RunDir(run).history
    try:
        with history.open(newline="", encoding="utf-8") as handle:
            return sum(1 for _ in csv.DictReader(handle))
    except (OSError, csv.Error):
        return 0


class Jobs:
    """The ``jobs`` table, through ``connect``."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def create(self, parent: int, folder: Path, reviews: list[int], n_cells: int,
               epochs: int, job: str | None = None) -> str:
        """A queued job whose files are ``folder/<id>`` (``job``: its id, else a new one)."""
        job = job or self.new_id()
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT INTO jobs (id, status, created, updated, parent, folder, reviews, "
                       "n_cells, epochs) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                       (job, now, now, parent, str(folder / job), json.dumps(reviews), n_cells,
                        epochs))
        return job

    def get(self, job: str) -> dict[str, Any]:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job,)).fetchone()
        if row is None:
            raise LabNotFound(f"No training job '{job}'.")
        return dict(row) | {"reviews": json.loads(row["reviews"])}

    def all(self) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs ORDER BY created DESC").fetchall()
        return [self.get(r["id"]) for r in rows]

    def pending(self) -> list[str]:
        """Jobs a restart must run again (queued, or interrupted while running)."""
        with self._connect() as db:
            rows = db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'running') "
                              "ORDER BY created").fetchall()
        return [r["id"] for r in rows]

    def update(self, job: str, **values: Any) -> None:
        allowed = {"status", "epochs_done", "attempts", "model", "error"}
        if set(values) - allowed:
            raise ValueError(set(values) - allowed)
        if values.get("status", "queued") not in JOB_STATES:
            raise ValueError(values["status"])
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {sets}, updated = ? WHERE id = ?",
                       (*values.values(), time.time(), job))

    @staticmethod
    def to_json(row: dict[str, Any]) -> dict[str, Any]:
        """``GET /api/jobs/{id}``."""
        return {"id": row["id"], "status": row["status"], "model": row["model"],
                "parent": row["parent"], "error": row["error"], "created": row["created"],
                "updated": row["updated"], "n_cells": row["n_cells"],
                "attempts": row["attempts"],
                "progress": {"epochs_done": row["epochs_done"], "epochs": row["epochs"]}}


class Lab:
    """The lab loop of one store: versions, training jobs in a background thread (the
    training itself in a child process), the gate and promotions.

    ``cells()`` lists the store's reviewed cells, each with its stored audit flag
    (:attr:`LabCell.audit`; the lab never decides it again); ``swap(version)`` makes
    the server classify new cases with ``version.run`` (it must load the model before
    returning, so that a model that cannot be loaded is never marked active);
    ``view(predictor, run)`` is how served images are decoded for that model (None: its
    own)."""

    def __init__(self, connect: Connect, folder: Path, cells: Callable[[], list[LabCell]],
                 swap: Callable[[Version], None], settings: LabSettings | None = None,
                 view: Callable[[Any, str], Any] | None = None) -> None:
        self.versions, self.jobs = Versions(connect), Jobs(connect)
        self.folder = Path(folder)
        self.cells, self.swap, self.view = cells, swap, view
        self.settings = settings or LabSettings()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukotree-lab")
        self._stop = threading.Event()
        self._promoting, self._starting = threading.Lock(), threading.Lock()
        self.futures: dict[str, Future] = {}

    # ----------------------------------------------------------------- lifecycle
    def start(self, first_run: str | Path) -> Version:
        """Version 1 is ``first_run`` (on first start); the active version is served
        (swapped in when it is not version 1); interrupted jobs run again."""
        self.versions.ensure_initial(first_run)
        active = self.versions.active()
        if active.id != 1:
            self.swap(active)
        for job in self.jobs.pending():
            self.jobs.update(job, status="queued")
            self._submit(job)
        return active

    def shutdown(self) -> None:
        """Stop: a training process is ended and its job stays ``running``, so that the
        next start resumes it."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, job: str) -> None:
        self.futures[job] = self._pool.submit(self._run, job)

    # ----------------------------------------------------------------- cells
    def split_cells(self) -> tuple[list[LabCell], list[LabCell]]:
        """The reviewed cells: ``(training, audit)`` by their stored flag
        (:attr:`LabCell.audit`)."""
        train, audit = [], []
        for cell in self.cells():
            (audit if cell.audit else train).append(cell)
        return train, audit

    # ----------------------------------------------------------------- training
    def start_training(self) -> str:
        """Queue a training job on the reviewed non-audit cells; refused while another
        job runs (:class:`LabConflict`) or with too few cells (:class:`LeukotreeError`,
        with the number needed)."""
        source = Path(self.versions.get(1).run)
        if not RunDir(source).is_run:
            raise LeukotreeError(f"The lab trains from a run folder, but the server's first "
                                 f"model is '{source}'. Serve the run folder it came from.")
        with self._starting:
            busy = self.jobs.pending()
            if busy:
                raise LabConflict(f"Training job {busy[0]} is still running; wait for it "
                                  f"(GET /api/jobs/{busy[0]}).")
            train, _ = self.split_cells()
            need = self.settings.min_reviews
            if len(train) < need:
                raise TooFewReviews(
                    f"Training needs at least {need} reviewed cells that are not audit "
                    f"cells; the store has {len(train)}. Review {need - len(train)} more "
                    "(audit cells are kept apart to test the new model and never count).")
            parent = self.versions.active()
            job = self.jobs.new_id()  # its cells are written before the job exists
            export_manifest(train, self.folder / "jobs" / job / "cells.csv")
            self.jobs.create(parent.id, self.folder / "jobs", [c.review for c in train],
                             len(train), self.settings.epochs, job)
            self._submit(job)
            return job

    def _run(self, job: str) -> None:
        try:
            row = self.jobs.get(job)
            self.jobs.update(job, status="running", attempts=row["attempts"] + 1, error=None)
            run = Path(row["folder"]) / "run"
            if not RunDir(run).summary.is_file():
                self._train(row, run)
            if self._stop.is_set():
                return
            version = (self.versions.get(row["model"]) if row["model"] is not None else
                       self.versions.add_candidate(row["parent"], run, row["reviews"], job))
            self.jobs.update(job, model=version.id)
            gate = self.evaluate(version.id)
            self.jobs.update(job, status="done")
            if self.settings.auto_promote and gate.passed:
                try:
                    self.promote(version.id, checked=True)
                except LeukotreeError as err:  # the candidate stays; a reviewer decides
                    self.jobs.update(job, error=f"The automatic promotion failed: {err}")
        except Exception as err:  # the job fails with its reason; the server goes on
            if self._stop.is_set():
                return  # interrupted by the shutdown: resumed on the next start
            message = str(err) if isinstance(err, LeukotreeError) else \
                f"{type(err).__name__}: {err}"
            self.jobs.update(job, status="failed", error=message)

    def _train(self, row: dict[str, Any], run: Path) -> None:
        """Run (or resume) the training process, recording its epochs as they finish."""
        folder = Path(row["folder"])
        resume = RunDir(run).last.is_file()
        if not resume and run.exists():
            shutil.rmtree(run)  # stopped before its first epoch: start it afresh
        parent = self.versions.get(row["parent"])
        cell_labels = bool(_saved_option(parent.run, "cell_labels"))
        command = train_command(folder / "cells.csv", run, parent.run, self.versions.get(1).run,
                                self.settings, resume=resume, cell_labels=cell_labels)
        log = folder / "train.log"
        with log.open("a", encoding="utf-8") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT,
                                       env=os.environ.copy())
            done = 0
            try:
                while process.poll() is None:
                    if self._stop.wait(0.5):
                        process.terminate()
                        process.wait(30)
                        return
                    if epochs_done(run) != done:
                        done = epochs_done(run)
                        self.jobs.update(row["id"], epochs_done=done)
            finally:
                if process.poll() is None:
                    process.kill()
        self.jobs.update(row["id"], epochs_done=epochs_done(run))
        if process.returncode != 0:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
            raise LeukotreeError(f"The training process ended with exit code "
                                 f"{process.returncode}: {' / '.join(tail)} (log: {log}).")

    # ----------------------------------------------------------------- scoring and gate
    def _predictor(self, run: str) -> Any:
        from leukotree.inference.loader import load

        return load(run).predictor(self.settings.engine)

    def evaluate(self, candidate: int) -> GateResult:
        """Score the candidate and the active model on the reviewed audit cells and on the
        source run's validation images; store both models' figures and the gate's
        decision on the candidate."""
        from leukotree.lab.scoring import score, source_validation

        active = self.versions.active()
        _, audit = self.split_cells()
        paths, labels = [c.path for c in audit], [c.label for c in audit]
        val_paths, val_labels = source_validation(self.versions.get(1).run)
        scored = {}
        for version in (active, self.versions.get(candidate)):
            predictor = self._predictor(version.run)
            config = self.view(predictor, version.run) if self.view else None
            on_audit = score(predictor, paths, labels, config=config)
            on_source = score(predictor, val_paths, val_labels)
            scored[version.id] = (on_audit, on_source)
            self.versions.set_figures(version.id, audit=on_audit.figures,
                                      source=on_source.figures)
        (a_audit, a_source), (c_audit, c_source) = scored[active.id], scored[candidate]
        if len(a_audit.correct) != len(c_audit.correct):
            raise LeukotreeError("The two models could not read the same audit cells.")
        gate = decide(a_audit.correct, c_audit.correct, a_source.figures["accuracy"],
                      c_source.figures["accuracy"], self.settings.gate)
        self.versions.set_figures(candidate, gate=gate.to_dict() | {"against": active.id,
                                                                     "at": time.time()})
        return gate

    def promote(self, version: int, forced_by: str | None = None, *,
                checked: bool = False) -> Version:
        """Promote a candidate: the gate on the audit cells reviewed by now (skipped when
        ``forced_by`` names who forced it, or ``checked``: it has just passed), a
        calibration on the audit cells, the swap; refused with the gate's rule and
        numbers (:class:`LabConflict`)."""
        with self._promoting:
            candidate = self.versions.get(version)
            if candidate.state != "candidate":
                raise LabConflict(f"Model version {version} is {candidate.state}; only a "
                                  "candidate can be promoted.")
            if forced_by is None and not checked:
                gate = self.evaluate(version)
                if not gate.passed:
                    raise LabConflict(gate.message)
            _, audit = self.split_cells()
            run, calibration = self._calibrated(candidate, audit)
            self.swap(replace(candidate, run=run))
            return self.versions.promote(version, run, forced_by, calibration)

    def _calibrated(self, candidate: Version, audit: list[LabCell],
                    ) -> tuple[str, dict[str, Any]]:
        """The candidate's run re-calibrated on the audit cells (a new folder beside it),
        or its own run with the reason when there are too few of them."""
        from leukotree.calibrate.run import calibrate_run
        from leukotree.models.calibration import MIN_IMAGES

        trained = candidate.trained_run or candidate.run
        if len(audit) < MIN_IMAGES:
            return trained, {"done": False, "reason": (
                f"{len(audit)} reviewed audit cells, calibration needs {MIN_IMAGES}: the "
                "run's own temperatures, out-of-distribution threshold and conformal "
                "answers are kept")}
        out = Path(trained).parent / "calibrated"
        shutil.rmtree(out, ignore_errors=True)  # a promotion that stopped half-way
        manifest = export_manifest(audit, Path(trained).parent / "audit-cells.csv")
        report = calibrate_run(trained, manifest, out, patients="none", progress=False)
        return str(out), {"done": True, "n": len(audit), "report": _plain(report)}


def _saved_option(run: str | Path, key: str) -> Any:
    """An option saved in a run's ``config.yaml`` (None when absent)."""
    from leukotree.engine.config import load_config

    path = RunDir(run).config
    if not path.is_file():
        return None
    return getattr(load_config(path, check_device=False), key, None)


def _plain(value: Any) -> Any:
    """``value`` made JSON-safe (numbers, strings, lists and dicts of them)."""
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError, sqlite3.Error):
        return str(value)
