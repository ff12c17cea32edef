"""Where ``leukotree serve`` keeps everything: an SQLite database and the uploaded images.

``STORE/leukotree.sqlite3`` holds the cases (patient, model, status, result, final
diagnosis, sign-out), their cells (original name for display, the server's own file
name, result, error, reviewed label) and every review (what, who, when). Images live
in ``STORE/images/<case>/<index><suffix>``: names the server makes, never a path the
client sent. Nothing is kept only in memory, so a restart loses nothing; cases that
were queued or running are queued again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukotree.errors import LeukotreeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY, patient TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, done_cells INTEGER NOT NULL DEFAULT 0,
    error TEXT, result TEXT, final_label TEXT, signed_by TEXT, signed_at REAL);
CREATE TABLE IF NOT EXISTS cells (
    case_id TEXT NOT NULL REFERENCES cases(id), idx INTEGER NOT NULL, name TEXT NOT NULL,
    stored TEXT, result TEXT, error TEXT, reviewed_label TEXT, reviewed_cell_type TEXT,
    PRIMARY KEY (case_id, idx));
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT, case_id TEXT NOT NULL, cell_idx INTEGER,
    kind TEXT NOT NULL, label TEXT, cell_type TEXT, reviewer TEXT NOT NULL, at REAL NOT NULL);
"""

#: Case states, in order.
STATUSES = ("queued", "running", "done", "failed")


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the client's name (shown, never used as a path) and its bytes,
    or the reason it was refused at upload (kept as the cell's error)."""

    name: str
    data: bytes
    suffix: str = ""
    error: str | None = None


class Store:
    """The database and image folder of one ``--store`` directory (thread-safe)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.reports = self.root / "reports"
        for folder in (self.root, self.images, self.reports):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.root / "leukotree.sqlite3"
        self._lock = threading.Lock()
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = sqlite3.connect(self.path, timeout=30)
            db.row_factory = sqlite3.Row
            try:
                yield db
                db.commit()
            finally:
                db.close()

    # ----------------------------------------------------------------- cases
    def create_case(self, patient: str, model: str, uploads: Sequence[Upload]) -> str:
        """Store the files under server-made names; the case starts ``queued``."""
        case_id = uuid.uuid4().hex[:16]
        folder = self.images / case_id
        folder.mkdir(mode=0o700)
        now = time.time()
        rows = []
        for idx, up in enumerate(uploads):
            stored = None
            if up.error is None:
                stored = f"{idx:05d}{up.suffix}"
                (folder / stored).write_bytes(up.data)
            rows.append((case_id, idx, up.name, stored, up.error))
        with self._db() as db:
            db.execute("INSERT INTO cases (id, patient, model, status, created, updated) "
                       "VALUES (?, ?, ?, 'queued', ?, ?)", (case_id, patient, model, now, now))
            db.executemany("INSERT INTO cells (case_id, idx, name, stored, error) "
                           "VALUES (?, ?, ?, ?, ?)", rows)
        return case_id

    def set_status(self, case_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(status)
        with self._db() as db:
            db.execute("UPDATE cases SET status = ?, error = ?, updated = ? WHERE id = ?",
                       (status, error, time.time(), case_id))

    def set_progress(self, case_id: str, done: int) -> None:
        with self._db() as db:
            db.execute("UPDATE cases SET done_cells = ?, updated = ? WHERE id = ?",
                       (done, time.time(), case_id))

    def save_results(self, case_id: str, cells: Sequence[dict[str, Any]],
                     diagnosis: dict[str, Any]) -> None:
        """Each cell's result (by index) and the case's diagnosis; the case is ``done``."""
        with self._db() as db:
            db.executemany("UPDATE cells SET result = ?, error = COALESCE(error, ?) "
                           "WHERE case_id = ? AND idx = ?",
                           [(json.dumps(c["result"]), c.get("error"), case_id, c["idx"])
                            for c in cells])
            db.execute("UPDATE cases SET status = 'done', result = ?, updated = ? WHERE id = ?",
                       (json.dumps(diagnosis), time.time(), case_id))

    def pending(self) -> list[str]:
        """Cases a restart must queue again (queued or interrupted while running)."""
        with self._db() as db:
            rows = db.execute("SELECT id FROM cases WHERE status IN ('queued', 'running') "
                              "ORDER BY created").fetchall()
        return [r["id"] for r in rows]

    def case(self, case_id: str) -> dict[str, Any]:
        """The case with its cells; an unknown id is an error that says so."""
        with self._db() as db:
            row = db.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()
            if row is None:
                raise LeukotreeError(f"No case '{case_id}'.")
            cells = db.execute("SELECT * FROM cells WHERE case_id = ? ORDER BY idx",
                               (case_id,)).fetchall()
        out = dict(row)
        out["result"] = json.loads(out["result"]) if out["result"] else None
        out["cells"] = [dict(c) | {"result": json.loads(c["result"]) if c["result"] else None}
                        for c in cells]
        return out

    def cases(self) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute(
                "SELECT c.*, (SELECT COUNT(*) FROM cells WHERE case_id = c.id) AS n_cells, "
                "(SELECT COUNT(*) FROM cells WHERE case_id = c.id AND reviewed_label IS NOT "
                "NULL) AS n_reviewed FROM cases c ORDER BY created DESC").fetchall()
        return [dict(r) | {"result": json.loads(r["result"]) if r["result"] else None}
                for r in rows]

    def image_path(self, case_id: str, idx: int) -> Path | None:
        """The stored file of a cell (``None`` for a file refused at upload)."""
        case = self.case(case_id)
        cells = [c for c in case["cells"] if c["idx"] == idx]
        if not cells:
            raise LeukotreeError(f"Case '{case_id}' has no cell {idx}.")
        stored = cells[0]["stored"]
        return None if stored is None else self.images / case_id / stored

    # ----------------------------------------------------------------- reviews
    def review_cell(self, case_id: str, idx: int, label: str | None, cell_type: str | None,
                    reviewer: str) -> None:
        self.image_path(case_id, idx)  # the cell exists
        now = time.time()
        with self._db() as db:
            db.execute("UPDATE cells SET reviewed_label = COALESCE(?, reviewed_label), "
                       "reviewed_cell_type = COALESCE(?, reviewed_cell_type) "
                       "WHERE case_id = ? AND idx = ?", (label, cell_type, case_id, idx))
            db.execute("INSERT INTO reviews (case_id, cell_idx, kind, label, cell_type, "
                       "reviewer, at) VALUES (?, ?, 'cell', ?, ?, ?, ?)",
                       (case_id, idx, label, cell_type, reviewer, now))

    def sign_out(self, case_id: str, label: str, reviewer: str) -> None:
        self.case(case_id)
        now = time.time()
        with self._db() as db:
            db.execute("UPDATE cases SET final_label = ?, signed_by = ?, signed_at = ?, "
                       "updated = ? WHERE id = ?", (label, reviewer, now, now, case_id))
            db.execute("INSERT INTO reviews (case_id, kind, label, reviewer, at) "
                       "VALUES (?, 'signout', ?, ?, ?)", (case_id, label, reviewer, now))

    def reviews(self, case_id: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM reviews WHERE case_id = ? ORDER BY id",
                              (case_id,)).fetchall()
        return [dict(r) for r in rows]

    def corrections(self) -> list[dict[str, str]]:
        """Every reviewed cell as a manifest row ``path,label,patient,cell_type``: the label
        a reviewer gave the cell, else the case's signed-out diagnosis."""
        with self._db() as db:
            rows = db.execute(
                "SELECT c.case_id, c.stored, c.reviewed_label, c.reviewed_cell_type, "
                "k.patient, k.final_label FROM cells c JOIN cases k ON k.id = c.case_id WHERE "
                "(c.reviewed_label IS NOT NULL OR c.reviewed_cell_type IS NOT NULL) AND "
                "c.stored IS NOT NULL ORDER BY k.created, c.idx").fetchall()
        return [{"path": str((self.images / r["case_id"] / r["stored"]).resolve()),
                 "label": r["reviewed_label"] or r["final_label"] or "",
                 "patient": r["patient"],
                 "cell_type": r["reviewed_cell_type"] or ""} for r in rows]
