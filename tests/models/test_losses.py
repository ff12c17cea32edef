"""Losses on a tiny tree, checked against hand-computed values."""

import math

import pytest
import torch

from leukotree.errors import LeukotreeError
from leukotree.models.heads import ModelConfig, TreeClassifier
from leukotree.models.losses import TreeLoss, balanced_leaf_weights, focal_term
from leukotree.taxonomy import Taxonomy

# root -> A, B;  B -> b1, b2.  Leaves: A, b1, b2.  Inner nodes: root, B.
TAX = Taxonomy.from_tree({"A": None, "B": ["b1", "b2"]}, name="tiny")


def _targets(labels):
    mask = torch.from_numpy(TAX.leaf_mask(labels))
    heads = torch.from_numpy(TAX.encode_heads(labels))
    return mask, heads


def test_focal_term_reduces_to_cross_entropy_and_down_weights_easy_samples():
    logp = torch.log(torch.tensor([0.5, 0.9]))
    assert torch.allclose(focal_term(logp, 0.0), -logp)
    # -(1 - 0.5)^2 * log 0.5 = 0.25 * 0.693147
    assert focal_term(logp, 2.0)[0].item() == pytest.approx(0.25 * math.log(2), rel=1e-6)
    assert focal_term(logp, 2.0)[1].item() == pytest.approx(0.01 * -math.log(0.9), rel=1e-5)


def test_flat_loss_uses_the_probability_of_the_label_node():
    leaf_logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    mask, heads = _targets(["b1", "B"])
    loss, _ = TreeLoss(TAX, hierarchical=False, kind="ce")({"leaf_logp": leaf_logp}, mask, heads)
    # b1: -log 0.3 ; B (inner label): -log(0.3 + 0.2)
    expected = (-math.log(0.3) - math.log(0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_flat_focal_loss_hand_computed():
    leaf_logp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    mask, heads = _targets(["A"])
    crit = TreeLoss(TAX, hierarchical=False, kind="focal", gamma=2.0)
    loss, _ = crit({"leaf_logp": leaf_logp}, mask, heads)
    assert loss.item() == pytest.approx(0.25 * math.log(2), rel=1e-6)


def test_class_weights_scale_each_sample():
    leaf_logp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    mask, heads = _targets(["b1"])
    loss, _ = TreeLoss(TAX, hierarchical=False, kind="ce", leaf_weights=[1.0, 3.0, 1.0])(
        {"leaf_logp": leaf_logp}, mask, heads)
    assert loss.item() == pytest.approx(-3 * math.log(0.3), rel=1e-6)


def test_masked_head_loss_hand_computed():
    # root head: logits (0, 0) -> P(A) = P(B) = 0.5 ; B head: (log 3, 0) -> P(b1|B) = 0.75
    outputs = {
        "head:root": torch.zeros(2, 2),
        "head:B": torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]]),
    }
    mask, heads = _targets(["A", "b1"])
    loss, parts = TreeLoss(TAX, hierarchical=True, kind="ce")(outputs, mask, heads)
    # root head sees both images: mean(-log .5, -log .5); B head only sees "b1": -log .75
    assert parts["root"] == pytest.approx(math.log(2), rel=1e-6)
    assert parts["B"] == pytest.approx(-math.log(0.75), rel=1e-6)
    assert loss.item() == pytest.approx(math.log(2) - math.log(0.75), rel=1e-6)


def test_sample_weights_make_each_mean_a_weighted_mean():
    leaf_logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    mask, heads = _targets(["b1", "A"])
    crit = TreeLoss(TAX, hierarchical=False, kind="ce")
    loss, _ = crit({"leaf_logp": leaf_logp}, mask, heads, sample_weight=torch.tensor([0.5, 1.0]))
    # (0.5 * -log 0.3 + 1 * -log 0.5) / 1.5
    assert loss.item() == pytest.approx((-0.5 * math.log(0.3) - math.log(0.5)) / 1.5, rel=1e-6)
    outputs = {"head:root": torch.zeros(2, 2),
               "head:B": torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])}
    loss, parts = TreeLoss(TAX, hierarchical=True, kind="ce")(
        outputs, mask, heads, sample_weight=torch.tensor([1.0, 0.0]))
    # only the b1 image counts: root -log 0.5, B -log 0.75
    assert parts["root"] == pytest.approx(math.log(2), rel=1e-6)
    assert parts["B"] == pytest.approx(-math.log(0.75), rel=1e-6)
    logits = torch.zeros(2, 2, requires_grad=True)
    zero, _ = TreeLoss(TAX, hierarchical=True, kind="ce")(
        {"head:root": logits, "head:B": torch.zeros(2, 2)}, mask, heads,
        sample_weight=torch.zeros(2))
    zero.backward()  # all weights 0: no loss, and still a graph
    assert zero.item() == 0 and logits.grad is not None


def test_level_weights_weigh_heads_by_depth():
    outputs = {"head:root": torch.zeros(1, 2), "head:B": torch.zeros(1, 2)}
    mask, heads = _targets(["b2"])
    loss, _ = TreeLoss(TAX, hierarchical=True, kind="ce", level_weights=[1.0, 0.5])(
        outputs, mask, heads)
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    with pytest.raises(LeukotreeError, match="level_weights"):
        TreeLoss(TAX, hierarchical=True, level_weights=[1.0])


def test_inner_label_trains_only_the_heads_above_it():
    outputs = {"head:root": torch.zeros(1, 2, requires_grad=True),
               "head:B": torch.zeros(1, 2, requires_grad=True)}
    mask, heads = _targets(["B"])
    loss, parts = TreeLoss(TAX, hierarchical=True, kind="ce")(outputs, mask, heads)
    loss.backward()
    assert set(parts) == {"root"}
    assert outputs["head:B"].grad.abs().sum().item() == 0.0
    assert outputs["head:root"].grad.abs().sum().item() > 0.0


def test_loss_control_each_head_gets_gradient_from_its_own_loss_only():
    torch.manual_seed(0)
    features = torch.randn(4, 5)
    head_root, head_b = torch.nn.Linear(5, 2), torch.nn.Linear(5, 2)
    mask, heads = _targets(["A", "b1", "b2", "A"])
    crit = TreeLoss(TAX, hierarchical=True, kind="focal")
    total, _ = crit({"head:root": head_root(features), "head:B": head_b(features)}, mask, heads)
    total.backward()
    grad_total = head_root.weight.grad.clone()
    head_root.zero_grad()
    root_only, _ = crit({"head:root": head_root(features),
                         "head:B": head_b(features).detach()}, mask, heads)
    root_only.backward()
    assert torch.allclose(grad_total, head_root.weight.grad)


def test_tree_composition_is_the_product_of_conditionals():
    net = TreeClassifier(TAX, ModelConfig())
    leaf_logp = net.compose([torch.zeros(1, 2), torch.tensor([[math.log(3), 0.0]])])
    probs = leaf_logp.exp()[0].tolist()
    assert probs == pytest.approx([0.5, 0.375, 0.125], rel=1e-6)


def test_balanced_leaf_weights_hand_computed():
    # 3 images of A, 1 of b1, an inner label B counts half for b1 and half for b2.
    w = balanced_leaf_weights(TAX, ["A", "A", "A", "b1", "B"])
    # N = 5, k = 3: A 5/(3*3), b1 5/(3*1.5), b2 5/(3*0.5)
    assert w.tolist() == pytest.approx([5 / 9, 5 / 4.5, 5 / 1.5])


def test_bad_loss_options_are_named():
    with pytest.raises(LeukotreeError, match="'loss'"):
        TreeLoss(TAX, hierarchical=False, kind="hinge")
    with pytest.raises(LeukotreeError, match="label_smoothing"):
        TreeLoss(TAX, hierarchical=False, label_smoothing=1.5)
