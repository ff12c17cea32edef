"""A model version's figures on labelled cells: the audit cells and the source run's
validation images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.inference.predictor import Predictor, predict_paths
from leukotree.lab.gate import accuracy_ci
from leukotree.metrics import expected_calibration_error
from leukotree.rundir import RunDir


@dataclass(frozen=True)
class Scored:
    """Per-cell correctness (unreadable cells left out) and the figures derived from it."""

    correct: list[bool]
    figures: dict[str, Any]


def score(predictor: Predictor, paths: Sequence[Path], labels: Sequence[str], *,
          batch_size: int = 64, config: Any = None) -> Scored:
    """The model's figures on labelled cells: ``n`` (readable cells), ``accuracy`` (the
    share whose most probable leaf is the label) with its percentile-bootstrap 95%
    interval ``ci``, the leaf ``ece`` (:func:`~leukotree.metrics.expected_calibration_error`)
    and ``flagged``, the share the model flags unclassifiable (out of distribution)."""
    leaves = list(predictor.taxonomy.leaves)
    unknown = sorted({label for label in labels if label not in leaves})
    if unknown:
        raise LeukotreeError(f"Labels {', '.join(unknown)} are not leaves of the model's "
                             f"taxonomy ({', '.join(leaves)}).")
    if not paths:
        return Scored([], {"n": 0, "accuracy": None, "ci": None, "ece": None,
                           "flagged": None})
    preds = predict_paths(predictor, list(paths), batch_size=batch_size, progress=False,
                          on_error="report", config=config)
    ok = preds.ok
    probs = preds.leaf_probs[ok]
    truth = np.array([leaves.index(label) for label, good in zip(labels, ok, strict=True)
                      if good], dtype=int)
    correct = [bool(x) for x in probs.argmax(1) == truth] if len(truth) else []
    n = len(correct)
    ci = accuracy_ci(correct)
    return Scored(correct, {
        "n": n, "accuracy": float(np.mean(correct)) if n else None,
        "ci": list(ci) if ci else None,
        "ece": expected_calibration_error(probs, truth) if n else None,
        "flagged": float(preds.unclassifiable[ok].mean()) if n else None})


def source_validation(run: str | Path) -> tuple[list[Path], list[str]]:
    """The validation images of the source run (its ``split.csv``) and their labels."""
    rundir = RunDir(run)
    if not rundir.split.is_file():
        raise LeukotreeError(f"'{run}' keeps no split.csv: the lab loop needs the source run "
                             "folder (its validation images show what a fine-tune forgot).")
    rows = rundir.read_split("val")
    return [Path(r["path"]) for r in rows], [r["label"] for r in rows]
