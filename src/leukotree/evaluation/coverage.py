"""The ``conformal`` section of ``evaluate``'s metrics: how the model's conformal answers
(:mod:`leukotree.inference.conformal`) do on labelled cells.

- ``coverage``: the share of cells whose answer node holds their true class, with a 95%
  interval: resampling whole patients (:func:`~.compare.bootstrap_ci`) when every cell
  has a patient id, else the Wilson score interval
  ``(p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)``, ``z = 1.96``;
- ``mean_depth`` (the root is 0, its children 1), ``mean_leaves`` (leaves below the
  answer) and ``leaf_share`` (answers that are a leaf); ``per_class`` coverage by true
  label;
- ``curve``: for several ``alpha``, the threshold fitted again on the run's validation
  split and the coverage it reaches on these cells (the coverage-vs-alpha figure); left
  out, with the reason in ``curve_skipped``, when the model has no validation split of
  its own.

The guarantee ``P(miss) <= alpha`` holds for cells exchangeable with the cells the
threshold was fitted on; when the domain-shift alarm is raised on these cells the
section's ``note`` says that it does not transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from leukotree.errors import LeukotreeError
from leukotree.evaluation.compare import bootstrap_ci
from leukotree.inference.conformal import (
    ConformalAnswers,
    answer_nodes,
    covered,
    fit_conformal,
    min_cells,
)
from leukotree.inference.loader import LoadedModel
from leukotree.inference.predict import validation_probs
from leukotree.inference.predictor import Predictor
from leukotree.report import plots
from leukotree.rundir import EvalDir
from leukotree.taxonomy import Taxonomy

#: The risks of the coverage-vs-alpha figure.
ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ``hits / n`` (module docstring);
    ``(nan, nan)`` for no cells."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def shift_note() -> str:
    """What the section says when the domain-shift alarm is raised."""
    return ("The domain-shift alarm is raised on these cells: the coverage guarantee holds "
            "for cells like those the threshold was fitted on and does not transfer to "
            "these. Re-calibrate with 'leukotree calibrate RUN LABELLED --out RUN2' on "
            "labelled cells of this lab.")


def conformal_metrics(taxonomy: Taxonomy, truth: Sequence[str], probs: np.ndarray,
                      answers: ConformalAnswers, patients: Sequence[str | None] = (),
                      shifted: bool = False) -> dict[str, Any]:
    """The section's figures on labelled cells (``truth``, leaf ``probs``; ``patients``
    their ids, for the bootstrap interval; ``shifted``: the domain-shift alarm is
    raised)."""
    nodes = answer_nodes(taxonomy, probs, answers)
    hit = covered(taxonomy, truth, nodes)
    n = len(truth)
    if n and patients and all(patients):
        ci, method = bootstrap_ci(hit, np.array(patients)), "patient bootstrap"
    else:
        ci, method = wilson_interval(int(hit.sum()), n), "Wilson (binomial)"
    sizes = np.array([len(taxonomy.descendant_leaves(v)) for v in nodes])
    depths = np.array([0 if v == taxonomy.root else taxonomy.depth(v) for v in nodes])
    per_class = {}
    for label in dict.fromkeys(truth):
        rows = [i for i, t in enumerate(truth) if t == label]
        per_class[label] = {"n": len(rows), "coverage": float(hit[rows].mean())}
    out: dict[str, Any] = {
        "mode": answers.mode, "alpha": answers.alpha, "target_coverage": 1 - answers.alpha,
        "fitted_on": answers.n, "n": n,
        "coverage": float(hit.mean()) if n else math.nan, "coverage_ci95": list(ci),
        "ci_method": method, "mean_depth": float(depths.mean()) if n else math.nan,
        "mean_leaves": float(sizes.mean()) if n else math.nan,
        "leaf_share": float((sizes == 1).mean()) if n else math.nan, "per_class": per_class}
    if shifted:
        out["note"] = shift_note()
    return out


def coverage_curve(taxonomy: Taxonomy, val_truth: Sequence[str], val_probs: np.ndarray,
                   truth: Sequence[str], probs: np.ndarray, mode: str,
                   alphas: Sequence[float] = ALPHAS) -> list[dict[str, float]]:
    """For each ``alpha`` the validation cells can support (``min_cells``), the threshold
    fitted on them and the coverage and leaf share it gives ``truth``/``probs``."""
    points = []
    for alpha in alphas:
        if len(val_truth) < min_cells(alpha):
            continue
        try:
            answers = fit_conformal(taxonomy, val_truth, val_probs, alpha, mode, "validation")
        except LeukotreeError:  # a Mondrian class with too few cells at this alpha
            continue
        nodes = answer_nodes(taxonomy, probs, answers)
        sizes = np.array([len(taxonomy.descendant_leaves(v)) for v in nodes])
        points.append({"alpha": alpha,
                       "coverage": float(covered(taxonomy, truth, nodes).mean()),
                       "leaf_share": float((sizes == 1).mean())})
    return points


def conformal_section(loaded: LoadedModel, predictor: Predictor, truth: Sequence[str],
                      probs: np.ndarray, patients: Sequence[str | None], shifted: bool,
                      out: Path, *, batch_size: int = 64, tta: bool = False,
                      ) -> tuple[dict[str, Any], str | None]:
    """The ``conformal`` section of the model's answers (``predictor.conformal``) on
    these cells, and the coverage-vs-alpha figure written into the evaluation folder
    ``out`` (its file name; None when skipped, the reason in ``curve_skipped``)."""
    answers = predictor.conformal
    if answers is None:
        raise ValueError("the predictor has no conformal answers")
    taxonomy = predictor.taxonomy
    section = conformal_metrics(taxonomy, truth, probs, answers, patients, shifted)
    val = _validation(loaded, predictor, batch_size, tta)
    if isinstance(val, str):
        section["curve_skipped"] = val
        return section, None
    section["curve"] = coverage_curve(taxonomy, *val, truth, probs, answers.mode)
    path = plots.coverage_curve(section["curve"], out / EvalDir.COVERAGE,
                                own=answers.alpha)
    return section, None if path is None else path.name


def _validation(loaded: LoadedModel, predictor: Predictor, batch_size: int, tta: bool,
                ) -> tuple[list[str], np.ndarray] | str:
    """The run's validation labels and probabilities, or why there are none to refit on."""
    if not loaded.is_single or loaded.kind != "run":
        return "no single validation split (a cv or ensemble folder, or an ONNX file)"
    if (loaded.payload.get("extra") or {}).get("calibrated"):
        return ("the answers were fitted by 'leukotree calibrate' on cells the run folder "
                "does not keep; its validation split is of the first lab")
    if not loaded.run_dir("").read_split("val"):
        return "the run has no validation split"
    truth, probs = validation_probs(loaded, predictor, batch_size, tta)
    return truth, probs.astype(np.float64)
