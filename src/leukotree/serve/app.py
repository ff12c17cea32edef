"""``leukotree serve``: the lab's web app (FastAPI) and its JSON API.

Pages are server-rendered Jinja2 templates with autoescaping; the small script they load
(``static/app.js``) only calls the JSON API below, which FastAPI documents at ``/docs``.
Every request first passes :class:`leukotree.serve.guard.Guard` (allowed hosts,
same-origin writes, the token, body size, security headers); every error is JSON
``{"error": "..."}`` with a 4xx status (503 when the store fails).

The API: ``GET /api/health``, ``GET /api/models`` (the lab's model versions, and the
served models), ``POST /api/cases`` (multipart: ``files`` parts, optional ``patient``
and ``model``), ``GET /api/cases``, ``GET /api/cases/{id}``,
``POST /api/cases/{id}/rerun`` (with the active model),
``POST /api/cases/{id}/cells/{index}/review``, ``POST /api/cases/{id}/signout`` (once),
``POST /api/cases/{id}/amendments`` (after it), ``GET /api/corrections.csv``,
``GET /api/review-queue?n=N`` (the cells of open cases worth reviewing,
:mod:`leukotree.serve.queue`); the lab loop (:mod:`leukotree.lab.jobs`):
``POST /api/models/train``, ``GET /api/jobs``, ``GET /api/jobs/{id}``,
``POST /api/models/{version}/promote`` (``?force=true`` with a ``reviewer``).

The first served model is the lab's: version 1 on the store's first start, then the
active version (``leukotree.lab.versions``); the others are served as given.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from leukotree.errors import LeukotreeError
from leukotree.lab.jobs import Jobs, Lab, LabCell, LabSettings
from leukotree.lab.select import AUDIT_SHARE
from leukotree.lab.versions import Version
from leukotree.serve.auth import LoginThrottle, Sessions
from leukotree.serve.guard import Guard, add_error_handlers, allowed_hosts
from leukotree.serve.pages import add_pages
from leukotree.serve.queue import MAX_QUEUE, review_queue
from leukotree.serve.store import Store
from leukotree.serve.texts import check_id, check_note, csv_cell
from leukotree.serve.uploads import Limits, expand, read_form
from leukotree.serve.views import case_json
from leukotree.serve.worker import Models, Worker


@dataclass
class ServeSettings:
    """What ``create_app`` needs besides the models and the store. ``allowed_hosts``:
    host names served besides the loopback ones (``*``: any)."""

    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    confidence: str | None = "0.6"
    aggregate: str = "majority"
    allowed_hosts: tuple[str, ...] = ()
    lab: LabSettings = field(default_factory=LabSettings)
    #: Share of the cells decided (once, when stored) to be audit cells: never trained
    #: on, the lab's unbiased test set (:mod:`leukotree.lab.select`).
    audit_share: float = AUDIT_SHARE


def create_app(models: Models, store: Store, settings: ServeSettings | None = None) -> Any:
    """The FastAPI application (pages, API, static files), with its background worker.
    While it runs it holds the store (one server per store)."""
    settings = settings or ServeSettings()
    worker = Worker(store, models, confidence=settings.confidence,
                    aggregate=settings.aggregate)
    lab = _lab(store, models, settings.lab)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        store.hold()
        try:
            store.fill_audit(settings.audit_share)  # cells stored by an older version
            active = lab.start(models.sources[models.default])
            if active.id == 1:
                models.set_version(models.default, 1)
            worker.resume_pending()
            yield
            lab.shutdown()
            worker.shutdown()
        finally:
            store.release()

    app = FastAPI(title="leukotree", lifespan=lifespan,
                  description="Leukemia classification from blood-smear cells.")
    app.state.models, app.state.store, app.state.worker = models, store, worker
    app.state.lab = lab
    app.state.settings = settings
    app.state.sessions, app.state.throttle = Sessions(), LoginThrottle()
    app.add_middleware(Guard, token=settings.token, sessions=app.state.sessions,
                       hosts=allowed_hosts(settings.allowed_hosts))
    add_error_handlers(app)
    static = resources.files("leukotree.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    _add_api(app)
    _add_review_api(app)
    _add_lab_api(app)
    add_pages(app)
    return app


def _lab(store: Store, models: Models, settings: LabSettings) -> Lab:
    """The lab loop of ``store`` on the first served model."""
    def swap(version: Version) -> None:
        models.swap(models.default, version.run, version.id)

    def view(predictor: Any, run: str) -> Any:
        return models.options.input_config(predictor.model_config, source=run)

    def cells() -> list[LabCell]:
        return store.reviewed_cells(models.default)  # each with its stored audit flag

    return Lab(store.transaction, store.root / "lab", cells, swap, settings, view)


class Review(BaseModel):
    """A reviewer's label and/or cell type for one cell."""

    reviewer: str
    label: str | None = None
    cell_type: str | None = None


class SignOut(BaseModel):
    """The final diagnosis of a case, and who signs it out."""

    reviewer: str
    label: str


class Amendment(BaseModel):
    """A correction of a signed-out diagnosis: the new label, who and why."""

    reviewer: str
    label: str
    reason: str


UPLOAD_DOC = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "patient": {"type": "string", "maxLength": 200,
                    "description": "patient id (default: the case id)"},
        "model": {"type": "string", "description": "served model (default: the first)"}}}}}}}


def _add_api(app: FastAPI) -> None:
    store: Store = app.state.store
    models: Models = app.state.models

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models.predictors),
                "queued": len([f for f in app.state.worker.futures.values() if not f.done()])}

    @app.get("/api/models")
    def list_models() -> dict[str, Any]:
        """``models``: the lab's versions of the first served model (id, state, parent,
        audit figures, ...); ``served``: every served model as it is now."""
        return {"models": [v.to_json() for v in store.versions.all()],
                "served": [_served_json(models, n) for n in models.predictors]}

    @app.post("/api/cases", status_code=201, openapi_extra=UPLOAD_DOC)
    async def create_case(request: Request) -> Any:
        """A new case from the uploaded files; limits hold while the body streams in."""
        limits: Limits = app.state.settings.limits
        fields, files = await read_form(request.stream(), request.headers.get("content-type"),
                                        request.headers.get("content-length"), limits)
        patient = check_id(fields.get("patient"), "patient id", required=False)
        name, _ = models.get(check_id(fields.get("model"), "model", required=False) or None)
        uploads = await run_in_threadpool(expand, files, limits)
        del files
        case_id = await run_in_threadpool(store.create_case, patient or None, name, uploads,
                                          app.state.settings.audit_share)
        app.state.worker.submit(case_id)
        return JSONResponse({"id": case_id, "n_cells": len(uploads)}, status_code=201)

    @app.get("/api/cases")
    def list_cases() -> list[dict[str, Any]]:
        return [{"id": c["id"], "patient": c["patient"], "status": c["status"],
                 "diagnosis": (c["result"] or {}).get("label"),
                 "referred": (c["result"] or {}).get("referred"), "n_cells": c["n_cells"],
                 "reviewed_cells": c["n_reviewed"], "final_label": c["final_label"],
                 "signed_by": c["signed_by"], "model_version": c["model_version"]}
                for c in store.cases()]

    @app.get("/api/cases/{case_id}")
    def get_case(case_id: str) -> Any:
        return case_json(store, case_id)

    @app.post("/api/cases/{case_id}/rerun", status_code=202)
    def rerun(case_id: str) -> Any:
        """Classify the case again with its model as it is now (for the lab's model: the
        active version); its reviews are kept."""
        store.requeue(case_id)
        app.state.worker.submit(case_id)
        return JSONResponse({"id": case_id, "status": "queued"}, status_code=202)

    @app.get("/api/review-queue")
    def get_review_queue(n: Annotated[int, Query(ge=1, le=MAX_QUEUE)] = 20,
                         model: str | None = None, policy: str = "active") -> Any:
        """Up to ``n`` cells of open cases, not reviewed yet, worth a review (``policy``:
        active, uncertainty, ood or random), ``audit`` marking the random audit share."""
        return review_queue(store, models, n, model=model, policy=policy,
                            audit_share=app.state.settings.audit_share)


def _served_json(models: Models, name: str) -> dict[str, Any]:
    served = models.current(name)
    p = served.predictor
    return {"name": name, "source": str(served.loaded.source), "engine": p.engine,
            "version": served.version, "taxonomy": p.taxonomy.to_dict(),
            "leaves": list(p.taxonomy.leaves),
            "cell_types": list(p.cell_taxonomy.leaves) if p.cell_taxonomy else [],
            "patient_model": p.patient_model.model.name if p.patient_model else None}


class Promotion(BaseModel):
    """Who promotes (required to force a promotion past the gate)."""

    reviewer: str | None = None


def _add_lab_api(app: FastAPI) -> None:
    """Training jobs, their status and promotions (:mod:`leukotree.lab.jobs`)."""
    lab: Lab = app.state.lab

    @app.post("/api/models/train", status_code=202)
    def train() -> Any:
        """Fine-tune the active model on the reviewed non-audit cells, in a separate
        process; 422 with the number needed when there are too few."""
        return JSONResponse({"job": lab.start_training()}, status_code=202)

    @app.get("/api/jobs")
    def jobs() -> Any:
        return {"jobs": [Jobs.to_json(j) for j in lab.jobs.all()]}

    @app.get("/api/jobs/{job}")
    def job(job: str) -> Any:
        return Jobs.to_json(lab.jobs.get(job))

    @app.post("/api/models/{version}/promote")
    def promote(version: Annotated[int, PathParam(ge=1, lt=2**31)], force: bool = False,
                body: Promotion | None = None) -> Any:
        """Promote a candidate if the gate passes (409 with the rule and the numbers
        otherwise); ``force=true`` skips the gate and records the reviewer."""
        forced_by = None
        if force:
            forced_by = check_id(body.reviewer if body else None,
                                 "reviewer's name ('reviewer', required to force)")
        promoted = lab.promote(version, forced_by)
        return {"id": promoted.id, "state": promoted.state, "forced_by": promoted.forced_by,
                "calibration": promoted.calibration}


def leaf_label(predictor: Any, label: object, where: str) -> str:
    """``label`` resolved in the model's taxonomy; it must be a leaf (the page offers
    leaves only, and a diagnosis is a leaf)."""
    name = check_id(label, where)
    tax = predictor.taxonomy
    resolved = tax.resolve(name, where=where)
    if resolved not in tax.leaves:
        raise LeukotreeError(f"'{resolved}' is an inner node of the tree; the {where} must be "
                             f"a leaf: {', '.join(tax.leaves)}.")
    return resolved


#: What the case of a cell-type model is signed out as: its differential count.
DIFFERENTIAL = "differential"


def final_label(predictor: Any, label: object) -> str:
    """A case's sign-out label: a leaf for a model of diagnoses; ``differential`` for a
    model of cell types (taxonomy kind ``cells``), whose case adds up to a differential
    count, not to one of its leaves."""
    if predictor.taxonomy.kind != "cells":
        return leaf_label(predictor, label, "label")
    if check_id(label, "label") != DIFFERENTIAL:
        raise LeukotreeError(f"This model classifies cell types: its case is signed out as "
                             f"its differential count; send the label '{DIFFERENTIAL}', not "
                             f"{label!r}.")
    return DIFFERENTIAL


def _add_review_api(app: FastAPI) -> None:
    store: Store = app.state.store
    models: Models = app.state.models

    @app.post("/api/cases/{case_id}/cells/{index}/review")
    def review(case_id: str, index: Annotated[int, PathParam(ge=0, lt=2**31)],
               body: Review) -> Any:
        """Reclassify (or accept) one cell: its label and/or cell type, with who and when."""
        predictor = models.get(store.case(case_id)["model"])[1]
        reviewer = check_id(body.reviewer, "reviewer's name ('reviewer')")
        if body.label is None and body.cell_type is None:
            raise LeukotreeError("A review gives a 'label', a 'cell_type' or both.")
        label = leaf_label(predictor, body.label, "label") if body.label is not None else None
        cell_type = None
        if body.cell_type is not None:
            if predictor.cell_taxonomy is None:
                raise LeukotreeError("This model has no cell-type head; review 'label'.")
            cell_type = predictor.cell_taxonomy.resolve(check_id(body.cell_type, "cell_type"),
                                                        where="cell_type")
        store.review_cell(case_id, index, label, cell_type, reviewer)
        return {"id": case_id, "index": index, "label": label, "cell_type": cell_type}

    @app.post("/api/cases/{case_id}/signout")
    def sign_out(case_id: str, body: SignOut) -> Any:
        """The final diagnosis, once; refused (409) while the case runs and after."""
        predictor = models.get(store.case(case_id)["model"])[1]
        reviewer = check_id(body.reviewer, "reviewer's name ('reviewer')")
        label = final_label(predictor, body.label)
        store.sign_out(case_id, label, reviewer)
        return {"id": case_id, "final_label": label}

    @app.post("/api/cases/{case_id}/amendments", status_code=201)
    def amend(case_id: str, body: Amendment) -> Any:
        """A correction after the sign-out: a new entry with who, when and why."""
        predictor = models.get(store.case(case_id)["model"])[1]
        reviewer = check_id(body.reviewer, "reviewer's name ('reviewer')")
        label = leaf_label(predictor, body.label, "label")
        store.amend(case_id, label, reviewer, check_note(body.reason, "reason"))
        return {"id": case_id, "current_label": label}

    @app.get("/api/corrections.csv")
    def corrections() -> Response:
        """Reviewed cells as a manifest (``path,label,patient,cell_type,audit``; ``audit``
        true: the lab's test set, which ``train`` leaves out); cells a spreadsheet
        would evaluate are neutralised with a leading ``'``."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "label", "patient", "cell_type",
                                                    "audit"])
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()}
                         for row in store.corrections())
        return Response(buffer.getvalue(), media_type="text/csv; charset=utf-8")


def default_store() -> Path:
    """A folder in the user's data directory (``$XDG_DATA_HOME/leukotree/serve``)."""
    import os

    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "leukotree" / "serve"
