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
import os
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


#: Inference engines of ``leukotree predict``; see :func:`load_any`.
ENGINES = ("auto", "torch", "onnx")


def onnx_available() -> bool:
    """True when both the exporter (``onnx``) and ONNX Runtime are installed."""
    from importlib.util import find_spec

    return find_spec("onnx") is not None and find_spec("onnxruntime") is not None


def cached_onnx(checkpoint: str | Path) -> Path:
    """The ONNX export of a checkpoint, made once and kept beside it.

    ``RUN/best.pt`` -> ``RUN/best.onnx``, exported again whenever the checkpoint
    is newer than the export. Where the run folder is read-only the export goes
    to the system's temporary folder instead.
    """
    import hashlib
    import tempfile
    import warnings

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "best.pt"
    target = checkpoint.with_suffix(".onnx")
    if not os.access(checkpoint.parent, os.W_OK):
        digest = hashlib.sha256(str(checkpoint.resolve()).encode()).hexdigest()[:16]
        target = Path(tempfile.gettempdir()) / f"leukotree-{digest}.onnx"
    if target.exists() and target.stat().st_mtime >= checkpoint.stat().st_mtime:
        return target
    tmp = target.with_suffix(".onnx.tmp")
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        export_onnx(checkpoint, tmp)
    tmp.replace(target)
    return target


def load_any(run: str | Path, engine: str = "auto") -> tuple[Any, dict[str, Any]]:
    """A model ready for prediction, and its payload (``payload["engine"]`` says which).

    ``engine``: ``onnx`` runs ONNX Runtime (an ``.onnx`` file as given, a PyTorch
    checkpoint through :func:`cached_onnx`); ``torch`` runs the checkpoint in eager
    PyTorch; ``auto`` (the default) picks ONNX Runtime when the onnx extra is
    installed, since on CPUs it predicts faster end to end than eager PyTorch
    (``benchmarks/bench_predict.py``), and PyTorch otherwise.
    """
    if engine not in ENGINES:
        raise LeukotreeError(f"The 'engine' parameter must be one of {', '.join(ENGINES)}; "
                             f"got {engine!r}.")
    if str(run).endswith(".onnx"):
        if engine == "torch":
            raise LeukotreeError(f"'{run}' is an ONNX file: it runs with --engine onnx or "
                                 "auto; give the run folder or its .pt file for --engine torch.")
        model = OnnxClassifier(run)
        return model, model.payload | {"engine": "onnxruntime"}
    note = None
    if engine == "onnx" or (engine == "auto" and onnx_available()):
        try:
            model = OnnxClassifier(cached_onnx(run))
            return model, model.payload | {"engine": "onnxruntime"}
        except Exception as err:  # auto falls back to PyTorch, saying why
            if engine == "onnx" or isinstance(err, LeukotreeError):
                raise
            note = (f"ONNX export failed ({type(err).__name__}: {err}); predicting with "
                    "PyTorch instead")
    model, payload = load_model(run)
    return model, payload | {"engine": "torch"} | ({"engine_note": note} if note else {})
