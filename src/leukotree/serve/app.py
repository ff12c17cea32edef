"""``leukotree serve``: the lab's web app (FastAPI) and its JSON API.

Pages are server-rendered Jinja2 templates with autoescaping; the small script they load
(``static/app.js``) only calls the JSON API below, which FastAPI documents at ``/docs``.
With a token every request (pages and API) needs ``Authorization: Bearer <token>`` or
the session cookie the login page sets, else 401.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from leukotree.errors import LeukotreeError
from leukotree.serve.store import Store
from leukotree.serve.uploads import Limits, UploadRefused, expand
from leukotree.serve.worker import Models, Worker

COOKIE = "leukotree_session"


@dataclass
class ServeSettings:
    """What ``create_app`` needs besides the models and the store."""

    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    confidence: str | None = "0.6"
    aggregate: str = "majority"


def session_value(token: str) -> str:
    """The cookie that stands for the token (a digest: the token itself never travels
    in a cookie)."""
    return hashlib.sha256(f"leukotree-session:{token}".encode()).hexdigest()


def authorised(token: str | None, header: str | None, cookie: str | None) -> bool:
    if token is None:
        return True
    bearer = (header or "").removeprefix("Bearer ").strip()
    return (hmac.compare_digest(bearer.encode(), token.encode())
            or hmac.compare_digest((cookie or "").encode(), session_value(token).encode()))


def create_app(models: Models, store: Store, settings: ServeSettings | None = None) -> Any:
    """The FastAPI application (pages, API, static files), with its background worker."""
    settings = settings or ServeSettings()
    worker = Worker(store, models, confidence=settings.confidence,
                    aggregate=settings.aggregate)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        worker.resume_pending()
        yield
        worker.shutdown()

    app = FastAPI(title="leukotree", lifespan=lifespan,
                          description="Leukemia classification from blood-smear cells.")
    app.state.models, app.state.store, app.state.worker = models, store, worker
    app.state.settings = settings
    app.middleware("http")(_auth_middleware(settings.token))
    static = resources.files("leukotree.serve") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    _add_api(app)
    _add_review_api(app)
    from leukotree.serve.pages import add_pages

    add_pages(app)
    return app


def _auth_middleware(token: str | None) -> Callable:
    async def check(request: Any, call_next: Callable) -> Any:
        open_paths = ("/login", "/static/")
        if token is None or request.url.path.startswith(open_paths) or authorised(
                token, request.headers.get("authorization"), request.cookies.get(COOKIE)):
            return await call_next(request)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": "authentication required: send 'Authorization: "
                                          "Bearer <token>' or log in"}, status_code=401)
        return HTMLResponse("<!DOCTYPE html><title>leukotree</title><p>Authentication "
                            "required. <a href='/login'>Log in</a>.</p>", status_code=401)

    return check


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Review(BaseModel):
    """A reviewer's label and/or cell type for one cell."""

    reviewer: str
    label: str | None = None
    cell_type: str | None = None


class SignOut(BaseModel):
    """The final diagnosis of a case, and who signs it out."""

    reviewer: str
    label: str


def case_json(store: Store, case_id: str) -> dict[str, Any]:
    """``GET /api/cases/{id}``: status, and when done the diagnosis and one entry per
    uploaded file (an unreadable one with its error)."""
    case = store.case(case_id)
    out = {"id": case["id"], "patient": case["patient"], "model": case["model"],
           "status": case["status"], "error": case["error"], "created": case["created"],
           "n_cells": len(case["cells"]), "done_cells": case["done_cells"],
           "final_label": case["final_label"], "signed_by": case["signed_by"]}
    if case["status"] == "done":
        out["diagnosis"] = case["result"]
        out["cells"] = [{"index": c["idx"], "name": c["name"], "error": c["error"],
                         "reviewed_label": c["reviewed_label"],
                         "reviewed_cell_type": c["reviewed_cell_type"],
                         **(c["result"] or {"label": None, "probabilities": {},
                                            "referred": None})}
                        for c in case["cells"]]
    return out


def _add_api(app: FastAPI) -> None:
    store: Store = app.state.store
    models: Models = app.state.models

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(models.predictors),
                "queued": len([f for f in app.state.worker.futures.values() if not f.done()])}

    @app.get("/api/models")
    def list_models() -> list[dict[str, Any]]:
        return [{"name": n, "source": models.sources[n], "engine": p.engine,
                 "taxonomy": p.taxonomy.to_dict(), "leaves": list(p.taxonomy.leaves),
                 "cell_types": list(p.cell_taxonomy.leaves) if p.cell_taxonomy else [],
                 "patient_model": p.patient_model.model.name if p.patient_model else None}
                for n, p in models.predictors.items()]

    @app.post("/api/cases", status_code=201)
    async def create_case(files: Annotated[list[UploadFile], File()],
                          patient: Annotated[str, Form()] = "",
                          model: Annotated[str, Form()] = "") -> Any:
        patient = patient.strip() or "unnamed"
        if len(patient) > 200 or any(ch in patient for ch in "\n\r\t"):
            return _error(422, "The patient id must be one line of at most 200 "
                                        "characters.")
        try:
            name, _ = models.get(model.strip() or None)
            uploads = expand([(f.filename or "file", await f.read()) for f in files],
                             app.state.settings.limits)
        except UploadRefused as err:
            return _error(err.status, str(err))
        except LeukotreeError as err:
            return _error(422, str(err))
        case_id = store.create_case(patient, name, uploads)
        app.state.worker.submit(case_id)
        return {"id": case_id, "n_cells": len(uploads)}

    @app.get("/api/cases")
    def list_cases() -> list[dict[str, Any]]:
        return [{"id": c["id"], "patient": c["patient"], "status": c["status"],
                 "diagnosis": (c["result"] or {}).get("label"),
                 "referred": (c["result"] or {}).get("referred"), "n_cells": c["n_cells"],
                 "reviewed_cells": c["n_reviewed"], "final_label": c["final_label"],
                 "signed_by": c["signed_by"]} for c in store.cases()]

    @app.get("/api/cases/{case_id}")
    def get_case(case_id: str) -> Any:
        try:
            return case_json(store, case_id)
        except LeukotreeError as err:
            return _error(404, str(err))



def _add_review_api(app: FastAPI) -> None:
    store: Store = app.state.store
    models: Models = app.state.models

    @app.post("/api/cases/{case_id}/cells/{index}/review")
    def review(case_id: str, index: int, body: Review) -> Any:
        return _review(store, models, case_id, index, body)

    @app.post("/api/cases/{case_id}/signout")
    def sign_out(case_id: str, body: SignOut) -> Any:
        try:
            case = store.case(case_id)
            label = models.get(case["model"])[1].taxonomy.resolve(body.label, where="label")
            if not body.reviewer.strip():
                raise LeukotreeError("A sign-out needs the reviewer's name.")
            store.sign_out(case_id, label, body.reviewer.strip())
        except LeukotreeError as err:
            return _error(404 if "No case" in str(err) else 422, str(err))
        return {"id": case_id, "final_label": label}

    @app.get("/api/corrections.csv", response_class=PlainTextResponse)
    def corrections() -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["path", "label", "patient", "cell_type"])
        writer.writeheader()
        writer.writerows(store.corrections())
        return buffer.getvalue()


def _review(store: Store, models: Models, case_id: str, index: int, body: Review) -> Any:
    """Reclassify (or accept) one cell: its label and/or cell type, with who and when."""
    try:
        case = store.case(case_id)
        predictor = models.get(case["model"])[1]
        if not body.reviewer.strip():
            raise LeukotreeError("A review needs the reviewer's name ('reviewer').")
        if body.label is None and body.cell_type is None:
            raise LeukotreeError("A review gives a 'label', a 'cell_type' or both.")
        label = (predictor.taxonomy.resolve(body.label, where="label")
                 if body.label is not None else None)
        cell_type = None
        if body.cell_type is not None:
            if predictor.cell_taxonomy is None:
                raise LeukotreeError("This model has no cell-type head; review 'label'.")
            cell_type = predictor.cell_taxonomy.resolve(body.cell_type, where="cell_type")
        store.review_cell(case_id, index, label, cell_type, body.reviewer.strip())
    except LeukotreeError as err:
        missing = "No case" in str(err) or "has no cell" in str(err)
        return _error(404 if missing else 422, str(err))
    return {"id": case_id, "index": index, "label": label, "cell_type": cell_type}


def default_store() -> Path:
    """A folder in the user's data directory (``$XDG_DATA_HOME/leukotree/serve``)."""
    import os

    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "leukotree" / "serve"
