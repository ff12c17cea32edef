"""Losses on trees: focal or cross-entropy, flat or masked per node.

Per-sample focal loss (Lin et al. 2017) on the probability ``p_t`` of the true class:

    FL = - alpha_t * (1 - p_t) ** gamma * log(p_t)

``gamma = 0`` and ``alpha_t = w_t`` give weighted cross-entropy. Label smoothing
``eps`` mixes in the mean negative log-probability over the candidate classes:
``(1 - eps) * L + eps * mean_c(-log p_c)``.

- Flat and hybrid heads: ``p_t`` is the probability of the label *node*, i.e. the
  sum of its leaves, so an image labelled ``Acute`` contributes
  ``-log(P(ALL) + P(AML) + P(APML))``.
- Multi-head and per-node: head ``k`` is scored only on the images whose label
  path passes through its node and goes below it (the masked loss); its mean
  over those images is ``L_k``. The total is ``sum_k w_depth(k) * L_k``. A head's
  parameters receive gradient from ``L_k`` alone ("loss control"); the shared
  backbone gets the weighted sum.
- A cell-type head (a second, per-cell taxonomy) adds ``cell_weight * L_cell``, the
  cross-entropy ``-log P(cell label)`` (a label at an inner node: the sum of its
  leaves) averaged over the cells that have a cell type; cells without one add nothing.
- ``sample_weight`` ``v_i`` (e.g. ``diagnosis_focus`` on the cells that do not carry the
  disease) turns each mean of the diagnosis loss into ``sum_i v_i l_i / sum_i v_i`` (over
  the rows of that head); the cell-type loss is not weighted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy
from leukotree.tree import node_level

LOSSES = ("focal", "ce", "weighted-ce")


def focal_term(logp_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """``-(1 - p_t) ** gamma * log p_t`` per sample (``gamma = 0``: cross-entropy)."""
    if gamma == 0:
        return -logp_t
    p_t = logp_t.exp().clamp(max=1.0)
    return -((1 - p_t) ** gamma) * logp_t


def balanced_leaf_weights(taxonomy: Taxonomy, labels: Sequence[str]) -> np.ndarray:
    """``w_leaf = N / (n_leaves * N_leaf)`` counting inner-node labels spread over their leaves.

    Leaves without any image get weight 1.
    """
    mask = taxonomy.leaf_mask(list(labels)).astype(np.float64)
    counts = (mask / np.maximum(mask.sum(1, keepdims=True), 1)).sum(0)
    n, k = len(labels), len(taxonomy.leaves)
    return np.where(counts > 0, n / (k * np.maximum(counts, 1e-12)), 1.0)


class TreeLoss(nn.Module):
    """The training loss for any head; ``forward`` returns ``(total, parts)``.

    ``hierarchical`` (the head's ``is_hierarchical``) selects the masked per-node loss.
    ``leaf_weights`` (per leaf, e.g. focal alpha or balanced class weights) are
    averaged over the leaves under a node to weigh that node.
    """

    def __init__(
        self,
        taxonomy: Taxonomy,
        *,
        hierarchical: bool,
        kind: str = "focal",
        gamma: float = 2.0,
        leaf_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        level_weights: Sequence[float] | None = None,
        cell_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.cell_weight = cell_weight
        if kind not in LOSSES:
            raise LeukotreeError(f"The 'loss' parameter must be one of {LOSSES}; got {kind!r}.")
        if not 0 <= label_smoothing < 1:
            raise LeukotreeError(
                f"The 'label_smoothing' parameter must be in [0, 1); got {label_smoothing!r}.")
        self.taxonomy = taxonomy
        self.hierarchical = hierarchical
        self.gamma = gamma if kind == "focal" else 0.0
        self.smoothing = label_smoothing
        n_leaves = len(taxonomy.leaves)
        w = torch.ones(n_leaves) if leaf_weights is None else torch.as_tensor(
            list(leaf_weights), dtype=torch.float32)
        if w.shape != (n_leaves,):
            raise LeukotreeError(
                f"Class weights must give one value per leaf ({n_leaves}); got {w.numel()}.")
        self.register_buffer("leaf_weights", w)
        matrix = torch.tensor(taxonomy.node_leaf_matrix(), dtype=torch.float32)
        node_w = (matrix @ w) / matrix.sum(1)
        self.child_weights = [
            node_w[[taxonomy.node_index[c] for c in taxonomy.children(n)]]
            for n in taxonomy.inner_nodes
        ]
        depth = max(taxonomy.max_depth, 1)
        lw = [1.0] * depth if level_weights is None else list(level_weights)
        if len(lw) < depth:
            raise LeukotreeError(
                f"The 'level_weights' parameter needs {depth} values (one per level of "
                f"taxonomy '{taxonomy.name}'); got {len(lw)}.")
        # The root (depth 0) chooses among level-1 nodes -> lw[0]; a node at depth d -> lw[d].
        self.head_weights = [lw[node_level(taxonomy, n)] for n in taxonomy.inner_nodes]

    def forward(
        self,
        outputs: dict[str, torch.Tensor],
        leaf_mask: torch.Tensor,
        head_targets: torch.Tensor,
        cell_mask: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.hierarchical:
            total, parts = self._masked_heads(outputs, head_targets, sample_weight)
        else:
            total, parts = self._flat(outputs["leaf_logp"], leaf_mask, sample_weight)
        if cell_mask is not None and "cell_logp" in outputs:
            cell = self._cell_types(outputs["cell_logp"], cell_mask)
            parts["cell_types"] = float(cell.detach())
            total = total + self.cell_weight * cell
        return total, parts

    @staticmethod
    def _cell_types(cell_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean ``-log P(cell label)`` over the rows that have a cell label."""
        known = mask.any(1)
        if not known.any():
            return cell_logp.sum() * 0  # keeps the head in the graph
        logp_t = torch.logsumexp(cell_logp[known].masked_fill(~mask[known], float("-inf")),
                                 dim=1)
        return -logp_t.mean()

    @staticmethod
    def _mean(loss: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """``mean(loss)``, or ``sum(w * loss) / sum(w)`` (0 with a graph when all ``w`` are 0)."""
        if weight is None:
            return loss.mean()
        weight = weight.to(loss.dtype)
        return (weight * loss).sum() / weight.sum().clamp_min(1e-12)

    def _flat(self, leaf_logp: torch.Tensor, mask: torch.Tensor,
              sample_weight: torch.Tensor | None = None,
              ) -> tuple[torch.Tensor, dict[str, float]]:
        maskf = mask.float()
        logp_t = torch.logsumexp(leaf_logp.masked_fill(~mask, float("-inf")), dim=1)
        weight = (maskf @ self.leaf_weights) / maskf.sum(1)
        loss = weight * focal_term(logp_t, self.gamma)
        if self.smoothing:
            loss = (1 - self.smoothing) * loss - self.smoothing * leaf_logp.mean(1)
        total = self._mean(loss, sample_weight)
        return total, {"leaves": float(total.detach())}

    def _masked_heads(self, outputs: dict[str, torch.Tensor], targets: torch.Tensor,
                      sample_weight: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=targets.device)
        parts: dict[str, float] = {}
        for k, node in enumerate(self.taxonomy.inner_nodes):
            logits = outputs[f"head:{node}"]
            rows = outputs.get(f"rows:{node}")
            t = targets[:, k]
            if rows is None:  # logits for the whole batch: keep the rows of this node
                rows = torch.nonzero(t >= 0).flatten()
                logits = logits[rows]
            if rows.numel() == 0:
                total = total + logits.sum() * 0  # keeps unused parameters in the graph
                continue
            t = t[rows]
            logp = torch.log_softmax(logits.float(), dim=1)
            logp_t = logp.gather(1, t[:, None]).squeeze(1)
            w = self.child_weights[k].to(logp.device)[t]
            loss = w * focal_term(logp_t, self.gamma)
            if self.smoothing:
                loss = (1 - self.smoothing) * loss - self.smoothing * logp.mean(1)
            head_loss = self._mean(loss, None if sample_weight is None
                                   else sample_weight[rows])
            parts[node] = float(head_loss.detach())
            total = total + self.head_weights[k] * head_loss
        return total, parts
