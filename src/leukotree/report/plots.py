"""PNG figures: learning curves, confusion matrices, ROC curves, reliability diagrams,
conformal coverage against the risk asked.

Drawn on :class:`matplotlib.figure.Figure` objects directly (never ``pyplot``), so no
backend is switched and no global state is left behind. A function returns ``None``
when there is nothing to draw.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height))


def _save(fig: Figure, path: Path) -> Path:
    with warnings.catch_warnings():  # long class names may not fit; the figure is kept
        warnings.simplefilter("ignore", UserWarning)
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def learning_curves(history: Sequence[dict[str, float]], path: Path) -> Path | None:
    if not history:
        return None
    epochs = [h["epoch"] for h in history]
    fig = _figure(10, 4)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val loss (NLL)")
    ax1.set_xlabel("epoch")
    ax1.legend()
    ax2.plot(epochs, [h["val_accuracy"] for h in history], label="val accuracy")
    ax2.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro F1")
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1)
    ax2.legend()
    return _save(fig, path)


def confusion(matrix: np.ndarray, labels: Sequence[str], path: Path, *, normalize: bool,
              ) -> Path | None:
    m = np.asarray(matrix, dtype=float)
    if normalize:
        m = m / np.clip(m.sum(1, keepdims=True), 1, None)
    n = len(labels)
    fig = _figure(1.0 + 0.7 * n, 0.8 + 0.6 * n)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if m[i, j] > 0.6 * m.max() else "black")
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else ""))
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def roc_curves(truth_index: np.ndarray, probs: np.ndarray, labels: Sequence[str], path: Path,
               ) -> Path | None:
    """One-vs-rest ROC curve of every leaf present in ``truth_index``."""
    if len(truth_index) == 0:
        return None
    from sklearn.metrics import auc, roc_curve

    fig = _figure(5, 5)
    ax = fig.subplots()
    for k, name in enumerate(labels):
        y = truth_index == k
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = roc_curve(y, probs[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("ROC, one vs rest")
    return _save(fig, path)


def reliability(bins: dict[str, list[float]], path: Path,
                before: dict[str, list[float]] | None = None) -> Path | None:
    """Accuracy per confidence bin; with ``before`` (the uncalibrated model's bins) both
    curves, before and after temperature scaling."""
    conf = np.array(bins["confidence"], dtype=float)
    acc = np.array(bins["accuracy"], dtype=float)
    ok = ~np.isnan(conf)
    fig = _figure(5, 5)
    ax = fig.subplots()
    edges = np.linspace(0, 1, len(conf) + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    ax.bar(centers[ok], acc[ok], width=1 / len(conf), edgecolor="k", alpha=0.7,
           label="accuracy" if before is None else "accuracy (calibrated)")
    if before is not None:
        b_conf = np.array(before["confidence"], dtype=float)
        b_acc = np.array(before["accuracy"], dtype=float)
        b_ok = ~np.isnan(b_conf)
        ax.plot(b_conf[b_ok], b_acc[b_ok], "o-", color="tab:red",
                label="before temperature scaling")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title("reliability diagram")
    return _save(fig, path)


def coverage_curve(points: Sequence[dict[str, float]], path: Path, own: float | None = None,
                   ) -> Path | None:
    """Empirical coverage (and share of leaf answers) against the coverage asked,
    ``1 - alpha``, of conformal answers fitted at each ``alpha``; ``own`` marks the
    model's."""
    if not points:
        return None
    target = np.array([1 - p["alpha"] for p in points])
    fig = _figure(5, 5)
    ax = fig.subplots()
    ax.plot(target, [p["coverage"] for p in points], "o-", label="coverage of these cells")
    ax.plot(target, [p["leaf_share"] for p in points], "s--", color="tab:gray",
            label="answers that are a leaf")
    low = min(float(target.min()), min(p["coverage"] for p in points)) - 0.02
    ax.plot([low, 1], [low, 1], "k--", lw=0.8, label="coverage asked")
    if own is not None:
        ax.axvline(1 - own, color="tab:red", lw=0.8, label=f"the model's ({1 - own:g})")
    ax.set_xlabel("coverage asked (1 - alpha), fitted on the validation split")
    ax.set_ylabel("share of cells")
    ax.set_ylim(0, 1.01)
    ax.legend()
    ax.set_title("conformal answers: coverage against the risk asked")
    return _save(fig, path)
