"""The review queue of ``leukotree serve``: the cells of open cases worth a technologist's
review, chosen by the same library policy as ``leukotree select``
(:func:`leukotree.lab.select.select_cells`) on the per-cell results the worker stored.

Candidates are the classified cells of done cases that are not signed out and not
reviewed yet, of one served model (the queue feeds that model's next version; default:
the first served model). A cell's audit flag was decided when its case was stored
(:class:`~leukotree.serve.store.Store`); the queue's audit share is drawn at random from
the audit cells, the rest chosen by the policy among the others. The ids are
``case:index``, so the queue is the same from one request to the next, less the cells
reviewed meanwhile. Duplicates are cells with the same bytes (the stored digest). When
the model states conformal answers, the worker stored each cell's ``answer_node`` and
``answer_leaves``; the pool then carries the answer sizes, and the policy weighs them
as ``leukotree select`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leukotree.lab.select import AUDIT_SHARE, Pool, check_request, file_digest, select_cells
from leukotree.serve.store import Store
from leukotree.serve.worker import Models

#: Most cells one queue request returns.
MAX_QUEUE = 1000


def candidate_pool(store: Store, models: Models, model: str | None = None,
                   ) -> tuple[str, Pool, list[dict[str, Any]]]:
    """The served model's name, the :class:`~leukotree.lab.select.Pool` of its review
    candidates (leaf probabilities, out-of-distribution scores and conformal answers as
    stored; scores and answers only when every candidate has one) and the candidates'
    rows (:meth:`~leukotree.serve.store.Store.review_candidates`)."""
    name, predictor = models.get(model)
    leaves = predictor.taxonomy.leaves
    rows = store.review_candidates(name)
    probs = np.array([[float(r["result"]["probabilities"].get(leaf, np.nan)) for leaf in leaves]
                      for r in rows], dtype=np.float64).reshape(len(rows), len(leaves))
    scored = rows and all(r["result"].get("ood_score") is not None for r in rows)
    answered = rows and all(r["result"].get("answer_leaves") for r in rows)
    pool = Pool([f"{r['case_id']}:{r['idx']}" for r in rows], leaves, probs,
                patients=[r["patient"] for r in rows],
                ood_score=np.array([float(r["result"]["ood_score"]) for r in rows])
                if scored else None,
                answer_nodes=[r["result"]["answer_node"] for r in rows] if answered else None,
                answer_sizes=np.array([len(r["result"]["answer_leaves"]) for r in rows])
                if answered else None,
                digests=[r["digest"] or file_digest(store.images / r["case_id"] / r["stored"])
                         for r in rows],
                audit=np.array([bool(r["audit"]) for r in rows], dtype=bool))
    return name, pool, rows


def review_queue(store: Store, models: Models, n: int, *, model: str | None = None,
                 policy: str = "active", audit_share: float = AUDIT_SHARE, seed: int = 0,
                 ) -> dict[str, Any]:
    """``GET /api/review-queue``: up to ``n`` cells (all that are left when fewer), each
    ``{"case", "index", "audit", "reason", "label", "p", "ood_score", "patient",
    "name"}``, with the model, the policy and how many cells were candidates."""
    check_request(n, audit_share, policy)  # refused even when nothing is waiting
    name, pool, rows = candidate_pool(store, models, model)
    out: dict[str, Any] = {"model": name, "policy": policy, "n_candidates": len(rows),
                           "cells": []}
    if not rows:
        return out
    for pick in select_cells(pool, n, policy=policy, audit_share=audit_share, seed=seed,
                             fill=True):
        row = rows[pick.index]
        out["cells"].append({"case": row["case_id"], "index": row["idx"], "audit": pick.audit,
                             "reason": pick.reason, "label": pick.predicted,
                             "p": round(pick.p, 4), "ood_score": pick.ood,
                             "patient": row["patient"], "name": row["name"]})
    return out
