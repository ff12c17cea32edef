"""Calibration and out-of-distribution scores that travel inside the model.

Temperature scaling per tree node (Guo et al. 2017, applied to each conditional choice
of the tree): at inner node ``n`` with children ``c``,

    P'(c | n) = softmax_c( log P(c | n) / T_n ),   P'(leaf) = prod over its path of P'(c | n)

so the tree stays consistent and the most probable child at every node is unchanged.
Each ``T_n`` minimises the negative log-likelihood of the true child on the validation
images whose true path passes ``n`` (:func:`fit_temperatures`). Since ``log P(leaf)`` is
the sum of the conditional log-probabilities along its path, these independent fits
also minimise the leaf-level NLL (:func:`tree_nll`).

Feature-space distance (Lee et al. 2018): the squared Mahalanobis distance of a cell's
pooled features ``f`` to the nearest class mean of the training cells,

    d(f) = min_k (f - mu_k)^T S^-1 (f - mu_k),

with one covariance ``S`` of the class-centred training features (Ledoit-Wolf
shrinkage). A cell whose ``d`` exceeds the threshold chosen on the validation split
(its ``quantile``, 0.95 by default: 5% of in-distribution cells flagged) is
"unclassifiable": unlike the cells the model was trained on. Models output the ratio
``ood_score = d / threshold``, so the rule is ``ood_score > 1`` for one model and for
an ensemble's mean alike.

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
#: A node keeps T = 1 below this many validation images, or when it made no error there
#: (the likelihood then keeps rising as T falls, and T would hit its bound).
MIN_IMAGES = 20
_NEG = -1e9  # log(0) that stays finite in exported graphs


class TreeTemperature(nn.Module):
    """Leaf log-probabilities ``(B, n_leaves)`` -> the same with every inner node's
    conditional choice tempered by its ``T_n`` (see the module docstring)."""

    def __init__(self, taxonomy: Taxonomy, temperatures: Mapping[str, float]) -> None:
        super().__init__()
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

    def forward(self, leaf_logp: torch.Tensor) -> torch.Tensor:
        with torch.autocast(leaf_logp.device.type, enabled=False):  # fp32, as fitted
            return self._temper(leaf_logp.float())

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
    (1.0 for a node with fewer than :data:`MIN_IMAGES` images or without an error)."""
    from scipy.optimize import minimize_scalar

    temps = {n: 1.0 for n in taxonomy.inner_nodes}
    for choice in node_choices(taxonomy, truth, leaf_probs):
        if len(choice.rows) < MIN_IMAGES or choice.hit.all():
            continue
        logc = np.log(np.clip(choice.cond, 1e-12, None))

        def nll(log_t: float, logc: np.ndarray = logc, target: np.ndarray = choice.target,
                ) -> float:
            z = logc / np.exp(log_t)
            z = z - z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            return float(-logp[np.arange(len(target)), target].sum())

        best = minimize_scalar(nll, bounds=np.log(T_RANGE), method="bounded",
                               options={"xatol": 1e-4})
        temps[choice.node] = float(np.exp(best.x))
    return temps


def tree_nll(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray) -> float:
    """Mean negative log-likelihood of the true node: ``-mean_i log P(label_i)``, with
    ``P(node)`` the sum of its leaves (labels may be inner nodes)."""
    if len(truth) == 0:
        return float("nan")
    p = leaf_probs @ taxonomy.node_leaf_matrix().T.astype(leaf_probs.dtype)
    cols = [taxonomy.node_index[t] for t in truth]
    return float(-np.log(np.clip(p[np.arange(len(truth)), cols], 1e-12, None)).mean())


class FeatureDistance(nn.Module):
    """Pooled features ``(B, D)`` -> ``(B,)`` squared Mahalanobis distance to the nearest
    training class mean (see the module docstring) divided by ``threshold``: a cell is
    unclassifiable when its score exceeds 1."""

    def __init__(self, means: np.ndarray, precision: np.ndarray, threshold: float = 1.0,
                 ) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.register_buffer("means", torch.as_tensor(np.asarray(means, np.float32)),
                             persistent=False)
        self.register_buffer("precision", torch.as_tensor(np.asarray(precision, np.float32)),
                             persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # fp32, as fitted
            diff = features.float()[:, None, :] - self.means[None]  # (B, K, D)
            dist = ((diff @ self.precision) * diff).sum(-1)
            return dist.min(dim=1).values / self.threshold


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


def ood_section(means: np.ndarray, precision: np.ndarray, classes: list[str],
                threshold: float, quantile: float, val_flagged: float) -> dict[str, Any]:
    """The checkpoint's ``ood`` section (tensors, so ``torch.load(weights_only=True)``
    reads it)."""
    return {"means": torch.from_numpy(means), "precision": torch.from_numpy(precision),
            "classes": classes, "threshold": float(threshold), "quantile": float(quantile),
            "val_flagged": float(val_flagged)}
