"""Where ``leukotree serve`` keeps everything: an SQLite database and the uploaded images.

``STORE/leukotree.sqlite3`` holds the cases (patient, model, status, result, final
diagnosis, sign-out), their cells (original name for display, the server's own file
name, result, error, reviewed label) and every review (what, who, when). Images live
in ``STORE/images/<case>/<index><suffix>``: names the server makes, never a path the
client sent. Nothing is kept only in memory, so a restart loses nothing; cases that
were queued or running are queued again.

Every cell is decided once, when its case is stored, to be an *audit* cell or not
(``cells.audit``: :func:`leukotree.lab.select.audit_flag` of ``case:index`` at the
server's audit share, a uniform random draw independent of the cell): the reviewed audit
cells are the lab's unbiased test set and are never trained on
(:meth:`Store.audit_cells`). This stored flag is the only decision: the review queue,
the lab's training jobs and its gate read it (:meth:`Store.reviewed_cells` gives each
:class:`~leukotree.lab.jobs.LabCell` its flag) and ``/api/corrections.csv`` shows it.
``cells.digest`` is the SHA-256 of the stored bytes (the review queue never offers the
same image twice).

A sign-out is final: a second one, or a cell review after it, is refused
(:class:`CaseConflict`, 409); a correction is an amendment, a new entry with who, when
and why, that never overwrites the sign-out. Reviews and sign-out wait for the case to
be ``done``.

The store is checked when opened: a folder that cannot be written, a database that is
not SQLite or is damaged, and an empty database beside existing case images are
refused with what to do (:class:`StoreError`). The same database keeps the lab's model
versions (:mod:`leukotree.lab.versions`; each case records the version that classified
it) and training jobs (:mod:`leukotree.lab.jobs`); their files live in ``STORE/lab``.
One server at a time uses a store: :meth:`Store.hold` takes an exclusive lock on
``STORE/serve.lock`` (released when the process ends, however it ends) and names the
holder when it is taken.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from leukotree.errors import LeukotreeError
from leukotree.lab import jobs, versions
from leukotree.lab.jobs import LabCell
from leukotree.lab.select import AUDIT_SHARE, audit_flag

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
    kind TEXT NOT NULL, label TEXT, cell_type TEXT, reviewer TEXT NOT NULL, at REAL NOT NULL,
    note TEXT);
"""
#: Columns added since the first release, with their definition (added when missing).
MIGRATIONS = {("reviews", "note"): "TEXT", ("cases", "model_version"): "INTEGER",
              ("cells", "audit"): "INTEGER", ("cells", "digest"): "TEXT"}
DATABASE = "leukotree.sqlite3"
LOCK = "serve.lock"

#: Case states, in order.
STATUSES = ("queued", "running", "done", "failed")


class StoreError(LeukotreeError):
    """The store cannot be used (unreadable, unwritable, damaged, or held by another
    server)."""


class CaseNotFound(LeukotreeError):
    """No such case or cell (HTTP 404)."""


class CaseConflict(LeukotreeError):
    """The case is not in a state that allows the request (HTTP 409)."""


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
        self.path = self.root / DATABASE
        self._lock = threading.Lock()
        self._held: Any = None
        try:
            for folder in (self.root, self.images, self.reports):
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise StoreError(f"Cannot create the store folder '{self.root}': "
                             f"{err.strerror or err}. Give a --store you can write.") from err
        self._check_writable()
        self._check_database()
        #: The lab's model versions and training jobs (tables of this database).
        self.versions = versions.Versions(self.transaction)
        self.jobs = jobs.Jobs(self.transaction)

    def _check_writable(self) -> None:
        for folder in (self.root, self.images, self.reports):
            probe = folder / f".write-test-{os.getpid()}"
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise StoreError(
                    f"The store folder '{folder}' cannot be written ({err.strerror or err}): "
                    "the server could not keep cases. Make it writable by this user or give "
                    "another --store.") from err

    def _check_database(self) -> None:
        """Refuse a damaged database, or an empty one beside existing case images."""
        exists = self.path.exists()
        if not exists or self.path.stat().st_size == 0:
            cases = [p.name for p in self.images.iterdir() if p.is_dir()]
            if cases:
                state = "is empty (0 bytes)" if exists else "is missing"
                raise StoreError(
                    f"The database '{self.path}' {state}, but '{self.images}' holds the images "
                    f"of {len(cases)} case(s): their records were lost. Restore the database "
                    "from a backup, or move the images folder aside to start an empty store.")
        try:
            with self._db() as db:
                check = db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(check)
                db.executescript(SCHEMA + versions.SCHEMA + jobs.SCHEMA)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                db.execute(f"PRAGMA user_version = {int(version)}")  # a write: read-only?
                for (table, column), kind in MIGRATIONS.items():
                    have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.Error as err:
            if "readonly" in str(err) or "read-only" in str(err):
                raise StoreError(
                    f"The database '{self.path}' cannot be written ({err}): make it and its "
                    "folder writable by this user, or give another --store.") from err
            raise StoreError(
                f"The database '{self.path}' cannot be used ({err}): it is damaged, truncated "
                "or not a leukotree database. Move it aside and restore a backup (its case "
                f"images stay in '{self.images}').") from err

    # ----------------------------------------------------------------- one server
    def hold(self) -> None:
        """Take the store for this server (an exclusive lock on ``STORE/serve.lock``, held
        until :meth:`release` or the end of the process); refused with the holder's pid
        and host while another server holds it. Holding it twice is a no-op."""
        if self._held is not None:
            return
        import fcntl

        path = self.root / LOCK
        try:
            handle = open(path, "a+")  # noqa: SIM115 - held open while serving
        except OSError as err:
            raise StoreError(f"Cannot open the lock file '{path}': {err.strerror or err}.") \
                from err
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise StoreError(
                f"The store '{self.root}' is in use by another leukotree serve ({holder}). "
                "Two servers on one store would classify each case twice: stop that one, or "
                "give this one another --store.") from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._held = handle

    def release(self) -> None:
        """Let another server take the store."""
        if self._held is not None:
            self._held.truncate(0)
            self._held.close()  # closing the file releases the lock
            self._held = None

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

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """One transaction on the database (committed when the block ends), serialised
        with every other use of this store."""
        return self._db()

    # ----------------------------------------------------------------- cases
    def create_case(self, patient: str | None, model: str, uploads: Sequence[Upload],
                    audit_share: float = AUDIT_SHARE) -> str:
        """Store the files under server-made names; the case starts ``queued``. Without a
        patient id the case id stands for the patient (cases never share a patient by
        accident). Each cell's audit flag is decided here, at ``audit_share``."""
        import hashlib
        import shutil

        case_id = uuid.uuid4().hex[:16]
        folder = self.images / case_id
        now = time.time()
        rows = []
        try:
            folder.mkdir(mode=0o700)
            for idx, up in enumerate(uploads):
                stored = digest = None
                if up.error is None:
                    stored = f"{idx:05d}{up.suffix}"
                    (folder / stored).write_bytes(up.data)
                    digest = hashlib.sha256(up.data).hexdigest()
                audit = int(audit_flag(f"{case_id}:{idx}", audit_share))
                rows.append((case_id, idx, up.name, stored, up.error, audit, digest))
            with self._db() as db:
                db.execute("INSERT INTO cases (id, patient, model, status, created, updated) "
                           "VALUES (?, ?, ?, 'queued', ?, ?)",
                           (case_id, patient or case_id, model, now, now))
                db.executemany("INSERT INTO cells (case_id, idx, name, stored, error, audit, "
                               "digest) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        except (OSError, sqlite3.Error):
            shutil.rmtree(folder, ignore_errors=True)  # no images without their case
            raise
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
                     diagnosis: dict[str, Any], version: int | None = None) -> None:
        """Each cell's result (by index) and the case's diagnosis; the case is ``done``,
        classified by model ``version`` (None: a model outside the lab's versions)."""
        with self._db() as db:
            db.executemany("UPDATE cells SET result = ?, error = COALESCE(error, ?) "
                           "WHERE case_id = ? AND idx = ?",
                           [(json.dumps(c["result"]), c.get("error"), case_id, c["idx"])
                            for c in cells])
            db.execute("UPDATE cases SET status = 'done', result = ?, model_version = ?, "
                       "updated = ? WHERE id = ?",
                       (json.dumps(diagnosis), version, time.time(), case_id))

    def requeue(self, case_id: str) -> None:
        """Queue a done or failed case to be classified again (its reviews are kept);
        refused while it is queued or running, and after its sign-out (the signed-out
        result stays the one it was signed out on)."""
        with self._db() as db:
            row = db.execute("SELECT status, final_label FROM cases WHERE id = ?",
                             (case_id,)).fetchone()
            if row is None:
                raise CaseNotFound(f"No case '{case_id}'.")
            if row["final_label"] is not None:
                raise CaseConflict(f"Case '{case_id}' is signed out as {row['final_label']}; "
                                   "a signed-out case keeps the result it was signed out on.")
            if row["status"] in ("queued", "running"):
                raise CaseConflict(f"Case '{case_id}' is already {row['status']}.")
            db.execute("UPDATE cases SET status = 'queued', error = NULL, done_cells = 0, "
                       "updated = ? WHERE id = ?", (time.time(), case_id))

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
                raise CaseNotFound(f"No case '{case_id}'.")
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
            raise CaseNotFound(f"Case '{case_id}' has no cell {idx}.")
        stored = cells[0]["stored"]
        return None if stored is None else self.images / case_id / stored

    # ----------------------------------------------------------------- reviews
    @staticmethod
    def _reviewable(db: sqlite3.Connection, case_id: str, what: str) -> sqlite3.Row:
        """The case row, if it is done and not signed out (read in the caller's
        transaction, so that the check and the write cannot interleave)."""
        row = db.execute("SELECT * FROM cases WHERE id = ?", (case_id,)).fetchone()
        if row is None:
            raise CaseNotFound(f"No case '{case_id}'.")
        if row["status"] == "failed":
            raise CaseConflict(f"Case '{case_id}' failed ({row['error']}): it has no result "
                               f"for {what}; upload the cells again.")
        if row["status"] != "done":
            raise CaseConflict(f"Case '{case_id}' is {row['status']}: {what} waits until it "
                               "is done.")
        if row["final_label"] is not None:
            raise CaseConflict(f"Case '{case_id}' was signed out as {row['final_label']} by "
                               f"{row['signed_by']}; the sign-out is final. Correct it with "
                               "an amendment (POST /api/cases/{id}/amendments).")
        return row

    def review_cell(self, case_id: str, idx: int, label: str | None, cell_type: str | None,
                    reviewer: str) -> None:
        """A reviewer's label and/or cell type for one cell of a done, open case."""
        now = time.time()
        with self._db() as db:
            self._reviewable(db, case_id, "a review")
            if db.execute("SELECT 1 FROM cells WHERE case_id = ? AND idx = ?",
                          (case_id, idx)).fetchone() is None:
                raise CaseNotFound(f"Case '{case_id}' has no cell {idx}.")
            db.execute("UPDATE cells SET reviewed_label = COALESCE(?, reviewed_label), "
                       "reviewed_cell_type = COALESCE(?, reviewed_cell_type) "
                       "WHERE case_id = ? AND idx = ?", (label, cell_type, case_id, idx))
            db.execute("INSERT INTO reviews (case_id, cell_idx, kind, label, cell_type, "
                       "reviewer, at) VALUES (?, ?, 'cell', ?, ?, ?, ?)",
                       (case_id, idx, label, cell_type, reviewer, now))

    def sign_out(self, case_id: str, label: str, reviewer: str) -> None:
        """The case's final diagnosis, once: refused before the case is done and after a
        first sign-out."""
        now = time.time()
        with self._db() as db:
            self._reviewable(db, case_id, "the sign-out")
            # the condition, not only the check above, keeps a second sign-out out (another
            # process on the same database, or a race the check did not see)
            done = db.execute("UPDATE cases SET final_label = ?, signed_by = ?, signed_at = ?, "
                              "updated = ? WHERE id = ? AND final_label IS NULL",
                              (label, reviewer, now, now, case_id))
            if done.rowcount != 1:
                raise CaseConflict(f"Case '{case_id}' is already signed out; the sign-out is "
                                   "final: correct it with an amendment.")
            db.execute("INSERT INTO reviews (case_id, kind, label, reviewer, at) "
                       "VALUES (?, 'signout', ?, ?, ?)", (case_id, label, reviewer, now))

    def amend(self, case_id: str, label: str, reviewer: str, reason: str) -> None:
        """A correction of a signed-out diagnosis: a new entry (who, when, why); the
        sign-out itself stays as it was."""
        with self._db() as db:
            row = db.execute("SELECT final_label FROM cases WHERE id = ?",
                             (case_id,)).fetchone()
            if row is None:
                raise CaseNotFound(f"No case '{case_id}'.")
            if row["final_label"] is None:
                raise CaseConflict(f"Case '{case_id}' is not signed out yet: sign it out "
                                   "instead of amending it.")
            db.execute("INSERT INTO reviews (case_id, kind, label, reviewer, at, note) "
                       "VALUES (?, 'amendment', ?, ?, ?, ?)",
                       (case_id, label, reviewer, time.time(), reason))

    # ----------------------------------------------------------------- audit cells
    @staticmethod
    def _audit(row: sqlite3.Row) -> bool:
        """A cell row's stored audit flag (``case_id``, ``idx``, ``audit`` columns). A flag
        not decided yet (a cell stored by an older version, before :meth:`fill_audit`)
        counts by the rule at the default share, so that it is never trained on by
        accident."""
        if row["audit"] is not None:
            return row["audit"] == 1
        return audit_flag(f"{row['case_id']}:{row['idx']}")

    def fill_audit(self, audit_share: float = AUDIT_SHARE) -> int:
        """Decide the audit flag of cells stored before flags existed (``audit`` NULL), at
        ``audit_share``; a decided flag is never changed. Returns how many were decided."""
        with self._db() as db:
            rows = db.execute("SELECT case_id, idx FROM cells WHERE audit IS NULL").fetchall()
            db.executemany("UPDATE cells SET audit = ? WHERE case_id = ? AND idx = ?",
                           [(int(audit_flag(f"{r['case_id']}:{r['idx']}", audit_share)),
                             r["case_id"], r["idx"]) for r in rows])
        return len(rows)

    def audit_cells(self) -> set[tuple[str, int]]:
        """``(case id, cell index)`` of every audit cell (reviewed or not): never train on
        these; their reviews are the lab's unbiased test set (:meth:`_audit`)."""
        with self._db() as db:
            rows = db.execute("SELECT case_id, idx, audit FROM cells WHERE audit IS NULL "
                              "OR audit = 1").fetchall()
        return {(r["case_id"], r["idx"]) for r in rows if self._audit(r)}

    def review_candidates(self, model: str | None = None) -> list[dict[str, Any]]:
        """The cells a review queue may offer: classified (with a result), of done cases
        not signed out (of ``model``'s cases only, when given), not reviewed yet; each
        with its case's patient and model, its audit flag and digest."""
        query = ("SELECT c.case_id, c.idx, c.name, c.stored, c.result, c.audit, c.digest, "
                 "k.patient, k.model FROM cells c JOIN cases k ON k.id = c.case_id "
                 "WHERE k.status = 'done' AND k.final_label IS NULL AND c.result IS NOT NULL "
                 "AND c.stored IS NOT NULL AND c.reviewed_label IS NULL AND "
                 "c.reviewed_cell_type IS NULL")
        args: tuple[Any, ...] = ()
        if model is not None:
            query += " AND k.model = ?"
            args = (model,)
        with self._db() as db:
            rows = db.execute(query + " ORDER BY k.created, c.idx", args).fetchall()
        return [dict(r) | {"result": json.loads(r["result"]), "audit": self._audit(r)}
                for r in rows]

    def reviews(self, case_id: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM reviews WHERE case_id = ? ORDER BY id",
                              (case_id,)).fetchall()
        return [dict(r) for r in rows]

    def reviewed_cells(self, model: str) -> list[LabCell]:
        """Every stored cell of the cases of ``model`` (a served model's name) that a
        reviewer labelled, with its latest label review and its stored audit flag: the
        lab's training and audit cells."""
        with self._db() as db:
            rows = db.execute(
                "SELECT c.case_id, c.idx, c.stored, c.reviewed_label, c.reviewed_cell_type, "
                "c.audit, k.patient, (SELECT MAX(id) FROM reviews r WHERE "
                "r.case_id = c.case_id AND r.cell_idx = c.idx AND r.label IS NOT NULL) "
                "AS review FROM cells c JOIN "
                "cases k ON k.id = c.case_id WHERE c.reviewed_label IS NOT NULL AND "
                "c.stored IS NOT NULL AND k.model = ? ORDER BY k.created, c.idx",
                (model,)).fetchall()
        return [LabCell(r["case_id"], r["idx"], (self.images / r["case_id"] / r["stored"])
                        .resolve(), r["reviewed_label"], r["patient"], r["review"],
                        r["reviewed_cell_type"] or "", self._audit(r)) for r in rows]

    def corrections(self) -> list[dict[str, str]]:
        """Every reviewed cell as a manifest row ``path,label,patient,cell_type,audit``:
        the label a reviewer gave the cell, else the case's diagnosis in force (the latest
        amendment, else the sign-out); ``audit`` (``True``/``False``, as in ``leukotree
        select``'s queue) its stored flag: an audit cell is the lab's test set, never to
        be trained on."""
        with self._db() as db:
            rows = db.execute(
                "SELECT c.case_id, c.idx, c.audit, c.stored, c.reviewed_label, "
                "c.reviewed_cell_type, k.patient, COALESCE((SELECT label FROM reviews "
                "WHERE case_id = k.id AND kind = 'amendment' ORDER BY id DESC LIMIT 1), "
                "k.final_label) AS final_label "
                "FROM cells c JOIN cases k ON k.id = c.case_id WHERE "
                "(c.reviewed_label IS NOT NULL OR c.reviewed_cell_type IS NOT NULL) AND "
                "c.stored IS NOT NULL ORDER BY k.created, c.idx").fetchall()
        return [{"path": str((self.images / r["case_id"] / r["stored"]).resolve()),
                 "label": r["reviewed_label"] or r["final_label"] or "",
                 "patient": r["patient"],
                 "cell_type": r["reviewed_cell_type"] or "",
                 "audit": str(self._audit(r))} for r in rows]
