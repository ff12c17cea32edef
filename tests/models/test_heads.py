"""Conformance: every registered head x every paper backbone builds, runs forward and backward."""

import pytest
import torch

from leukotree.errors import LeukotreeError
from leukotree.models.backbones import PAPER_BACKBONES, load_weights, resolve_name
from leukotree.models.heads import HEADS, ModelConfig, Normalize, build_model, context_weight
from leukotree.taxonomy import Taxonomy, load_taxonomy

TAX = Taxonomy.from_tree({"A": None, "B": ["b1", "b2"]}, name="tiny")
SIZE = 75  # the smallest input inception_v3 accepts


def _step(model, size=SIZE, batch=2):
    model.train()
    x = torch.rand(batch, 3, size, size) * 255
    if model.head_type == "per-node":
        out = model(x, torch.from_numpy(TAX.encode_heads(["A", "b1"][:batch])))
    else:
        out = model(x)
    assert out["leaf_logp"].shape == (batch, len(model.taxonomy.leaves)) if "leaf_logp" in out \
        else True
    loss = sum(v.float().sum() for k, v in out.items() if k.startswith(("head:", "leaf_logp")))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.eval()
    with torch.no_grad():
        probs = model(x)["leaf_logp"].exp()
    assert torch.allclose(probs.sum(1), torch.ones(batch), atol=1e-5)


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("backbone", PAPER_BACKBONES)
def test_every_paper_backbone_with_every_head(head, backbone):
    if head == "hybrid" and resolve_name(backbone).startswith("tv:"):
        with pytest.raises(LeukotreeError, match="hybrid"):
            build_model(TAX, ModelConfig(head=head, hybrid_backbones=[backbone], img_size=SIZE))
        return
    config = ModelConfig(head=head, backbone=backbone, img_size=SIZE,
                         hybrid_backbones=[backbone])
    _step(build_model(TAX, config))


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit", "test_convnext",
                                      "test_efficientnet"])
@pytest.mark.parametrize("head", sorted(HEADS))
def test_tiny_backbones_on_leukemia7(head, backbone):
    tax = load_taxonomy("leukemia7")
    model = build_model(tax, ModelConfig(head=head, backbone=backbone, img_size=32,
                                         hybrid_backbones=[backbone, "test_resnet"]))
    x = torch.rand(3, 3, 32, 32) * 255
    model.eval()
    with torch.no_grad():
        out = model(x)
    probs = out["leaf_logp"].exp()
    assert probs.shape == (3, 7)
    # consistency: a node's probability is the sum of its leaves' and never below a child's
    node_p = probs @ torch.tensor(tax.node_leaf_matrix().T, dtype=torch.float32)
    for node in tax.nodes:
        parent = tax.parent(node)
        if parent != tax.root:
            i, j = tax.node_index[node], tax.node_index[parent]
            assert torch.all(node_p[:, i] <= node_p[:, j] + 1e-6)


def test_hybrid_binary_head_has_one_sigmoid_output():
    tax = load_taxonomy("cnmc")
    model = build_model(tax, ModelConfig(head="hybrid", img_size=32,
                                         hybrid_backbones=["test_resnet", "test_vit"]))
    assert model.classifier[-1].out_features == 1
    logp = model.eval()(torch.rand(2, 3, 32, 32) * 255)["leaf_logp"]
    assert torch.allclose(logp.exp().sum(1), torch.ones(2), atol=1e-6)


def test_multihead_has_one_head_per_inner_node():
    tax = load_taxonomy("leukemia7")
    model = build_model(tax, ModelConfig(head="multihead", backbone="test_resnet", img_size=32))
    assert [h.out_features for h in model.heads] == [3, 2, 3, 2]


def test_unknown_backbone_and_head_suggest_names():
    with pytest.raises(LeukotreeError, match="Did you mean 'resnet18'"):
        build_model(TAX, ModelConfig(backbone="resnet_18"))
    with pytest.raises(LeukotreeError, match="multihead"):
        build_model(TAX, ModelConfig(head="multi-head"))
    with pytest.raises(LeukotreeError, match="img_size"):
        build_model(TAX, ModelConfig(backbone="inception_v3", img_size=32))


def test_weights_load_from_a_local_file(tmp_path):
    a = build_model(TAX, ModelConfig(head="flat", backbone="test_resnet", img_size=32))
    b = build_model(TAX, ModelConfig(head="flat", backbone="test_resnet", img_size=32))
    path = tmp_path / "w.pt"
    torch.save({"state_dict": a.backbone.state_dict()}, path)
    missing, skipped = load_weights(b.backbone, path)
    assert missing == [] and skipped == []
    for (k, va), vb in zip(a.backbone.state_dict().items(), b.backbone.state_dict().values(),
                           strict=True):
        assert torch.equal(va, vb), k
    bad = tmp_path / "other.pt"
    torch.save({"x": torch.zeros(3)}, bad)
    with pytest.raises(LeukotreeError, match="same architecture"):
        load_weights(b.backbone, bad)
    with pytest.raises(LeukotreeError, match="does not exist"):
        load_weights(b.backbone, tmp_path / "missing.pt")


def test_feature_extractor_loads_a_whole_network_state_dict(tmp_path):
    import timm

    from leukotree.models.backbones import create_feature_extractor

    whole = timm.create_model("test_resnet", num_classes=1000)
    path = tmp_path / "test_resnet.pth"
    torch.save(whole.state_dict(), path)
    extractor = create_feature_extractor("test_resnet", img_size=32, weights=path)
    reference = whole.state_dict()
    shared = [k for k in extractor.state_dict() if k in reference]
    assert len(shared) == len(extractor.state_dict())  # timm keeps the names
    assert all(torch.equal(extractor.state_dict()[k], reference[k]) for k in shared)
    other = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(3)}, other)
    with pytest.raises(LeukotreeError, match="same architecture"):
        create_feature_extractor("test_resnet", img_size=32, weights=other)


def test_hybrid_weight_files_parse_and_name_the_fix():
    from leukotree.models.backbones import hybrid_weight_files

    names = ["vgg16", "legacy_xception"]
    assert hybrid_weight_files("vgg16=a.pth, legacy_xception=b.pth", names) == {
        "vgg16": "a.pth", "legacy_xception": "b.pth"}
    with pytest.raises(LeukotreeError, match="NAME=PATH"):
        hybrid_weight_files("a.pth", names)
    with pytest.raises(LeukotreeError, match="Did you mean 'vgg16'"):
        hybrid_weight_files("vgg61=a.pth", names)


def test_unreachable_hub_gives_a_clear_error_for_every_kind_of_backbone(monkeypatch):
    import timm

    from leukotree.models.backbones import create_backbone, create_feature_extractor

    def offline(*args, **kwargs):
        # weights passed as a state dict (pretrained_cfg_overlay) need no network
        if kwargs.get("pretrained") and "pretrained_cfg_overlay" not in kwargs:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(LeukotreeError, match="--weights PATH"):
        create_backbone("resnet18", img_size=64, pretrained=True)
    with pytest.raises(LeukotreeError, match="--weights PATH"):
        create_feature_extractor("test_resnet", img_size=32, pretrained=True)


def test_context_mask_flattens_the_surroundings_and_keeps_the_centre():
    size = 40
    w = context_weight(size, 0.3)[0, 0]
    assert w[20, 20] > 0.99 and w[0, 0] < 0.01  # centre kept, corner flattened
    assert w[20, 20:].diff().le(0).all()  # falls off with the distance from the centre
    norm = Normalize([0.0] * 3, [1 / 255] * 3, context_radius=0.3, size=size)
    x = torch.full((2, 3, size, size), 100.0)
    x[0, :, :3] = 250.0  # a bright red-cell band at the top of the first image only
    out = norm(x)
    # the band's variation is gone: every far pixel has one colour per image ...
    assert (out[0, :, :3] - out[0, :, 0:1, 0:1]).abs().max() < 2
    # ... the centre is untouched, and an image without context is left as it is
    assert torch.allclose(out[0, :, 20, 20], torch.full((3,), 100.0), atol=0.5)
    assert torch.allclose(out[1], x[1])
    # other input sizes get their own mask
    assert norm(torch.full((1, 3, 24, 24), 7.0)).shape == (1, 3, 24, 24)
    off = Normalize([0.0] * 3, [1 / 255] * 3)
    assert torch.equal(off(x), x)


def test_a_model_config_without_the_newer_options_reads_as_off_and_saves_without_them():
    d = ModelConfig(backbone="test_resnet").to_dict()
    # a model that does not use them is saved as before they existed (older versions read it)
    assert not {"context_radius", "pixel_size", "field_um", "input_pixel_size"} & set(d)
    model = build_model(TAX, ModelConfig.from_dict(d))
    assert model.normalize.context is None
    used = ModelConfig(backbone="test_resnet", context_radius=0.3, pixel_size=0.5,
                       field_um=20.0, input_pixel_size=0.25).to_dict()
    assert used["context_radius"] == 0.3 and used["field_um"] == 20.0
    # saved only when set (adapt --pixel-size), and read back as the decoding scale
    assert ModelConfig.from_dict(used).decode_options()["window"] == 80.0
