"""ONNX export of the whole pipeline, and an ONNX Runtime model with the PyTorch interface.

The exported graph takes ``images``: float32 ``(B, 3, S, S)`` in the 0-255 range
(the training set's normalisation is inside) and returns ``leaf_probs``
``(B, n_leaves)`` and ``node_probs`` ``(B, n_nodes)`` (``P(node) = sum of its
leaves``, so the tree is consistent). The taxonomy, image size and centre crop
travel in the file's metadata, so ``leukotree predict`` accepts the ``.onnx`` file
as RUN.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leukotree.checkpoint import load_model
from leukotree.errors import LeukotreeError
from leukotree.models import ModelConfig
from leukotree.taxonomy import Taxonomy


class TreeProbabilities(nn.Module):
    """Wraps a tree classifier to output leaf and node probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        matrix = torch.tensor(model.taxonomy.node_leaf_matrix().T, dtype=torch.float32)
        self.register_buffer("leaf_to_node", matrix)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = self.model(images)["leaf_logp"].exp()
        return leaf, leaf @ self.leaf_to_node


def export_onnx(run: str | Path, out: str | Path, *, opset: int = 17) -> Path:
    """Export the model of ``run`` to ``out`` (one ONNX file with its metadata)."""
    try:
        import onnx
    except ImportError:
        raise LeukotreeError("ONNX export needs the onnx extra: pip install "
                             "'leukotree[onnx]'.") from None
    model, payload = load_model(run)
    size = int(payload["model_config"]["img_size"])
    wrapper = TreeProbabilities(model).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.rand(2, 3, size, size) * 255
    torch.onnx.export(
        wrapper, (dummy,), str(out), input_names=["images"],
        output_names=["leaf_probs", "node_probs"],
        dynamic_axes={"images": {0: "batch"}, "leaf_probs": {0: "batch"},
                      "node_probs": {0: "batch"}},
        opset_version=opset, dynamo=False,
    )
    proto = onnx.load(str(out))
    meta = {"leukotree_format": "leukotree-onnx/1",
            "taxonomy": json.dumps(payload["taxonomy"]),
            "model_config": json.dumps(payload["model_config"])}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


class OnnxClassifier:
    """An exported model run by ONNX Runtime, usable where a PyTorch model is expected."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise LeukotreeError("Running an ONNX model needs the onnx extra: pip install "
                                 "'leukotree[onnx]'.") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("leukotree_format") != "leukotree-onnx/1":
            raise LeukotreeError(f"'{path}' is not an ONNX file exported by leukotree.")
        self.taxonomy = Taxonomy.from_dict(json.loads(meta["taxonomy"]), source=str(path))
        self.config = ModelConfig.from_dict(json.loads(meta["model_config"]))
        self.payload: dict[str, Any] = {"model_config": self.config.to_dict(),
                                        "taxonomy": self.taxonomy.to_dict()}

    def eval(self) -> OnnxClassifier:
        return self

    def to(self, device: object) -> OnnxClassifier:
        return self

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.detach().cpu().float().contiguous().numpy()
        leaf, _ = self.session.run(None, {"images": x})
        return {"leaf_logp": torch.from_numpy(np.log(np.clip(leaf, 1e-30, None)))}


def load_any(run: str | Path) -> tuple[Any, dict[str, Any]]:
    """A PyTorch run/checkpoint or an exported ``.onnx`` file, with its payload."""
    if str(run).endswith(".onnx"):
        model = OnnxClassifier(run)
        return model, model.payload
    return load_model(run)
