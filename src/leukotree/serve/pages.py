"""The pages of ``leukotree serve`` (Jinja2, autoescaped), cell images, heat maps and the
offline report of a case."""

from __future__ import annotations

import io
from collections.abc import Callable
from importlib import resources
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Form, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader, select_autoescape

from leukotree.data.images import load_rgb_array
from leukotree.errors import LeukotreeError
from leukotree.lab.jobs import Jobs
from leukotree.report.html import CSS
from leukotree.serve.auth import COOKIE, SESSION_MAX, token_matches
from leukotree.serve.guard import error_response, status_of
from leukotree.serve.store import CaseConflict, Store
from leukotree.serve.views import case_json
from leukotree.serve.worker import Models


def _templates() -> Jinja2Templates:
    folder = str(resources.files("leukotree.serve") / "templates")
    env = Environment(loader=FileSystemLoader(folder),
                      autoescape=select_autoescape(["html"], default=True))
    return Jinja2Templates(env=env)


def add_pages(app: FastAPI) -> None:
    """The HTML routes; they read the same store the JSON API writes."""
    templates = _templates()
    store: Store = app.state.store
    models: Models = app.state.models

    def render(request: Request, name: str, status: int = 200,
               headers: dict[str, str] | None = None, **context: Any) -> Any:
        auth = app.state.settings.token is not None
        return templates.TemplateResponse(request, name, {"css": CSS, "auth": auth, **context},
                                          status_code=status, headers=headers)

    _add_login(app, render)

    @app.get("/", response_class=HTMLResponse)
    def cases_page(request: Request) -> Any:
        return render(request, "cases.html", cases=store.cases())

    @app.get("/cases/new", response_class=HTMLResponse)
    def new_case_page(request: Request) -> Any:
        return render(request, "new.html", models=list(models.predictors))

    @app.get("/cases/{case_id}", response_class=HTMLResponse)
    def case_page(request: Request, case_id: str) -> Any:
        try:
            case = case_json(store, case_id)
        except LeukotreeError as err:
            return render(request, "message.html", status=404, message=str(err))
        predictor = models.get(case["model"])[1]
        tax = predictor.taxonomy
        return render(request, "case.html", case=case, taxonomy=tax,
                      dict_paths={leaf: list(tax.path(leaf)) for leaf in tax.leaves},
                      cell_types=list(predictor.cell_taxonomy.leaves)
                      if predictor.cell_taxonomy else [], reviews=store.reviews(case_id))

    @app.get("/review-queue", response_class=HTMLResponse)
    def review_queue_page(request: Request, n: int = 20, model: str | None = None) -> Any:
        """The review queue (:mod:`leukotree.serve.queue`): thumbnails, why each cell is
        offered, the model's label and a review form per cell."""
        from leukotree.serve.queue import MAX_QUEUE, review_queue

        try:
            queue = review_queue(store, models, max(1, min(n, MAX_QUEUE)), model=model,
                                 audit_share=app.state.settings.audit_share)
        except LeukotreeError as err:
            return render(request, "message.html", status=status_of(err), message=str(err))
        predictor = models.get(queue["model"])[1]
        return render(request, "review_queue.html", queue=queue,
                      leaves=list(predictor.taxonomy.leaves), n=n,
                      cell_types=list(predictor.cell_taxonomy.leaves)
                      if predictor.cell_taxonomy else [])

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request) -> Any:
        from leukotree.report.model_card import model_card_html

        cards = []
        for name in models.predictors:
            served = models.current(name)
            predictor, loaded = served.predictor, served.loaded
            cards.append({"name": name, "source": str(loaded.source),
                          "engine": predictor.engine, "version": served.version,
                          "card": model_card_html(predictor.model_config, predictor.taxonomy,
                                                  loaded.payload),
                          "patient_model": predictor.patient_model,
                          "members": [str(m) for m in loaded.member_paths]})
        lab = app.state.lab
        versions = [v.to_json() | {"promoted_at": _when(v.promoted)}
                    for v in store.versions.all()]
        jobs = store.jobs.all()
        return render(request, "models.html", cards=cards, versions=versions,
                      lab_model=models.default, rule=lab.settings.gate.describe(),
                      job=Jobs.to_json(jobs[0]) if jobs else None)

    _add_files(app)


def _when(seconds: float | None) -> str | None:
    import time

    return None if seconds is None else time.strftime("%Y-%m-%d %H:%M",
                                                      time.localtime(seconds))


def _add_login(app: FastAPI, render: Callable[..., Any]) -> None:
    """``/login`` (a random session for the right token, wrong tokens throttled) and
    ``/logout``."""

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request) -> Any:
        return render(request, "login.html", error=None)

    @app.post("/login", response_class=HTMLResponse)
    def login(request: Request, token: Annotated[str, Form()] = "") -> Any:
        """A new random session for the right token; wrong tokens are throttled per
        client address."""
        expected = app.state.settings.token
        client = request.client.host if request.client else "unknown"
        wait = app.state.throttle.retry_after(client)
        if wait:
            return render(request, "login.html", status=429, headers={"Retry-After": str(wait)},
                          error=f"Too many wrong tokens; try again in {wait} s.")
        if expected is None or not token_matches(expected, token):
            app.state.throttle.failed(client)
            return render(request, "login.html", status=401, error="Wrong token.")
        app.state.throttle.succeeded(client)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, app.state.sessions.open(), max_age=SESSION_MAX, path="/",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.post("/logout")
    def logout(request: Request) -> Any:
        """End the session (its id is forgotten by the server) and clear the cookie."""
        app.state.sessions.close(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response


def _add_files(app: FastAPI) -> None:
    """Cell images, heat maps and the offline report of a case."""
    store: Store = app.state.store
    models: Models = app.state.models

    @app.get("/cases/{case_id}/cells/{index}/image")
    def cell_image(case_id: str, index: int) -> Any:
        try:
            path = store.image_path(case_id, index)
        except LeukotreeError as err:
            return error_response(status_of(err), str(err))
        if path is None:
            return error_response(404, "This file was not stored (see its error).")
        return FileResponse(path)

    @app.get("/cases/{case_id}/cells/{index}/heatmap/{node}")
    def heatmap(case_id: str, index: int, node: str) -> Any:
        try:
            return Response(_heatmap_png(store, models, case_id, index, node),
                            media_type="image/png")
        except LeukotreeError as err:
            return error_response(status_of(err), str(err))

    @app.get("/cases/{case_id}/report")
    def report(case_id: str) -> Any:
        try:
            return FileResponse(_case_report(store, models, case_id, app.state.settings),
                                media_type="text/html",
                                filename=f"leukotree-case-{case_id}.html")
        except LeukotreeError as err:
            return error_response(status_of(err), str(err))


def _heatmap_png(store: Store, models: Models, case_id: str, index: int, node: str) -> bytes:
    from PIL import Image

    from leukotree.inference.explain import HeatMapper

    case = store.case(case_id)
    path = store.image_path(case_id, index)
    if path is None:
        raise LeukotreeError("This file was not stored (see its error).")
    name = models.get(case["model"])[0]
    model = models.torch_model(name)
    node = model.taxonomy.resolve(node, where="node")
    view = models.views[name]  # decoded as the worker decoded it
    pixels = load_rgb_array(path, view.img_size, **view.decode_options())
    with models.explain_lock, HeatMapper(model) as mapper:
        overlay = mapper.overlay(pixels, node)
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(overlay)).save(buffer, format="PNG")
    return buffer.getvalue()


def _case_report(store: Store, models: Models, case_id: str, settings: Any) -> Any:
    """The offline HTML report of a case: the one the worker wrote from its own results
    when it classified the case (:meth:`~leukotree.serve.worker.Worker.write_report`);
    otherwise (no report could be made) ``leukotree report`` on its stored cells, by the
    engine and decoding of the worker, which says what is missing. A case still queued or
    running has none yet (409)."""
    from leukotree.report.patient import patient_report

    case = store.case(case_id)
    if case["status"] in ("queued", "running"):  # the worker writes it when it is done
        raise CaseConflict(f"Case '{case_id}' is still {case['status']}; its report is "
                           "written when it is classified: ask again then.")
    name, predictor = models.get(case["model"])
    out = store.reports / f"{case_id}.html"
    if case["status"] == "done" and out.is_file():
        return out
    paths = [store.images / case_id / c["stored"] for c in case["cells"] if c["stored"]]
    if not paths:
        raise LeukotreeError("The case holds no stored cell.")
    patient_report(models.sources[name], paths, out, patient=case["patient"],
                   heatmaps=False, predictor=predictor,
                   options=models.options_with(aggregate=settings.aggregate,
                                               confidence=settings.confidence))
    return out
