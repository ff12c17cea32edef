"""Temperature scaling per tree node and the feature-space distance, in the model."""

import numpy as np
import pytest
import torch

from leukotree.models import ModelConfig, build_model
from leukotree.models.calibration import (
    FeatureDistance,
    TreeTemperature,
    apply_temperatures,
    distance_factor,
    fit_distance_power,
    fit_feature_distance,
    fit_stage_distance,
    fit_temperatures,
    ood_section,
    soften,
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


def test_distance_aware_softening_follows_the_node_temperatures(small_tree):
    # T_B = 1/2 gives (.5, .5 * .36 / .52, .5 * .16 / .52); then g = (score / 2) ** 1:
    # the first cell (score 2, g 1) keeps it, the second (score 4, g 2) becomes
    # softmax(log p / 2), i.e. proportional to sqrt(p).
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    tempered = TreeTemperature(small_tree, {"B": 0.5}, distance_power=1.0, distance_ref=2.0)
    out = tempered(logp, torch.tensor([2.0, 4.0])).exp().numpy()
    node_t = np.array([0.5, 0.5 * 0.36 / 0.52, 0.5 * 0.16 / 0.52])
    np.testing.assert_allclose(out, [node_t, np.sqrt(node_t) / np.sqrt(node_t).sum()],
                               atol=1e-6)
    assert (out.argmax(1) == node_t.argmax()).all()  # softening keeps the leaf chosen
    # without a score nothing is softened
    np.testing.assert_allclose(tempered(logp).exp().numpy()[1], node_t, atol=1e-6)
    g = distance_factor(torch.tensor([2.0, 4.0]), 1.0, 2.0).numpy()
    np.testing.assert_allclose(soften(np.stack([node_t, node_t]), g), out, atol=1e-6)
    # 1 / g undoes g, 1 / T undoes T
    raw = apply_temperatures(small_tree, soften(out, 1 / g), {"B": 2.0})
    np.testing.assert_allclose(raw, logp.exp().numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="distance_ref must be positive"):
        TreeTemperature(small_tree, {"B": 0.5}, distance_power=1.0, distance_ref=0.0)


def _flat3_cells(seed: int) -> tuple[Taxonomy, np.ndarray, list[str], np.ndarray]:
    tax = Taxonomy.from_dict({"name": "flat3", "tree": {"x": None, "y": None, "z": None}})
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, size=(4000, 3))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = [tax.leaves[rng.choice(3, p=p)] for p in true_p]
    score = np.exp(rng.normal(0, 0.5, size=4000))
    return tax, logits, labels, score


def _softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(z) / np.exp(z).sum(1, keepdims=True)


def test_distance_power_is_fitted_where_far_cells_are_overconfident():
    tax, logits, labels, score = _flat3_cells(4)
    # right at the median score, sharper the farther the cell
    over = _softmax(logits * (score / np.median(score))[:, None])
    power, ref = fit_distance_power(tax, labels, over, score)
    assert ref == pytest.approx(np.median(score))
    assert power == pytest.approx(1.0, abs=0.15)


def test_distance_factor_is_bounded_and_the_heat_maps_do_not_see_it(small_tree):
    # the ratio is floored at 1/4: a cell on a class mean is sharpened, not made one-hot
    assert distance_factor(torch.tensor([0.0]), 2.0, 1.0).item() == pytest.approx(1 / 16)
    score = torch.tensor([3.0], requires_grad=True)
    logp = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    out = TreeTemperature(small_tree, {"B": 0.5}, distance_power=1.0)(logp, score)
    assert not out.requires_grad  # detached: no gradient flows into the distance


def test_distance_power_needs_enough_cells_and_an_error():
    tax, logits, labels, score = _flat3_cells(6)
    over = _softmax(logits * (score / np.median(score))[:, None])
    assert fit_distance_power(tax, labels[:10], over[:10], score[:10])[0] == 0.0
    right = [tax.leaves[k] for k in over.argmax(1)]
    assert fit_distance_power(tax, right, over, score)[0] == 0.0


def test_distance_power_stays_zero_where_distance_says_nothing():
    tax, logits, labels, score = _flat3_cells(5)
    assert fit_distance_power(tax, labels, _softmax(logits), score)[0] < 0.1
    # a score of zeros everywhere (no median to divide by) leaves the cells alone
    assert fit_distance_power(tax, labels, _softmax(logits), 0 * score) == (0.0, 1.0)


def test_feature_distance_is_the_nearest_mahalanobis_distance_over_the_threshold():
    means = np.array([[0.0, 0.0], [10.0, 0.0]])
    precision = np.diag([1.0, 0.25])  # variance 1 along x, 4 along y
    dist = FeatureDistance(means, precision, threshold=2.0)
    f = torch.tensor([[1.0, 2.0], [9.0, 0.0]])
    # (1^2 * 1 + 2^2 * .25) = 2 from the first mean; (1^2) = 1 from the second.
    np.testing.assert_allclose(dist(f).numpy(), [2.0 / 2, 1.0 / 2])


def test_stage_distances_are_summed_each_over_its_own_scale():
    # stage 1: width 1, mean 0, precision 1; stage 2: width 2, means (0,0) and (4,0), I
    dist = FeatureDistance([np.zeros((1, 1)), np.array([[0.0, 0.0], [4.0, 0.0]])],
                           [np.eye(1), np.eye(2)], threshold=2.0, scales=[4.0, 0.5])
    f = torch.tensor([[2.0, 3.0, 1.0]])
    # d1 = 2^2 = 4, d2 = min(3^2 + 1, 1^2 + 1) = 2; (4 / 4 + 2 / 0.5) / 2 = 2.5
    np.testing.assert_allclose(dist.block_distances(f).numpy(), [[4.0, 2.0]])
    np.testing.assert_allclose(dist(f).numpy(), [2.5])
    with pytest.raises(ValueError, match="precision matrix of shape"):
        FeatureDistance([np.zeros((1, 2))], [np.eye(3)])


def test_fit_stage_distance_fits_each_stage_on_its_own_columns():
    rng = np.random.default_rng(3)
    feats = np.concatenate([rng.normal(0, 1, (100, 5)), rng.normal(3, 1, (100, 5))])
    labels = ["a"] * 100 + ["b"] * 100
    means, precision, classes = fit_stage_distance(feats, labels, [2, 3])
    assert classes == ["a", "b"] and [m.shape for m in means] == [(2, 2), (2, 3)]
    assert [p.shape for p in precision] == [(2, 2), (3, 3)]
    alone, _, _ = fit_feature_distance(feats[:, 2:], labels)
    np.testing.assert_allclose(means[1], alone)
    with pytest.raises(ValueError, match="do not add up"):
        fit_stage_distance(feats, labels, [2, 2])


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


def test_stage_features_give_the_same_predictions_and_a_stage_ood_score(tmp_path,
                                                                       leukemia7):
    torch.manual_seed(0)
    model = build_model(leukemia7, ModelConfig(head="multihead", backbone="test_resnet",
                                               img_size=32)).eval()
    x = torch.rand(3, 3, 32, 32) * 255
    with torch.no_grad():
        plain = model(x)
        model.set_stage_features(3)
        staged = model(x)
    widths = model.stage_widths()
    assert len(widths) == 3 and staged["stage_features"].shape == (3, sum(widths))
    torch.testing.assert_close(staged["leaf_logp"], plain["leaf_logp"])
    torch.testing.assert_close(staged["features"], plain["features"])
    assert "stage_features" not in plain
    with pytest.raises(ValueError, match=r"1\.\.5 backbone stages, not 6"):
        model.set_stage_features(6)
    save_model(tmp_path / "best.pt", model)
    means = [np.zeros((2, w), np.float32) for w in widths]
    precision = [np.eye(w, dtype=np.float32) for w in widths]
    update_checkpoint(tmp_path / "best.pt", ood=ood_section(
        means, precision, ["ALL", "AML"], 3.0, 0.95, 0.05, scales=[1.0, 2.0, 4.0], stages=3))
    loaded, _ = load_model(tmp_path / "best.pt")
    assert loaded.ood_stages == 3
    with torch.no_grad():
        out = loaded(x)
    parts = torch.split(staged["stage_features"], widths, dim=1)
    expected = sum((p ** 2).sum(1) / s for p, s in zip(parts, [1.0, 2.0, 4.0], strict=True))
    np.testing.assert_allclose(out["ood_score"].numpy(), expected.numpy() / 3.0, rtol=1e-4)
    loaded.set_ood(None)
    assert loaded.ood is None and loaded.ood_stages == 1


def test_tree_nll_reads_inner_labels_as_the_sum_of_their_leaves(small_tree):
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]])
    # -(log P(A) + log P(B)) / 2 = -(log .5 + log .5) / 2
    assert tree_nll(small_tree, ["A", "B"], probs) == pytest.approx(np.log(2))


def test_a_node_with_few_images_keeps_temperature_one(leukemia7):
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(len(leukemia7.leaves)), size=200)
    few = fit_temperatures(leukemia7, ["ALL", "CLL"] * 5, probs[:10])
    assert set(few.values()) == {1.0}


def test_a_node_without_errors_is_sharpened_to_laplaces_rule(small_tree):
    # 38 cells, all right, each at 0.8 / 0.2 between A and B: the chosen child's
    # probability should become (38 + 1) / (38 + 2) = 0.975, i.e.
    # 1 / (1 + 0.25 ** (1 / T)) = 0.975  ->  T = ln 0.25 / ln(1 / 39) = 0.37840
    probs = np.array([[0.8, 0.2, 0.0], [0.2, 0.8, 0.0]] * 19)
    truth = ["A", "B"] * 19
    temps = fit_temperatures(small_tree, truth, probs)
    choice = small_tree.parent("A")
    assert temps[choice] == pytest.approx(np.log(0.25) / np.log(1 / 39), rel=1e-4)
    tempered = apply_temperatures(small_tree, probs, temps)
    assert tempered[:, :2].max(1).mean() == pytest.approx(0.975, abs=1e-5)
    # an over-confident error-free node is softened to the same level
    sharp = np.array([[0.999, 0.001, 0.0], [0.001, 0.999, 0.0]] * 19)
    soft = apply_temperatures(small_tree, sharp, fit_temperatures(small_tree, truth, sharp))
    assert soft[:, :2].max(1).mean() == pytest.approx(0.975, abs=1e-5)


def test_damaged_calibration_sections_are_named_not_a_traceback(tmp_path, leukemia7):
    from leukotree.errors import LeukotreeError

    model = build_model(leukemia7, ModelConfig(head="multihead", backbone="test_resnet",
                                               img_size=32))
    save_model(tmp_path / "best.pt", model)
    update_checkpoint(tmp_path / "best.pt", ood={"means": torch.zeros(2, 3),
                                                 "precision": torch.eye(3), "threshold": 1.0})
    with pytest.raises(LeukotreeError, match="damaged or was edited"):
        load_model(tmp_path / "best.pt")


@pytest.mark.parametrize("backbone", ["test_vit", "test_convnext", "test_efficientnet"])
def test_stage_widths_describe_the_stage_features_of_every_timm_family(backbone, leukemia7):
    model = build_model(leukemia7, ModelConfig(head="flat", backbone=backbone,
                                               img_size=32)).eval()
    model.set_stage_features(min(3, model.max_stages()))
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32) * 255)
    assert out["stage_features"].shape == (2, sum(model.stage_widths()))


def test_an_ood_section_that_does_not_fit_names_the_versions_that_wrote_it(tmp_path,
                                                                          leukemia7):
    import timm

    from leukotree.errors import LeukotreeError
    from leukotree.models.checkpoint import read_checkpoint

    model = build_model(leukemia7, ModelConfig(head="multihead", backbone="test_resnet",
                                               img_size=32))
    save_model(tmp_path / "best.pt", model)
    # six stages: more than this backbone has (a file from another timm, say)
    update_checkpoint(tmp_path / "best.pt", ood=ood_section(
        [np.zeros((1, 4))] * 6, [np.eye(4)] * 6, ["ALL"], 1.0, 0.95, 0.05, stages=6))
    with pytest.raises(LeukotreeError, match="damaged or was edited, or comes from other "
                                             r"versions\.$"):
        load_model(tmp_path / "best.pt")
    payload = read_checkpoint(tmp_path / "best.pt")
    payload["environment"]["timm"] = "9.9"
    torch.save(payload, tmp_path / "best.pt")
    with pytest.raises(LeukotreeError, match=rf"written with leukotree .*, timm 9\.9; this is "
                                             rf"leukotree .*, timm {timm.__version__}"):
        load_model(tmp_path / "best.pt")
