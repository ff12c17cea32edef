"""Metrics for tree classifiers: flat, hierarchical, per node, calibration, binary, patient.

Inputs are leaf probabilities ``P`` of shape ``(N, n_leaves)`` (rows sum to 1)
and the label of each image, which may be a leaf or an inner node. Node
probabilities are sums of leaf probabilities: ``P(node) = sum of P(leaf)`` over
the leaves below it.

The module sits at the bottom of the package's import graph (below models, patients,
inference, engine and evaluation): it imports only ``errors``, ``taxonomy`` and ``tree``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy
from leukotree.tree import decode_argmax, node_choices


def hierarchical_prf(taxonomy: Taxonomy, truth: Sequence[str], pred: Sequence[str],
                     ) -> dict[str, float]:
    """Set-based hierarchical precision, recall and F1 (Kiritchenko et al.; Silla & Freitas).

    With ``T_i`` the true label of image ``i`` plus its ancestors and ``P_i`` the
    prediction plus its ancestors (root excluded in both):

        hP = sum_i |P_i & T_i| / sum_i |P_i|
        hR = sum_i |P_i & T_i| / sum_i |T_i|
        hF = 2 hP hR / (hP + hR)

    A truth labelled at an inner node has a shorter ``T_i``, so predicting any leaf
    under it costs precision, not recall.
    """
    inter = n_pred = n_true = 0
    for t, p in zip(truth, pred, strict=True):
        ts, ps = set(taxonomy.path(t)), set(taxonomy.path(p))
        inter += len(ts & ps)
        n_pred += len(ps)
        n_true += len(ts)
    hp = inter / n_pred if n_pred else 0.0
    hr = inter / n_true if n_true else 0.0
    hf = 2 * hp * hr / (hp + hr) if hp + hr else 0.0
    return {"hP": hp, "hR": hr, "hF": hf}


def per_node_accuracy(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                      ) -> dict[str, dict[str, Any]]:
    """For each inner node: accuracy of choosing among its children.

    Only images whose true path passes through the node and continues below it
    count; the choice is the child with the highest probability ``P(child)``.
    """
    out: dict[str, dict[str, Any]] = {
        node: {"accuracy": None, "n": 0, "children": list(taxonomy.children(node))}
        for node in taxonomy.inner_nodes}
    for choice in node_choices(taxonomy, truth, leaf_probs):
        out[choice.node].update(accuracy=float(choice.hit.mean()), n=len(choice.rows))
    return out


def expected_calibration_error(probs: np.ndarray, correct_index: np.ndarray, bins: int = 15,
                               ) -> float:
    """Top-label ECE: ``sum_b (|B_b| / N) * |acc(B_b) - conf(B_b)|`` over equal-width bins."""
    if len(probs) == 0:
        return float("nan")
    conf = probs.max(1)
    hit = probs.argmax(1) == correct_index
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(hit[sel].mean() - conf[sel].mean())
    return float(ece)


def brier_score(probs: np.ndarray, correct_index: np.ndarray) -> float:
    """Multi-class Brier score: ``mean_i sum_c (p_ic - y_ic)^2``."""
    if len(probs) == 0:
        return float("nan")
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), correct_index] = 1
    return float(((probs - onehot) ** 2).sum(1).mean())


def reliability_bins(probs: np.ndarray, correct_index: np.ndarray, bins: int = 10,
                     ) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count (for a reliability diagram)."""
    conf = probs.max(1)
    hit = probs.argmax(1) == correct_index
    edges = np.linspace(0, 1, bins + 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        out["confidence"].append(float(conf[sel].mean()) if sel.any() else float("nan"))
        out["accuracy"].append(float(hit[sel].mean()) if sel.any() else float("nan"))
        out["count"].append(int(sel.sum()))
    return out


def binary_metrics(p_positive: np.ndarray, is_positive: np.ndarray, threshold: float = 0.5,
                   ) -> dict[str, float]:
    """Confusion counts and rates at ``P(positive) >= threshold``.

    sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), PPV = TP/(TP+FP),
    NPV = TN/(TN+FN), prevalence = (TP+FN)/N, F1 = 2TP/(2TP+FP+FN).
    """
    pred = p_positive >= threshold
    y = is_positive.astype(bool)
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())
    n = tp + tn + fp + fn

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    auc = float(roc_auc_score(y, p_positive)) if 0 < y.sum() < len(y) else float("nan")
    return {
        "tp": tp, "tn": tn, "fp": fp, "fn": fn, "threshold": float(threshold),
        "accuracy": ratio(tp + tn, n), "prevalence": ratio(tp + fn, n),
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn), "auc": auc,
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_for_sensitivity(p_positive: np.ndarray, is_positive: np.ndarray,
                              target: float) -> float:
    """The highest threshold whose sensitivity on these data is at least ``target``."""
    if not 0 < target <= 1:
        raise LeukotreeError(f"The target sensitivity must be in (0, 1]; got {target!r}.")
    pos = np.sort(p_positive[is_positive.astype(bool)])
    if len(pos) == 0:
        raise LeukotreeError("No positive images: cannot choose a threshold for sensitivity.")
    k = int(np.floor((1 - target) * len(pos) + 1e-9))
    return float(pos[min(k, len(pos) - 1)])


def classification_metrics(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                           ) -> dict[str, Any]:
    """Leaf-level metrics (on leaf-labelled images) plus hierarchical and per-node ones."""
    truth = list(truth)
    leaf_idx = taxonomy.encode_leaves(truth)
    exact = leaf_idx >= 0
    pred_idx = leaf_probs.argmax(1)
    present = sorted(set(leaf_idx[exact].tolist()))
    names = [taxonomy.leaves[i] for i in present]
    out: dict[str, Any] = {
        "n_images": len(truth),
        "n_leaf_labelled": int(exact.sum()),
        "leaves_present": names,
        "leaves_absent": [leaf for leaf in taxonomy.leaves if leaf not in names],
    }
    y, yp, p = leaf_idx[exact], pred_idx[exact], leaf_probs[exact]
    if len(y):
        out["accuracy"] = float(accuracy_score(y, yp))
        out["macro_f1"] = float(f1_score(y, yp, labels=present, average="macro",
                                         zero_division=0))
        out["weighted_f1"] = float(f1_score(y, yp, labels=present, average="weighted",
                                            zero_division=0))
        out["auroc_macro"] = _auroc(y, p, present)
        prec, rec, f1, sup = precision_recall_fscore_support(
            y, yp, labels=present, zero_division=0)
        out["per_class"] = {
            name: {"precision": float(a), "recall": float(b), "f1": float(c), "support": int(d)}
            for name, a, b, c, d in zip(names, prec, rec, f1, sup, strict=True)}
        labels_all = list(range(len(taxonomy.leaves)))
        out["confusion_matrix"] = {
            "labels": list(taxonomy.leaves),
            "matrix": confusion_matrix(y, yp, labels=labels_all).tolist(),
        }
        out["calibration"] = {"leaves": {"ece": expected_calibration_error(p, y),
                                         "brier": brier_score(p, y)}}
    mask = taxonomy.leaf_mask(truth)
    out["tree_accuracy"] = float(mask[np.arange(len(truth)), pred_idx].mean()) if truth else None
    out["hierarchical"] = hierarchical_prf(taxonomy, truth, decode_argmax(taxonomy, leaf_probs))
    out["per_node"] = per_node_accuracy(taxonomy, truth, leaf_probs)
    out.setdefault("calibration", {})["per_node"] = _node_calibration(taxonomy, truth,
                                                                      leaf_probs)
    return out


def _auroc(y: np.ndarray, probs: np.ndarray, present: list[int]) -> float | None:
    if len(present) < 2:
        return None
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    if len(present) == 2:  # binary AUROC among the two present leaves
        return float(roc_auc_score(y == present[1], sub[:, 1]))
    try:
        return float(roc_auc_score(y, sub, multi_class="ovr", labels=present, average="macro"))
    except ValueError:
        return None


def _node_calibration(taxonomy: Taxonomy, truth: list[str], leaf_probs: np.ndarray,
                      ) -> dict[str, dict[str, float]]:
    return {c.node: {"ece": expected_calibration_error(c.cond, c.target),
                     "brier": brier_score(c.cond, c.target)}
            for c in node_choices(taxonomy, truth, leaf_probs)}
