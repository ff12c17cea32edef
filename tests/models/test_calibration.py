"""Temperature scaling per tree node and the feature-space distance, in the model."""

import numpy as np
import pytest
import torch

from leukotree.models import ModelConfig, build_model
from leukotree.models.calibration import (
    FeatureDistance,
    apply_temperatures,
    fit_feature_distance,
    fit_temperatures,
    tree_nll,
)
from leukotree.models.checkpoint import load_model, save_model, update_checkpoint
from leukotree.taxonomy import Taxonomy
from leukotree.tree import decode_greedy


@pytest.fixture
def small_tree() -> Taxonomy:
    """root -> A, B; B -> B1, B2."""
    return Taxonomy.from_dict({"name": "t", "tree": {"A": None, "B": {"B1": None, "B2": None}}})


def test_each_node_is_tempered_on_its_own_choice(small_tree):
    # P(A) .5, P(B1) .3, P(B2) .2. At the root A:B = .5:.5 stays equal whatever T;
    # at B, .6:.4 with T = 1/2 becomes .36:.16 -> .6923:.3077.
    probs = np.array([[0.5, 0.3, 0.2]])
    out = apply_temperatures(small_tree, probs, {"root": 2.0, "B": 0.5})
    np.testing.assert_allclose(out, [[0.5, 0.5 * 0.36 / 0.52, 0.5 * 0.16 / 0.52]], atol=1e-6)


def test_temperature_one_changes_nothing_and_the_tree_stays_consistent(leukemia7):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(leukemia7.leaves)), size=50)
    np.testing.assert_allclose(apply_temperatures(leukemia7, probs, {}), probs, atol=1e-5)
    temps = {n: t for n, t in zip(leukemia7.inner_nodes, (0.3, 2.0, 5.0, 0.7), strict=True)}
    out = apply_temperatures(leukemia7, probs, temps)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)
    assert decode_greedy(leukemia7, out) == decode_greedy(leukemia7, probs)  # same choices


def test_fitted_temperature_undoes_overconfidence():
    tax = Taxonomy.from_dict({"name": "flat3", "tree": {"x": None, "y": None, "z": None}})
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, size=(4000, 3))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = [tax.leaves[rng.choice(3, p=p)] for p in true_p]
    over = np.exp(3 * logits) / np.exp(3 * logits).sum(1, keepdims=True)  # 3x too sharp
    temps = fit_temperatures(tax, labels, over)
    assert temps["root"] == pytest.approx(3.0, rel=0.1)


def test_feature_distance_is_the_nearest_mahalanobis_distance_over_the_threshold():
    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    precision = np.diag([1.0, 0.25])  # variance 1 along x, 4 along y
    dist = FeatureDistance(means, precision, threshold=2.0)
    f = torch.tensor([[1.0, 2.0], [9.0, 0.0]])
    # (1^2 * 1 + 2^2 * .25) = 2 from the first mean; (1^2) = 1 from the second.
    np.testing.assert_allclose(dist(f).numpy(), [2.0 / 2, 1.0 / 2])


def test_fit_feature_distance_gives_class_means_and_a_positive_definite_precision():
    rng = np.random.default_rng(2)
    feats = np.concatenate([rng.normal(0, 1, (200, 4)), rng.normal(5, 1, (200, 4))])
    means, precision, classes = fit_feature_distance(feats, ["a"] * 200 + ["b"] * 200)
    assert classes == ["a", "b"]
    np.testing.assert_allclose(means, [[0] * 4, [5] * 4], atol=0.25)
    assert np.all(np.linalg.eigvalsh(precision) > 0)


def test_calibration_and_ood_travel_in_the_checkpoint(tmp_path, leukemia7):
    model = build_model(leukemia7, ModelConfig(head="multihead", backbone="test_resnet",
                                               img_size=32)).eval()
    x = torch.rand(3, 3, 32, 32) * 255
    with torch.no_grad():
        raw = model(x)
    assert "ood_score" not in raw
    save_model(tmp_path / "best.pt", model)
    temps = dict.fromkeys(leukemia7.inner_nodes, 0.5)
    width = raw["features"].shape[1]
    update_checkpoint(tmp_path / "best.pt", calibration={"temperatures": temps}, ood={
        "means": torch.zeros(2, width), "precision": torch.eye(width), "threshold": 4.0,
        "quantile": 0.95, "val_flagged": 0.05, "classes": ["ALL", "AML"]})
    loaded, _ = load_model(tmp_path / "best.pt")
    with torch.no_grad():
        out = loaded(x)
    expected = apply_temperatures(leukemia7, raw["leaf_logp"].exp().numpy(), temps)
    np.testing.assert_allclose(out["leaf_logp"].exp().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(out["ood_score"].numpy(),
                               (raw["features"] ** 2).sum(1).numpy() / 4.0, rtol=1e-4)
    update_checkpoint(tmp_path / "best.pt", calibration=None, ood=None)
    again, _ = load_model(tmp_path / "best.pt")
    assert again.temperature is None and again.ood is None


def test_tree_nll_reads_inner_labels_as_the_sum_of_their_leaves(small_tree):
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    # -(log P(A) + log P(B)) / 2 = -(log .5 + log .5) / 2
    assert tree_nll(small_tree, ["A", "B"], probs) == pytest.approx(np.log(2))


def test_a_node_without_errors_or_with_few_images_keeps_temperature_one(leukemia7):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(len(leukemia7.leaves)), size=200)
    truth = decode_greedy(leukemia7, probs)  # every choice at every node right
    assert set(fit_temperatures(leukemia7, truth, probs).values()) == {1.0}
    few = fit_temperatures(leukemia7, ["ALL", "CLL"] * 5, probs[:10])
    assert set(few.values()) == {1.0}


def test_damaged_calibration_sections_are_named_not_a_traceback(tmp_path, leukemia7):
    from leukotree.errors import LeukotreeError

    model = build_model(leukemia7, ModelConfig(head="multihead", backbone="test_resnet",
                                               img_size=32))
    save_model(tmp_path / "best.pt", model)
    update_checkpoint(tmp_path / "best.pt", ood={"means": torch.zeros(2, 3),
                                                 "precision": torch.eye(3), "threshold": 1.0})
    with pytest.raises(LeukotreeError, match="damaged or was edited"):
        load_model(tmp_path / "best.pt")
