"""Calibration and out-of-distribution scores that travel inside the model.

Temperature scaling per tree node (Guo et al. 2017, applied to each conditional choice
of the tree): at inner node ``n`` with children ``c``,

    P'(c | n) = softmax_c( log P(c | n) / T_n ),   P'(leaf) = prod over its path of P'(c | n)

so the tree stays consistent and the most probable child at every node is unchanged.
Each ``T_n`` minimises the negative log-likelihood of the true child on the validation
images whose true path passes ``n`` (:func:`fit_temperatures`). Since ``log P(leaf)`` is
the sum of the conditional log-probabilities along its path, these independent fits
also minimise the leaf-level NLL (:func:`tree_nll`).

Distance-aware softening (after Tomani et al. 2023's density-aware calibration): the
tempered leaf probabilities of a cell far from the training cells, e.g. another lab's,
are softened further by a leaf-level temperature

    P''(leaf) = softmax_leaf( log P'(leaf) / g(x) ),   g(x) = clip(s(x) / s_med, 1/4, 1e3) ** beta,

``s`` its out-of-distribution score below and ``s_med`` the median score of the
validation cells: a typical validation cell is left as it is, a distant one is softened,
one nearer than the median sharpened a little (the ratio is floored at 1/4; the nearest
in-lab cells measured sit at about 1/3), and no cell's most probable leaf changes.
``beta`` in :data:`POWER_RANGE` minimises the validation NLL given the fitted ``T_n``
(:func:`fit_distance_power`; 0, no softening, when it does not lower it). Both
temperings invert: ``g`` by ``1 / g`` on the log probabilities, ``T_n`` by ``1 / T_n``.

Feature-space distance (Lee et al. 2018): the squared Mahalanobis distance of a cell's
pooled features ``f`` to the nearest class mean of the training cells,

    d(f) = min_k (f - mu_k)^T S^-1 (f - mu_k),

with one covariance ``S`` of the class-centred training features (Ledoit-Wolf
shrinkage). Like Lee et al.'s feature ensemble, it is taken at several depths of the
backbone: ``f_s`` the globally averaged feature map of stage ``s`` (the last
``ood_layers`` stages; 3 by default), each with its own means and covariance, and

    D(f) = sum_s d_s(f_s) / q_s,

``q_s`` the ``quantile`` of ``d_s`` on the validation cells, so that every stage weighs
alike (early stages see texture and colour, the last one the cell type; one stage: the
pooled features alone, ``q = 1``). A cell whose ``D`` exceeds the threshold chosen on
the validation split (the same ``quantile``, 0.95 by default: 5% of in-distribution
cells flagged) is "unclassifiable": unlike the cells the model was trained on. Models
output the ratio ``ood_score = D / threshold``, so the rule is ``ood_score > 1`` for
one model and for an ensemble's mean alike.

Both are modules (:class:`TreeTemperature`, :class:`FeatureDistance`) that a
:class:`~leukotree.models.heads.TreeClassifier` applies in its forward pass, so PyTorch,
the exported ONNX graph and every caller see the same numbers; their fitted values are
stored in the checkpoint (``calibration`` and ``ood`` sections).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from leukotree.taxonomy import Taxonomy
from leukotree.tree import node_choices

#: Temperatures are searched in [1/20, 20].
T_RANGE = (0.05, 20.0)
#: A node keeps T = 1 below this many validation images.
MIN_IMAGES = 20
#: The distance power ``beta`` is searched in [0, 2].
POWER_RANGE = (0.0, 2.0)
_NEG = -1e9  # log(0) that stays finite in exported graphs


#: Bounds of the ratio ``s / s_med`` in the distance factor.
RATIO_RANGE = (0.25, 1e3)


def distance_factor(score: torch.Tensor, power: float, ref: float) -> torch.Tensor:
    """``g = clip(score / ref, *RATIO_RANGE) ** power`` per cell (module docstring)."""
    return (score.float() / ref).clamp(*RATIO_RANGE) ** power


def soften(leaf_probs: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """``softmax(log P / g)`` per cell, ``g = factor`` ``(N,)`` (for reports; ``1 / g``
    undoes ``g``)."""
    logp = np.log(np.clip(leaf_probs, 1e-12, None)) / np.asarray(factor, np.float64)[:, None]
    logp -= logp.max(1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(1, keepdims=True)


class TreeTemperature(nn.Module):
    """Leaf log-probabilities ``(B, n_leaves)`` -> the same with every inner node's
    conditional choice tempered by its ``T_n``, then, with a ``distance_power`` and the
    cells' ``ood_score``, softened per cell (see the module docstring)."""

    def __init__(self, taxonomy: Taxonomy, temperatures: Mapping[str, float],
                 distance_power: float = 0.0, distance_ref: float = 1.0) -> None:
        super().__init__()
        if not distance_ref > 0:
            raise ValueError(f"distance_ref must be positive, got {distance_ref}")
        self.distance_power = float(distance_power)
        self.distance_ref = float(distance_ref)
        below = list(taxonomy.nodes)  # every node but the root
        nodes = [*below, taxonomy.root]
        member = np.vstack([taxonomy.node_leaf_matrix().astype(bool),
                            np.ones((1, len(taxonomy.leaves)), bool)])  # (n_nodes + 1, leaves)
        parent = [nodes.index(taxonomy.parent(n)) for n in below]
        siblings = np.array([[taxonomy.parent(a) == taxonomy.parent(b) for b in below]
                             for a in below])
        inv_t = [1.0 / float(temperatures.get(taxonomy.parent(n), 1.0)) for n in below]
        self.register_buffer("log_member", torch.tensor(np.where(member, 0.0, _NEG),
                                                        dtype=torch.float32), persistent=False)
        self.register_buffer("below", torch.tensor([nodes.index(n) for n in below]),
                             persistent=False)
        self.register_buffer("parent", torch.tensor(parent), persistent=False)
        self.register_buffer("log_siblings", torch.tensor(np.where(siblings, 0.0, _NEG),
                                                          dtype=torch.float32),
                             persistent=False)
        self.register_buffer("inv_t", torch.tensor(inv_t, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("path", torch.tensor(member[:len(below)], dtype=torch.float32),
                             persistent=False)
        self.temperatures = {n: float(temperatures.get(n, 1.0)) for n in taxonomy.inner_nodes}

    def forward(self, leaf_logp: torch.Tensor, ood_score: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """Tempered ``leaf_logp``; with a fitted distance power and an ``ood_score``, then
        softened per cell by ``g`` (module docstring)."""
        with torch.autocast(leaf_logp.device.type, enabled=False):  # fp32, as fitted
            out = self._temper(leaf_logp.float())
            if self.distance_power and ood_score is not None:
                # detached: a heat map explains the class, not the distance
                g = distance_factor(ood_score.detach(), self.distance_power,
                                    self.distance_ref)
                out = torch.log_softmax(out / g[:, None], dim=1)
            return out

    def _temper(self, leaf_logp: torch.Tensor) -> torch.Tensor:
        node_logp = torch.logsumexp(leaf_logp[:, None, :] + self.log_member, dim=2)
        cond = node_logp[:, self.below] - node_logp[:, self.parent]
        scaled = cond * self.inv_t
        norm = torch.logsumexp(scaled[:, None, :] + self.log_siblings, dim=2)
        return (scaled - norm) @ self.path


def apply_temperatures(taxonomy: Taxonomy, leaf_probs: np.ndarray,
                       temperatures: Mapping[str, float]) -> np.ndarray:
    """:class:`TreeTemperature` on probabilities ``(N, n_leaves)`` (for reports)."""
    logp = torch.from_numpy(np.log(np.clip(leaf_probs, 1e-12, None)).astype(np.float32))
    with torch.no_grad():
        return TreeTemperature(taxonomy, temperatures)(logp).exp().numpy()


def fit_temperatures(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                     ) -> dict[str, float]:
    """``T_n`` for every inner node: argmin over ``T`` in :data:`T_RANGE` of
    ``-sum_i log softmax(log P(c | n) / T)[true child of i]`` on the images below ``n``
    (1.0 for a node with fewer than :data:`MIN_IMAGES` images).

    A node that chose right on all its ``m`` images has no likelihood optimum (it keeps
    rising as ``T`` falls); its ``T`` instead makes the mean probability of the chosen
    child ``(m + 1) / (m + 2)``, Laplace's rule of succession for ``m`` right of ``m``
    (an under-confident node, e.g. after label smoothing, is sharpened that far)."""
    from scipy.optimize import minimize_scalar

    temps = {n: 1.0 for n in taxonomy.inner_nodes}
    for choice in node_choices(taxonomy, truth, leaf_probs):
        if len(choice.rows) < MIN_IMAGES:
            continue
        logc = np.log(np.clip(choice.cond, 1e-12, None))
        if choice.hit.all():
            m = len(choice.rows)
            temps[choice.node] = _confidence_temperature(logc, choice.target,
                                                         (m + 1) / (m + 2))
            continue

        def nll(log_t: float, logc: np.ndarray = logc, target: np.ndarray = choice.target,
                ) -> float:
            return float(-_true_child_logp(logc, target, log_t).sum())

        best = minimize_scalar(nll, bounds=np.log(T_RANGE), method="bounded",
                               options={"xatol": 1e-4})
        temps[choice.node] = float(np.exp(best.x))
    return temps


def _true_child_logp(logc: np.ndarray, target: np.ndarray, log_t: float) -> np.ndarray:
    """``log softmax(logc_i / T)[target_i]`` per row, ``T = exp(log_t)``."""
    from scipy.special import log_softmax

    return log_softmax(logc / np.exp(log_t), axis=1)[np.arange(len(target)), target]


def _confidence_temperature(logc: np.ndarray, target: np.ndarray, level: float) -> float:
    """The ``T`` in :data:`T_RANGE` at which ``mean_i softmax(logc_i / T)[target_i]`` is
    ``level`` (a bound when it cannot reach it: the mean falls as ``T`` rises whenever each
    target is its row's most probable child)."""
    from scipy.optimize import brentq

    def gap(log_t: float) -> float:
        return float(np.exp(_true_child_logp(logc, target, log_t)).mean() - level)

    low, high = np.log(T_RANGE)
    if gap(low) <= 0:
        return float(T_RANGE[0])
    if gap(high) >= 0:
        return float(T_RANGE[1])
    return float(np.exp(brentq(gap, low, high, xtol=1e-6)))


def fit_distance_power(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                       ood_score: np.ndarray) -> tuple[float, float]:
    """``(beta, s_med)`` of the distance-aware softening of already tempered
    ``leaf_probs`` (module docstring): ``s_med`` the median of ``ood_score``, ``beta`` in
    :data:`POWER_RANGE` minimising :func:`tree_nll` (a bounded scalar search; 0 when it
    does no better than no softening, and, as for the temperatures, below
    :data:`MIN_IMAGES` cells or without a wrong leaf among them)."""
    from scipy.optimize import minimize_scalar

    score = torch.as_tensor(np.asarray(ood_score, np.float32))
    ref = float(np.median(ood_score)) if len(score) else 1.0
    if not ref > 0:
        return 0.0, 1.0
    leaves = {leaf: i for i, leaf in enumerate(taxonomy.leaves)}
    exact = [(row, leaves[t]) for row, t in enumerate(truth) if t in leaves]
    wrong = any(int(np.argmax(leaf_probs[row])) != k for row, k in exact)
    if len(truth) < MIN_IMAGES or not wrong:
        return 0.0, ref

    def nll(power: float) -> float:
        g = distance_factor(score, power, ref).numpy()
        return tree_nll(taxonomy, truth, soften(leaf_probs, g))

    best = minimize_scalar(nll, bounds=POWER_RANGE, method="bounded",
                           options={"xatol": 1e-3})
    if not best.fun < tree_nll(taxonomy, truth, leaf_probs):
        return 0.0, ref
    return float(best.x), ref


def tree_nll(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true node: ``-mean_i log P(label_i)``, with
    ``P(node)`` the sum of its leaves (labels may be inner nodes)."""
    if len(truth) == 0:
        return float("nan")
    p = leaf_probs @ taxonomy.node_leaf_matrix().T.astype(leaf_probs.dtype)
    cols = [taxonomy.node_index[t] for t in truth]
    return float(-np.log(np.clip(p[np.arange(len(truth)), cols], 1e-12, None)).mean())


class FeatureDistance(nn.Module):
    """Stage features ``(B, sum of widths)`` -> ``(B,)`` score ``D(f) / threshold`` (see the
    module docstring): a cell is unclassifiable when its score exceeds 1.

    ``means`` and ``precision`` hold one array per stage (a single array each: one stage,
    the input's whole width); ``scales`` are the ``q_s`` (1 when not given)."""

    def __init__(self, means: Any, precision: Any, threshold: float = 1.0,
                 scales: Sequence[float] | None = None) -> None:
        super().__init__()
        means_l, precision_l = _blocks(means), _blocks(precision)
        if len(means_l) != len(precision_l):
            raise ValueError(f"{len(means_l)} blocks of means but {len(precision_l)} "
                             "precision matrices")
        self.threshold = float(threshold)
        scales = [1.0] * len(means_l) if scales is None else [float(v) for v in scales]
        if len(scales) != len(means_l):
            raise ValueError(f"{len(means_l)} blocks but {len(scales)} scales")
        self.widths = [int(np.shape(m)[1]) for m in means_l]
        self.register_buffer("inv_scales", 1.0 / torch.tensor(scales, dtype=torch.float32),
                             persistent=False)
        for i, (m, p) in enumerate(zip(means_l, precision_l, strict=True)):
            if np.shape(p) != (self.widths[i], self.widths[i]):
                raise ValueError(f"block {i}: means of width {self.widths[i]} but a "
                                 f"precision matrix of shape {np.shape(p)}")
            self.register_buffer(f"means{i}", torch.as_tensor(np.asarray(m, np.float32)),
                                 persistent=False)
            self.register_buffer(f"precision{i}",
                                 torch.as_tensor(np.asarray(p, np.float32)),
                                 persistent=False)

    def block_distances(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, n_blocks)``: ``d_s`` of every stage, unscaled."""
        with torch.autocast(features.device.type, enabled=False):  # fp32, as fitted
            parts = torch.split(features.float(), self.widths, dim=1)
            out = []
            for i, f in enumerate(parts):
                diff = f[:, None, :] - getattr(self, f"means{i}")[None]  # (B, K, D)
                dist = ((diff @ getattr(self, f"precision{i}")) * diff).sum(-1)
                out.append(dist.min(dim=1).values)
            return torch.stack(out, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (self.block_distances(features) * self.inv_scales).sum(dim=1) / self.threshold


def _blocks(value: Any) -> list[Any]:
    """One array per block: a list or tuple as given, anything else as one block."""
    return list(value) if isinstance(value, list | tuple) else [value]


def fit_feature_distance(features: np.ndarray, labels: Sequence[str],
                         ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class means, the shrunk shared precision matrix and the class order, from the
    training cells' features (classes with a single cell still get a mean)."""
    from sklearn.covariance import LedoitWolf

    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    feats = np.asarray(features, np.float64)
    means = np.stack([feats[y == k].mean(0) for k in range(len(classes))])
    centred = feats - means[y]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    return means.astype(np.float32), precision.astype(np.float32), classes


def fit_stage_distance(features: np.ndarray, labels: Sequence[str], widths: Sequence[int],
                       ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """:func:`fit_feature_distance` on each stage's columns of ``features`` (stages of
    ``widths`` side by side): lists of means and precision matrices, and the classes."""
    if sum(widths) != np.shape(features)[1]:
        raise ValueError(f"stage widths {list(widths)} do not add up to the features' "
                         f"width {np.shape(features)[1]}")
    means, precision, classes = [], [], []
    for block in np.split(np.asarray(features), np.cumsum(widths)[:-1], axis=1):
        m, p, classes = fit_feature_distance(block, labels)
        means.append(m)
        precision.append(p)
    return means, precision, classes


def ood_section(means: Any, precision: Any, classes: list[str], threshold: float,
                quantile: float, val_flagged: float, scales: Sequence[float] | None = None,
                stages: int = 1) -> dict[str, Any]:
    """The checkpoint's ``ood`` section (tensors, so ``torch.load(weights_only=True)``
    reads it); ``means``/``precision`` one array each, or one per stage with ``scales``
    (the model's last ``stages`` backbone stages)."""
    section: dict[str, Any] = {
        "classes": classes, "threshold": float(threshold), "quantile": float(quantile),
        "val_flagged": float(val_flagged), "stages": int(stages)}
    if isinstance(means, list | tuple):
        section["means"] = [torch.from_numpy(np.asarray(m)) for m in means]
        section["precision"] = [torch.from_numpy(np.asarray(p)) for p in precision]
        section["scales"] = [float(v) for v in (scales or [1.0] * len(means))]
    else:
        section["means"] = torch.from_numpy(np.asarray(means))
        section["precision"] = torch.from_numpy(np.asarray(precision))
    return section


def ood_arrays(section: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of :meth:`~leukotree.models.heads.TreeClassifier.set_ood` from a
    checkpoint's ``ood`` section (sections written before stages read as one stage)."""
    def arrays(value: Any) -> Any:
        return ([v.numpy() for v in value] if isinstance(value, list | tuple)
                else value.numpy())

    return {"means": arrays(section["means"]), "precision": arrays(section["precision"]),
            "threshold": float(section["threshold"]), "scales": section.get("scales"),
            "stages": int(section.get("stages", 1))}
