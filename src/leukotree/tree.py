"""Arithmetic on trees of probabilities, shared by metrics, decisions, explanations and export.

Every model outputs leaf probabilities ``P(leaf)``; everything else follows from them:

- ``P(node) = sum of P(leaf)`` over the leaves below the node (:func:`node_probabilities`,
  or :class:`~leukotree.models.nodes.LeafToNode` inside exported graphs and heat maps);
- the conditional choice at an inner node, ``P(child | node) = P(child) / P(node)``
  (:func:`node_choices`, on the images whose true path continues below the node);
- decoding a leaf: the most probable leaf (:func:`decode_argmax`) or top-down, the most
  probable child at each node (:func:`greedy_leaf`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from leukotree.taxonomy import Taxonomy


def node_probabilities(taxonomy: Taxonomy, leaf_probs: np.ndarray) -> np.ndarray:
    """``(N, n_nodes)``: ``P(node) = sum of its leaves`` (columns in ``taxonomy.nodes`` order)."""
    return leaf_probs @ taxonomy.node_leaf_matrix().T.astype(leaf_probs.dtype)


def decode_argmax(taxonomy: Taxonomy, leaf_probs: np.ndarray) -> list[str]:
    """The most probable leaf of each image."""
    return [taxonomy.leaves[i] for i in leaf_probs.argmax(1)]


def greedy_leaf(taxonomy: Taxonomy, node_p: np.ndarray) -> str:
    """Top-down decoding of one image: from the root, step to the most probable child.

    ``node_p`` holds the probability of every node (``taxonomy.nodes`` order).
    """
    node = taxonomy.root
    while not taxonomy.is_leaf(node):
        kids = taxonomy.children(node)
        node = kids[int(np.argmax([node_p[taxonomy.node_index[k]] for k in kids]))]
    return node


def decode_greedy(taxonomy: Taxonomy, leaf_probs: np.ndarray) -> list[str]:
    """:func:`greedy_leaf` for every image."""
    return [greedy_leaf(taxonomy, row) for row in node_probabilities(taxonomy, leaf_probs)]


@dataclass(frozen=True)
class NodeChoice:
    """The decision at one inner node, on the images whose true path goes below it.

    ``cond[i, c] = P(child c | node)`` for image ``rows[i]``; ``target[i]`` is the index
    of its true child.
    """

    node: str
    column: int  # position of the node in ``taxonomy.inner_nodes``
    rows: np.ndarray
    target: np.ndarray
    cond: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        """Whether the most probable child is the true one, per row."""
        return self.cond.argmax(1) == self.target


def node_choices(taxonomy: Taxonomy, truth: Sequence[str], leaf_probs: np.ndarray,
                 ) -> Iterator[NodeChoice]:
    """One :class:`NodeChoice` per inner node with at least one image below it."""
    node_p = node_probabilities(taxonomy, leaf_probs)
    targets = taxonomy.encode_heads(list(truth))
    for k, node in enumerate(taxonomy.inner_nodes):
        rows = np.flatnonzero(targets[:, k] >= 0)
        if len(rows) == 0:
            continue
        cols = [taxonomy.node_index[c] for c in taxonomy.children(node)]
        cond = node_p[rows][:, cols]
        cond = cond / np.clip(cond.sum(1, keepdims=True), 1e-12, None)
        yield NodeChoice(node, k, rows, targets[rows, k], cond)


def node_level(taxonomy: Taxonomy, node: str) -> int:
    """The level of the choice made at inner ``node``: 0 at the root, else its depth."""
    return 0 if node == taxonomy.root else taxonomy.depth(node)
