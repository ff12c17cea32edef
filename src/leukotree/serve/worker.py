"""The models ``leukotree serve`` holds, and the classification of a case off the request
thread (one case at a time, in order; the app stays responsive meanwhile).

A case's result uses the same library calls as ``predict --by-patient``: every cell's
tree probabilities and referral, and the patient's diagnosis from the run's
patient-level model or by aggregating its cells, with the referral reason and the
differential count of predicted cell types.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.data.discover import InputImage
from leukotree.errors import LeukotreeError
from leukotree.inference.conformal import answer_text
from leukotree.inference.decisions import parse_thresholds
from leukotree.inference.evidence import refer_thin
from leukotree.inference.loader import LoadedModel, load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predict import (
    PredictResult,
    differentials,
    evidence_of,
    patient_decisions,
    prediction_rows,
)
from leukotree.inference.predictor import Predictions, Predictor, predict_paths
from leukotree.serve.store import Store


@dataclass(frozen=True)
class Served:
    """One served model as it is at one moment: what the worker classifies a case with."""

    name: str
    loaded: LoadedModel
    predictor: Predictor
    view: Any
    version: int | None


class Models:
    """The served models by name (a run folder, its ``.pt``, an ``.onnx``, a cv or an
    ensemble folder: :func:`~leukotree.inference.loader.load`), each with its predictor
    (``options.engine``) and the view its images are decoded with (``options.crop_mode``
    and ``options.pixel_size``, None: each model's own;
    :meth:`~leukotree.inference.options.InferenceOptions.input_config`). The lab's
    promotions exchange a model under its name (:meth:`swap`); the worker takes each
    case's model all of a piece (:meth:`current`)."""

    def __init__(self, runs: Sequence[str | Path],
                 options: InferenceOptions | None = None) -> None:
        if not runs:
            raise LeukotreeError("leukotree serve needs at least one RUN (a run folder, "
                                 "model file, cv or ensemble folder).")
        #: The options the models were served with (never changed: see :meth:`options_with`).
        self.options = options or InferenceOptions()
        engine = self.options.engine
        self.loaded: dict[str, LoadedModel] = {}
        self.predictors: dict[str, Predictor] = {}
        #: How each model decodes the served images (a new configuration; the loaded
        #: model's own is left as it is).
        self.views: dict[str, Any] = {}
        for run in runs:
            name = Path(run).stem if Path(run).is_file() else Path(run).name
            while name in self.predictors:
                name += "+"
            loaded = load(run)
            predictor = loaded.predictor(engine)
            self.views[name] = self.options.input_config(predictor.model_config, source=run)
            self.loaded[name], self.predictors[name] = loaded, predictor

        #: The lab's version of each served model (the first model is under the lab's
        #: versions once the app starts; the others are served as given: None).
        self.versions: dict[str, int | None] = dict.fromkeys(self.predictors)
        self._torch: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: Grad-CAM hooks a model's layers: one heat map at a time.
        self.explain_lock = threading.Lock()

    @property
    def sources(self) -> dict[str, str]:
        """Each served model's path, as given."""
        return {name: str(loaded.source) for name, loaded in self.loaded.items()}

    def torch_model(self, name: str | None) -> Any:
        """The PyTorch model behind a served model (an ensemble's first member), for heat
        maps only: loaded once from the served checkpoint, a copy apart from the one the
        worker predicts with (Grad-CAM hooks its layers). A bare ``.onnx`` file has none."""
        name = self.get(name)[0]
        with self._lock:
            if name not in self._torch:
                self._torch[name] = self.loaded[name].first_run().torch_model()
            return self._torch[name]

    def options_with(self, **changes: Any) -> InferenceOptions:
        """The served options with ``changes`` (e.g. the app's aggregation and confidence),
        for commands run on stored cells (the case report): a new object, checked; the
        served options stay as they were."""
        return replace(self.options, **changes)

    def swap(self, name: str, run: str | Path, version: int) -> None:
        """Serve ``run`` as model ``name`` (the lab's ``version``) from now on: the new
        model is loaded first, then exchanged at once; a case already being classified
        finishes with the model it started with (:meth:`current`)."""
        loaded = load(run)
        predictor = loaded.predictor(self.options.engine)
        view = self.options.input_config(predictor.model_config, source=run)
        with self._lock:
            self.loaded[name], self.predictors[name] = loaded, predictor
            self.views[name], self.versions[name] = view, version
            self._torch.pop(name, None)

    def set_version(self, name: str, version: int | None) -> None:
        with self._lock:
            self.versions[name] = version

    def current(self, name: str | None) -> Served:
        """What model ``name`` is now, all of a piece (a swap cannot fall between)."""
        name = self.get(name)[0]
        with self._lock:
            return Served(name, self.loaded[name], self.predictors[name], self.views[name],
                          self.versions[name])

    @property
    def default(self) -> str:
        return next(iter(self.predictors))

    def get(self, name: str | None) -> tuple[str, Predictor]:
        name = name or self.default
        if name not in self.predictors:
            raise LeukotreeError(f"No model '{name}' is served; choose one of "
                                 f"{', '.join(self.predictors)}.")
        return name, self.predictors[name]


class Worker:
    """Classifies queued cases one after another in a background thread."""

    def __init__(self, store: Store, models: Models, *, confidence: str | None = "0.6",
                 aggregate: str = "majority", batch_size: int = 64, workers: int = 2) -> None:
        self.store, self.models = store, models
        self.confidence, self.aggregate = confidence, aggregate
        self.batch_size, self.workers = batch_size, workers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leukotree-case")
        self._lock = threading.Lock()
        self.futures: dict[str, Future] = {}

    def submit(self, case_id: str) -> None:
        with self._lock:
            self.futures[case_id] = self._pool.submit(self._run, case_id)

    def resume_pending(self) -> None:
        """Queue again what a restart interrupted."""
        for case_id in self.store.pending():
            self.store.set_status(case_id, "queued")
            self.submit(case_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _run(self, case_id: str) -> None:
        try:
            self.store.set_status(case_id, "running")
            self.classify(case_id)
        except Exception as err:  # the case fails with its reason; the server goes on
            message = str(err) if isinstance(err, LeukotreeError) else \
                f"{type(err).__name__}: {err}"
            self.store.set_status(case_id, "failed", message)

    def classify(self, case_id: str) -> None:
        """Predict every readable cell of the case and store cells and diagnosis."""
        case = self.store.case(case_id)
        served = self.models.current(case["model"])
        predictor = served.predictor
        cells = [c for c in case["cells"] if c["stored"] is not None]
        paths = [self.store.images / case_id / c["stored"] for c in cells]
        preds = predict_paths(predictor, paths, batch_size=self.batch_size,
                              workers=self.workers, progress=False, on_error="report",
                              on_chunk=lambda n: self.store.set_progress(case_id, n),
                              config=served.view, max_pixels=self.models.options.max_pixels)
        thresholds = parse_thresholds(self.confidence, predictor.taxonomy.max_depth)
        result = PredictResult(predictor.taxonomy, [InputImage(p, case["patient"])
                                                    for p in paths],
                               preds, thresholds, predictor.engine,
                               patient_model=predictor.patient_model,
                               cell_taxonomy=predictor.cell_taxonomy,
                               expected_ood=predictor.expected_ood,
                               conformal=predictor.conformal)
        rows = prediction_rows(result)
        cell_results = [{"idx": c["idx"], "error": r["error"] or None,
                         "result": None if r["error"] else _cell_result(result, r, k)}
                        for k, (c, r) in enumerate(zip(cells, rows, strict=True))]
        self.write_report(case_id, served, preds)
        self.store.save_results(case_id, cell_results,
                                _diagnosis(result, case["patient"], self.aggregate),
                                served.version)


    def write_report(self, case_id: str, served: Served, preds: Predictions) -> None:
        """The case's offline report (``Store.reports``) from these very predictions: the
        engine and decoding the case page shows, no second prediction. None is written
        when no report can be made (no readable or classifiable cell); the report's route
        then says why."""
        from leukotree.report.patient import write_patient_report

        out = self.store.reports / f"{case_id}.html"
        out.unlink(missing_ok=True)
        case = self.store.case(case_id)
        try:
            write_patient_report(served.loaded, served.predictor, preds,
                                 out, view=served.view, patient=case["patient"],
                                 method=self.aggregate, confidence=self.confidence,
                                 heatmaps=False)
        except LeukotreeError:
            out.unlink(missing_ok=True)


def _cell_result(result: PredictResult, row: dict[str, Any], k: int) -> dict[str, Any]:
    out = {"label": row["predicted_leaf"], "referred": bool(row["refer"]),
           "reported_node": row["reported_node"], "message": row["message"],
           "probabilities": {n: row[f"p_{n}"] for n in result.taxonomy.nodes}}
    if "unclassifiable" in row:
        out["unclassifiable"] = bool(row["unclassifiable"])
        out["ood_score"] = row["ood_score"]
    if row.get("answer_node"):  # the model states conformal answers
        out["answer_node"] = row["answer_node"]
        out["answer_leaves"] = row["answer_leaves"].split("|")
        out["answer"] = answer_text(result.taxonomy, result.predictions.leaf_probs[k],
                                    row["answer_node"])
    cells = result.cell_taxonomy
    if cells is not None and result.predictions.cell_probs is not None:
        probs = result.predictions.cell_probs[k]
        out["cell_type"] = cells.leaves[int(np.argmax(probs))]
        out["cell_type_probabilities"] = {leaf: round(float(p), 4)
                                          for leaf, p in zip(cells.leaves, probs, strict=True)}
    return out


def _diagnosis(result: PredictResult, patient: str, aggregate: str) -> dict[str, Any]:
    """The case's diagnosis, its referral, the differential and each cell's weight; for a
    model of cell types (taxonomy kind ``cells``) no diagnosis but the differential count
    (:func:`_cell_count`)."""
    if result.taxonomy.kind == "cells":
        return _cell_count(result)
    ok = result.predictions.ok
    if not ok.any():
        return {"label": None, "referred": True, "reason": "no readable cell",
                "probabilities": {}, "n_cells": 0}
    decision = patient_decisions(result, aggregate, 1)[0]
    tax = result.taxonomy
    ev = evidence_of(result, aggregate)[decision.patient]  # as predict --by-patient
    positive = None if result.patient_model is None else result.patient_model.positive
    decision = refer_thin(tax, decision, ev, None, positive)
    return {
        "label": decision.leaf, "referred": decision.refer, "reason": decision.reason,
        "reported_node": decision.reported_node, "n_cells": decision.n_cells,
        "probabilities": {n: round(float(decision.node_probs[tax.node_index[n]]), 4)
                          for n in tax.nodes},
        "model": decision.model, "threshold": decision.threshold, "call": decision.call,
        "miss_rate": None if decision.miss_rate is None else {
            "alpha": decision.miss_rate.alpha, "confidence": decision.miss_rate.confidence,
            "statement": result.patient_model.promise() if result.patient_model else None},
        "differential": differentials(result).get(patient, {}),
        "n_unclassifiable": int(result.predictions.unclassifiable.sum()),
        "domain_shift": result.domain_shift(),
        "n_informative": ev.n_informative, "domain_alarm": ev.alarm is not None,
        "interval": None if ev.low is None or ev.high is None else {
            leaf: [round(float(lo), 4), round(float(hi), 4)]
            for leaf, lo, hi in zip(tax.leaves, ev.low, ev.high, strict=True)},
    }


def _cell_count(result: PredictResult) -> dict[str, Any]:
    """A cell-type model's case: the differential count of its cells
    (:func:`~leukotree.patients.differential.differential_count`; the case page counts
    again with the reviewers' labels), never a majority "diagnosis"."""
    from leukotree.patients.differential import differential_count

    preds, tax = result.predictions, result.taxonomy
    labels = [tax.leaves[int(np.argmax(p))] if ok else None
              for p, ok in zip(np.nan_to_num(preds.leaf_probs), preds.ok, strict=True)]
    count = differential_count(tax.leaves, labels, preds.unclassifiable)
    return {"kind": "cells", "label": None, "referred": False, "reason": "",
            "probabilities": {}, "n_cells": count.n_classified, "leaves": list(tax.leaves),
            "differential_count": count.to_dict(),
            "n_unclassifiable": count.n_unclassifiable,
            "domain_shift": result.domain_shift() if preds.ok.any() else None}
