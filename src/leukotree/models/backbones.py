"""Feature extractors from the timm zoo (and torchvision's GoogLeNet, which timm lacks).

Every backbone is created with ``pretrained=False`` unless asked; weights come
from a local file (``--weights PATH``: a timm/torchvision state dict, as
safetensors or a torch file read with ``weights_only=True``) or, when asked for
with ``pretrained=True``, from the Hugging Face hub if it is reachable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from leukotree.errors import LeukotreeError, did_you_mean

#: Short names accepted on the command line, and the model each one builds.
ALIASES = {
    "xception": "legacy_xception",
    "inception": "inception_v3",
    "vit_small": "vit_small_patch16_224",
    "googlenet": "tv:googlenet",
}

#: The backbones of the two papers (any other timm name works too).
PAPER_BACKBONES = (
    "resnet18", "resnet50", "densenet121", "inception_v3", "googlenet", "convnext_tiny",
    "vit_small_patch16_224", "vgg16", "legacy_xception",
)

# Families whose position embeddings depend on the input size.
_SIZE_AWARE = ("vit", "deit", "beit", "eva", "test_vit", "maxvit", "coatnet", "swin",
               "test_maxvit", "test_coatnet")
# Smallest input each family accepts (inception_v3 pools to nothing below 75 px).
MIN_INPUT = {"inception_v3": 75, "tv:googlenet": 32, "legacy_xception": 71}


def resolve_name(name: str) -> str:
    """Map an alias to the model name and check that it exists."""
    name = ALIASES.get(name, name)
    if name.startswith("tv:"):
        if name != "tv:googlenet":
            raise LeukotreeError(
                f"Unknown torchvision backbone '{name}': only tv:googlenet is wired in; "
                "use a timm name for the others."
            )
        return name
    if not timm.is_model(name):
        raise LeukotreeError(
            f"Unknown backbone '{name}': not a timm model name."
            + did_you_mean(name, [*timm.list_models(), *ALIASES])
            + " List them with: python -c 'import timm; print(timm.list_models())'."
        )
    return name


def _timm_kwargs(name: str, img_size: int) -> dict[str, object]:
    if name.startswith(_SIZE_AWARE):
        return {"img_size": img_size}
    return {}


def check_input_size(name: str, img_size: int) -> None:
    low = MIN_INPUT.get(resolve_name(name), 16)
    if img_size < low:
        raise LeukotreeError(
            f"The 'img_size' parameter ({img_size}) is too small for backbone '{name}', "
            f"which needs at least {low} pixels."
        )


class TorchvisionGoogLeNet(nn.Module):
    """torchvision's GoogLeNet without its classifier, with timm's feature interface."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import googlenet

        net = googlenet(weights=None, aux_logits=False, init_weights=True)
        net.fc = nn.Identity()
        self.net = net
        self.num_features = 1024

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool1(n.conv1(x))
        x = n.maxpool2(n.conv3(n.conv2(x)))
        x = n.maxpool3(n.inception3b(n.inception3a(x)))
        x = n.inception4e(n.inception4d(n.inception4c(n.inception4b(n.inception4a(x)))))
        return n.inception5b(n.inception5a(n.maxpool4(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net.avgpool(self.forward_features(x)), 1)


#: Normalisation layers a backbone can be built with: ``batch``, the model's own (batch
#: normalisation for CNNs); ``group``, GroupNorm in place of every batch-norm layer
#: (:func:`to_group_norm`).
NORMS = ("batch", "group")


def to_group_norm(model: nn.Module, name: str) -> nn.Module:
    """Replace every 2-d batch-norm layer of ``model`` by GroupNorm (Wu & He 2018) over
    ``gcd(32, channels)`` groups: per image, with no running statistics, so another lab's
    batch of cells cannot shift them. timm's fused norm + activation layers keep their
    activation (``GroupNormAct``). A backbone without batch norm is refused."""
    from timm.layers import BatchNormAct2d, GroupNormAct

    swapped = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BatchNormAct2d):
                new: nn.Module = GroupNormAct(child.num_features,
                                              math.gcd(32, child.num_features),
                                              eps=child.eps, affine=child.affine)
                new.act, new.drop = child.act, child.drop
            elif isinstance(child, nn.BatchNorm2d):
                new = nn.GroupNorm(math.gcd(32, child.num_features), child.num_features,
                                   eps=child.eps, affine=child.affine)
            else:
                continue
            setattr(parent, child_name, new)
            swapped += 1
    if not swapped or any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                          for m in model.modules()):
        raise LeukotreeError(
            f"Backbone '{name}' has no 2-d batch-normalisation layers that GroupNorm can "
            "replace (the 'norm' parameter 'group' is for CNNs with batch norm such as "
            "resnet18, resnet50 or densenet121); use norm batch.")
    return model


def create_backbone(
    name: str,
    *,
    img_size: int,
    pretrained: bool = False,
    weights: str | Path | None = None,
    drop_rate: float = 0.0,
    norm: str = "batch",
) -> nn.Module:
    """A backbone whose ``forward`` returns pooled features of size ``num_features``,
    with the normalisation layers ``norm`` (see :data:`NORMS`)."""
    full = resolve_name(name)
    check_input_size(full, img_size)
    if norm not in NORMS:
        raise LeukotreeError(f"The 'norm' parameter must be one of {', '.join(NORMS)}; "
                             f"got {norm!r}.")
    if norm != "batch" and (full == "tv:googlenet" or pretrained or weights is not None):
        raise LeukotreeError(
            f"The 'norm' parameter '{norm}' builds backbone '{name}' from scratch with other "
            "normalisation layers than its published weights (and torchvision's GoogLeNet "
            "cannot be rebuilt): leave out --pretrained/--weights, or use norm batch.")
    if full == "tv:googlenet":
        if pretrained:
            raise LeukotreeError(
                "GoogLeNet comes from torchvision, which cannot download here; pass its "
                "ImageNet weights with --weights PATH instead of --pretrained."
            )
        model: nn.Module = TorchvisionGoogLeNet()
    else:
        model = _from_timm(full, pretrained, num_classes=0, drop_rate=drop_rate,
                           **_timm_kwargs(full, img_size))
        if norm == "group":
            model = to_group_norm(model, name)
    if weights is not None:
        load_weights(model, weights)
    return model


def _from_timm(full: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model``; a failed hub download becomes an error that gives the fix."""
    try:
        return timm.create_model(full, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if not pretrained:
            raise
        raise LeukotreeError(
            f"Could not fetch pretrained weights for '{full}' from the Hugging Face hub "
            f"({type(err).__name__}: {err}). Without network access, download the "
            "weights on a connected machine (for example with "
            f"timm.create_model('{full}', pretrained=True) and torch.save of its "
            "state_dict) and pass the file with --weights PATH."
        ) from None


def create_feature_extractor(name: str, *, img_size: int, n_stages: int = 3,
                             pretrained: bool = False, weights: str | Path | None = None,
                             ) -> nn.Module:
    """A timm ``features_only`` model returning the last ``n_stages`` feature maps.

    ``weights``: a state dict of the whole network (as for :func:`create_backbone`);
    it is checked against the full model, then timm maps it onto the feature model.
    """
    full = resolve_name(name)
    check_input_size(full, img_size)
    if full.startswith("tv:"):
        raise LeukotreeError(
            f"Backbone '{name}' cannot serve the hybrid head (no multi-stage features); "
            "use a timm backbone such as vgg16, inception_v3 or legacy_xception."
        )
    kwargs: dict[str, Any] = {"features_only": True, "out_indices": tuple(range(-n_stages, 0)),
                              **_timm_kwargs(full, img_size)}
    if weights is not None:
        whole = timm.create_model(full, pretrained=False, **_timm_kwargs(full, img_size))
        load_weights(whole, weights)
        kwargs["pretrained_cfg_overlay"] = {"state_dict": whole.state_dict()}
        return timm.create_model(full, pretrained=True, **kwargs)
    return _from_timm(full, pretrained, **kwargs)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (never executing code)."""
    path = Path(path)
    if not path.is_file():
        raise LeukotreeError(f"Weights file '{path}' does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise LeukotreeError(
                f"Cannot read weights file '{path}' safely ({err}). Only plain state dicts "
                "(tensors) are accepted; re-save with torch.save(model.state_dict(), PATH)."
            ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise LeukotreeError(f"Weights file '{path}' does not hold a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_weights(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Load matching tensors from ``path``; classifier layers that do not fit are skipped.

    Returns ``(missing, skipped)`` key lists; raises when nothing matches.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    # torchvision GoogLeNet keys live under "net." in our wrapper.
    if own and all(k.startswith("net.") for k in own):
        state = {k if k.startswith("net.") else f"net.{k}": v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise LeukotreeError(
            f"No tensor of weights file '{path}' matches the backbone (by name and shape); "
            "is it the weights of the same architecture?"
        )
    model.load_state_dict(usable, strict=False)
    missing = sorted(set(own) - set(usable))
    skipped = sorted(set(state) - set(usable))
    return missing, skipped


def hybrid_weight_files(spec: str, backbones: list[str]) -> dict[str, str]:
    """``"vgg16=a.pth,legacy_xception=b.pth"`` -> ``{backbone: file}`` for the hybrid head.

    Backbones without a file keep their random initialisation.
    """
    files: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep:
            raise LeukotreeError(
                f"--weights {spec!r}: the hybrid head has {len(backbones)} backbones "
                f"({', '.join(backbones)}), so give one file per backbone as "
                "NAME=PATH,NAME=PATH (e.g. vgg16=vgg16.pth).")
        name = name.strip()
        if name not in backbones:
            raise LeukotreeError(
                f"--weights names backbone '{name}', which is not one of the hybrid head's "
                f"backbones ({', '.join(backbones)})." + did_you_mean(name, backbones))
        files[name] = path.strip()
    return files
