"""Model versions of one lab: every model the server uses, kept in its SQLite database.

A version has an id (1, 2, ...), its parent (the version it was fine-tuned from; none for
the model the server was first started with), the run folder it is served from (for a
promoted candidate, the copy re-calibrated on the audit cells; ``trained_run`` is the run
the job trained), the reviews it was trained on (their ids), its audit figures (``n``,
``accuracy`` with a bootstrap 95% interval, leaf ``ece``, ``flagged`` share), its accuracy
on the source run's validation images, the gate's decision, a state and timestamps.

States: ``active`` (exactly one: it classifies new cases), ``candidate`` (trained, not
yet promoted), ``retired`` (once active, replaced). A promotion makes the candidate
active and the previous active retired in one transaction, with who forced it when the
gate was skipped.

Which reviewed cells are audit cells is not decided here: the server decides it once
per cell when the cell is stored (``cells.audit``, by
:func:`leukotree.lab.select.audit_flag`) and the lab reads that flag
(:attr:`leukotree.lab.jobs.LabCell.audit`), so the review queue, the training job and
the gate agree on one stored decision.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukotree.errors import LeukotreeError

STATES = ("active", "candidate", "retired")

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY, parent INTEGER, run TEXT NOT NULL, trained_run TEXT,
    state TEXT NOT NULL, created REAL NOT NULL, promoted REAL, forced_by TEXT,
    reviews TEXT NOT NULL DEFAULT '[]', audit TEXT, source TEXT, gate TEXT,
    calibration TEXT, job TEXT);
"""

#: A function that opens a transaction on the lab's database (the serve store's).
Connect = Callable[[], AbstractContextManager[sqlite3.Connection]]


class LabNotFound(LeukotreeError):
    """No such model version or job (HTTP 404)."""


class LabConflict(LeukotreeError):
    """The version or job is not in a state that allows the request (HTTP 409)."""


@dataclass(frozen=True)
class Version:
    """One row of the ``versions`` table (module docstring)."""

    id: int
    parent: int | None
    run: str
    state: str
    created: float
    promoted: float | None = None
    forced_by: str | None = None
    reviews: list[int] = field(default_factory=list)
    audit: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    trained_run: str | None = None
    job: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Version:
        def load(key: str) -> Any:
            return json.loads(row[key]) if row[key] else None

        return cls(id=row["id"], parent=row["parent"], run=row["run"], state=row["state"],
                   created=row["created"], promoted=row["promoted"],
                   forced_by=row["forced_by"], reviews=json.loads(row["reviews"]),
                   audit=load("audit"), source=load("source"), gate=load("gate"),
                   calibration=load("calibration"), trained_run=row["trained_run"],
                   job=row["job"])

    def to_json(self) -> dict[str, Any]:
        """The API's view (``GET /api/models``): the reviews as a count and their ids."""
        return {"id": self.id, "state": self.state, "parent": self.parent, "run": self.run,
                "trained_run": self.trained_run, "created": self.created,
                "promoted": self.promoted, "forced_by": self.forced_by,
                "reviews": {"n": len(self.reviews), "ids": self.reviews},
                "audit": self.audit or {"n": 0, "accuracy": None},
                "source": self.source, "gate": self.gate, "calibration": self.calibration,
                "job": self.job}


class Versions:
    """The ``versions`` table, through ``connect`` (one transaction per call)."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    def ensure_initial(self, run: str | Path) -> Version:
        """Version 1 (active) is the model the server was first started with; on later
        starts it must be the same run, or the lab's versions would describe another
        model (refused, with what to do)."""
        wanted = str(Path(run).resolve())
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE id = 1").fetchone()
            if row is None:
                db.execute("INSERT INTO versions (id, parent, run, state, created, promoted) "
                           "VALUES (1, NULL, ?, 'active', ?, ?)",
                           (wanted, time.time(), time.time()))
                row = db.execute("SELECT * FROM versions WHERE id = 1").fetchone()
        first = Version.from_row(row)
        if first.run != wanted:
            raise LeukotreeError(
                f"This store's model versions start from '{first.run}', but the server was "
                f"given '{wanted}' as its first model. Serve '{first.run}' first (the lab's "
                "active version is then used), or give another --store for another model.")
        return first

    def get(self, version: int) -> Version:
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE id = ?", (version,)).fetchone()
        if row is None:
            raise LabNotFound(f"No model version {version}; GET /api/models lists them.")
        return Version.from_row(row)

    def all(self) -> list[Version]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM versions ORDER BY id").fetchall()
        return [Version.from_row(r) for r in rows]

    def active(self) -> Version:
        with self._connect() as db:
            row = db.execute("SELECT * FROM versions WHERE state = 'active'").fetchone()
        if row is None:
            raise LabNotFound("No active model version: start the server with its model.")
        return Version.from_row(row)

    def add_candidate(self, parent: int, trained_run: str | Path, reviews: list[int],
                      job: str | None = None) -> Version:
        """A new version in state ``candidate``, served from ``trained_run``."""
        run = str(Path(trained_run).resolve())
        with self._connect() as db:
            cur = db.execute("INSERT INTO versions (parent, run, trained_run, state, created, "
                             "reviews, job) VALUES (?, ?, ?, 'candidate', ?, ?, ?)",
                             (parent, run, run, time.time(), json.dumps(reviews), job))
            row = db.execute("SELECT * FROM versions WHERE id = ?",
                             (cur.lastrowid,)).fetchone()
        return Version.from_row(row)

    def set_figures(self, version: int, **figures: dict[str, Any] | None) -> None:
        """Store ``audit``, ``source``, ``gate`` and/or ``calibration`` (JSON)."""
        unknown = set(figures) - {"audit", "source", "gate", "calibration"}
        if unknown:
            raise ValueError(unknown)
        with self._connect() as db:
            for key, value in figures.items():
                db.execute(f"UPDATE versions SET {key} = ? WHERE id = ?",
                           (json.dumps(value), version))

    def promote(self, version: int, run: str | Path, forced_by: str | None = None,
                calibration: dict[str, Any] | None = None) -> Version:
        """Make ``version`` (a candidate) active, served from ``run``; the active one is
        retired, in the same transaction."""
        with self._connect() as db:
            row = db.execute("SELECT state FROM versions WHERE id = ?", (version,)).fetchone()
            if row is None:
                raise LabNotFound(f"No model version {version}; GET /api/models lists them.")
            if row["state"] != "candidate":
                raise LabConflict(f"Model version {version} is {row['state']}; only a "
                                  "candidate can be promoted (train a new one).")
            db.execute("UPDATE versions SET state = 'retired' WHERE state = 'active'")
            db.execute("UPDATE versions SET state = 'active', run = ?, promoted = ?, "
                       "forced_by = ?, calibration = ? WHERE id = ?",
                       (str(Path(run).resolve()), time.time(), forced_by,
                        json.dumps(calibration), version))
        return self.get(version)
