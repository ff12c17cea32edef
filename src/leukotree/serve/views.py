"""The JSON view of a case, shared by the API and the pages."""

from __future__ import annotations

from typing import Any

from leukotree.serve.store import Store


def case_json(store: Store, case_id: str) -> dict[str, Any]:
    """``GET /api/cases/{id}``: status, sign-out and amendments, and when done the
    diagnosis and one entry per uploaded file (an unreadable one with its error).
    ``current_label`` is the diagnosis in force: the latest amendment's, else the
    sign-out's; ``model_version`` the lab's version that classified it (None: not yet,
    or a model outside the lab's versions)."""
    case = store.case(case_id)
    amendments = [{"label": r["label"], "reviewer": r["reviewer"], "at": r["at"],
                   "reason": r["note"]}
                  for r in store.reviews(case_id) if r["kind"] == "amendment"]
    out = {"id": case["id"], "patient": case["patient"], "model": case["model"],
           "model_version": case["model_version"],
           "status": case["status"], "error": case["error"], "created": case["created"],
           "n_cells": len(case["cells"]), "done_cells": case["done_cells"],
           "final_label": case["final_label"], "signed_by": case["signed_by"],
           "signed_at": case["signed_at"], "amendments": amendments,
           "current_label": amendments[-1]["label"] if amendments else case["final_label"]}
    out["kind"] = (case["result"] or {}).get("kind", "diagnosis")
    if case["status"] == "done":
        out["diagnosis"] = case["result"]
        out["cells"] = [{"index": c["idx"], "name": c["name"], "error": c["error"],
                         "reviewed_label": c["reviewed_label"],
                         "reviewed_cell_type": c["reviewed_cell_type"],
                         **(c["result"] or {"label": None, "probabilities": {},
                                            "referred": None})}
                        for c in case["cells"]]
        if out["kind"] == "cells":
            out["differential_count"] = reviewed_count(case["result"]["leaves"], out["cells"])
    return out


def reviewed_count(leaves: list[str], cells: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell-type case's differential count as reviewed: each cell under the reviewer's
    label, else the model's; a flagged cell a reviewer labelled counts as classified
    (:func:`~leukotree.patients.differential.differential_count`)."""
    from leukotree.patients.differential import differential_count

    labels = [None if c["error"] or c.get("label") is None
              else c["reviewed_label"] or c["label"] for c in cells]
    flagged = [bool(c.get("unclassifiable")) and not c["reviewed_label"] for c in cells]
    return differential_count(leaves, labels, flagged).to_dict()
