"""LeafToNode: the tree arithmetic as a PyTorch module matches the NumPy one."""

import numpy as np
import pytest
import torch

from leukotree.models.nodes import LeafToNode
from leukotree.taxonomy import load_taxonomy
from leukotree.tree import node_probabilities


def test_leaf_to_node_module_matches_numpy():
    tax = load_taxonomy("leukemia7")  # Normal Reactive ALL AML APML CLL CML
    probs = np.array([[0.1, 0.1, 0.3, 0.2, 0.1, 0.1, 0.1],
                      [0.0, 0.05, 0.05, 0.2, 0.26, 0.23, 0.21]], dtype=np.float32)
    out = LeafToNode(tax)(torch.from_numpy(probs)).numpy()
    assert out == pytest.approx(node_probabilities(tax, probs), abs=1e-6)
    # Leukemia (column 2) holds the five leukemia leaves: .8 and .95 by hand
    assert out[:, tax.node_index["Leukemia"]] == pytest.approx([0.8, 0.95], abs=1e-6)
