"""Model versions in an SQLite database: version 1, candidates, promotion (one active),
persistence across a reopen. (The audit rule is :func:`leukotree.lab.select.audit_flag`,
tested in test_select.py; the store keeps each cell's flag.)"""

import sqlite3
from contextlib import contextmanager

import pytest

from leukotree.errors import LeukotreeError
from leukotree.lab.versions import SCHEMA, LabConflict, LabNotFound, Versions


def database(path):
    """``connect()`` for a plain SQLite file holding the versions table."""
    @contextmanager
    def connect():
        db = sqlite3.connect(path)
        db.row_factory = sqlite3.Row
        try:
            yield db
            db.commit()
        finally:
            db.close()

    with connect() as db:
        db.executescript(SCHEMA)
    return connect


def test_version_one_is_the_first_model_and_stays_it(tmp_path):
    versions = Versions(database(tmp_path / "db.sqlite3"))
    first = versions.ensure_initial(tmp_path / "run")
    assert (first.id, first.state, first.parent) == (1, "active", None)
    assert first.run == str((tmp_path / "run").resolve())
    assert versions.ensure_initial(tmp_path / "run").created == first.created  # once
    with pytest.raises(LeukotreeError, match=r"start from .* given .* another --store"):
        versions.ensure_initial(tmp_path / "other")


def test_a_promotion_retires_the_active_version_and_persists(tmp_path):
    path = tmp_path / "db.sqlite3"
    versions = Versions(database(path))
    versions.ensure_initial(tmp_path / "run")
    cand = versions.add_candidate(1, tmp_path / "job" / "run", [4, 5, 9], job="j1")
    assert (cand.id, cand.state, cand.parent, cand.reviews) == (2, "candidate", 1, [4, 5, 9])
    audit = {"n": 12, "accuracy": 0.75, "ci": [0.5, 1.0], "ece": 0.1, "flagged": 0.0}
    versions.set_figures(2, audit=audit, gate={"passed": True})
    with pytest.raises(ValueError):
        versions.set_figures(2, state="active")  # only figures are set this way
    promoted = versions.promote(2, tmp_path / "job" / "calibrated", forced_by="dr x",
                                calibration={"done": True})
    assert promoted.state == "active" and promoted.forced_by == "dr x"
    assert promoted.run.endswith("calibrated") and promoted.trained_run.endswith("run")
    assert promoted.promoted is not None
    with pytest.raises(LabConflict, match="only a candidate"):
        versions.promote(2, tmp_path)
    with pytest.raises(LabNotFound):
        versions.get(7)

    reopened = Versions(database(path))  # another process, another day
    assert [(v.id, v.state) for v in reopened.all()] == [(1, "retired"), (2, "active")]
    again = reopened.get(2)
    assert again.audit == audit and again.gate == {"passed": True}
    assert again.calibration == {"done": True} and again.job == "j1"
    json = again.to_json()
    assert json["reviews"] == {"n": 3, "ids": [4, 5, 9]} and json["audit"]["accuracy"] == 0.75
    assert reopened.active().id == 2
