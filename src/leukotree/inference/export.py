"""ONNX export of the whole pipeline (run by :class:`~leukotree.inference.predictor.OnnxPredictor`).

The exported graph takes ``images``: float32 ``(B, 3, S, S)`` in the 0-255 range
(the training set's normalisation is inside) and returns ``leaf_probs``
``(B, n_leaves)`` and ``node_probs`` ``(B, n_nodes)`` (``P(node) = sum of its
leaves``, so the tree is consistent). The taxonomy, image size and centre crop
travel in the file's metadata, so ``leukotree predict`` accepts the ``.onnx`` file
as RUN.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from leukotree.inference.predictor import ONNX_FORMAT
from leukotree.models.checkpoint import load_model, read_checkpoint
from leukotree.optional import require
from leukotree.rundir import RunDir
from leukotree.tree import LeafToNode


class TreeProbabilities(nn.Module):
    """Wraps a tree classifier to output leaf and node probabilities."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.to_nodes = LeafToNode(model.taxonomy)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = self.model(images)["leaf_logp"].exp()
        return leaf, self.to_nodes(leaf)


def export_onnx(run: str | Path, out: str | Path, *, opset: int = 17) -> Path:
    """Export the model of ``run`` to ``out`` (one ONNX file with its metadata)."""
    onnx = require("onnx", extra="onnx", purpose="ONNX export")
    model, payload = load_model(run)
    size = int(payload["model_config"]["img_size"])
    wrapper = TreeProbabilities(model).eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.rand(2, 3, size, size) * 255
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice, and tracer notes on shapes that
        # are fixed by the model's image size.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (dummy,), str(out), input_names=["images"],
            output_names=["leaf_probs", "node_probs"],
            dynamic_axes={"images": {0: "batch"}, "leaf_probs": {0: "batch"},
                          "node_probs": {0: "batch"}},
            opset_version=opset, dynamo=False,
        )
    proto = onnx.load(str(out))
    meta = {"leukotree_format": ONNX_FORMAT,
            "taxonomy": json.dumps(payload["taxonomy"]),
            "model_config": json.dumps(payload["model_config"])}
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


def cached_onnx(checkpoint: str | Path) -> Path:
    """The ONNX export of a checkpoint, made once and kept beside it.

    ``RUN/best.pt`` -> ``RUN/best.onnx``, exported again whenever the checkpoint
    is newer than the export. Where the run folder is read-only the export goes
    to the system's temporary folder instead.
    """
    checkpoint = RunDir.checkpoint_of(checkpoint)
    if not checkpoint.is_file():
        read_checkpoint(checkpoint)  # raises the error that says what to give
    target = checkpoint.with_suffix(".onnx")
    if not os.access(checkpoint.parent, os.W_OK):
        digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:16]
        target = Path(tempfile.gettempdir()) / f"leukotree-{digest}.onnx"
    if target.exists() and target.stat().st_mtime >= checkpoint.stat().st_mtime:
        return target
    tmp = target.with_suffix(".onnx.tmp")
    export_onnx(checkpoint, tmp)
    tmp.replace(target)
    return target
