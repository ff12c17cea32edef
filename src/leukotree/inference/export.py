"""ONNX export of the whole pipeline (run by :class:`~leukotree.inference.predictor.OnnxPredictor`).

The exported graph takes ``images``: float32 ``(B, 3, S, S)`` in the 0-255 range
(the training set's normalisation is inside) and returns ``leaf_probs``
``(B, n_leaves)``, ``node_probs`` ``(B, n_nodes)`` (``P(node) = sum of its
leaves``, so the tree is consistent), ``features`` ``(B, D)``, with a cell-type
head ``cell_probs`` and, when fitted, ``ood_score`` ``(B, 1)``. Fitted temperatures
and the out-of-distribution score are part of the graph
(:mod:`leukotree.models.calibration`). The taxonomy, image size, centre crop, any
fitted patient-level model, the calibration figures and the conformal answers'
thresholds travel in the file's metadata,
so ``leukotree predict`` accepts the ``.onnx`` file as RUN.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from leukotree.errors import LeukotreeError
from leukotree.models.checkpoint import ONNX_FORMAT, load_model, read_checkpoint
from leukotree.models.nodes import LeafToNode
from leukotree.optional import require
from leukotree.rundir import RunDir


class TreeProbabilities(nn.Module):
    """Wraps a tree classifier to output leaf and node probabilities, the pooled
    features and, with a cell-type head, the cell-type probabilities."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.keys = list(keys)  # the optional outputs the model gives
        self.to_nodes = LeafToNode(model.taxonomy)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        leaf = out["leaf_logp"].exp()
        extra = {"features": lambda: out["features"],
                 "cell_probs": lambda: out["cell_logp"].exp(),
                 "ood_score": lambda: out["ood_score"][:, None]}
        return (leaf, self.to_nodes(leaf), *(extra[k]() for k in self.keys))


def export_onnx(run: str | Path, out: str | Path, *, opset: int = 17,
                source_sha256: str | None = None) -> Path:
    """Export the model of ``run`` to ``out`` (one ONNX file with its metadata;
    ``source_sha256``, the checkpoint's digest, lets a cache verify the export)."""
    onnx = require("onnx", extra="onnx", purpose="ONNX export")
    model, payload = load_model(run)
    size = int(payload["model_config"]["img_size"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.rand(2, 3, size, size) * 255
    with torch.no_grad():
        given = model.eval()(dummy)
    keys = [k for k, src in (("features", "features"), ("cell_probs", "cell_logp"),
                             ("ood_score", "ood_score")) if src in given]
    names = ["leaf_probs", "node_probs", *keys]
    wrapper = TreeProbabilities(model, keys).eval()
    with warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice, and tracer notes on shapes that
        # are fixed by the model's image size.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (dummy,), str(out), input_names=["images"], output_names=names,
            dynamic_axes={"images": {0: "batch"}} | {n: {0: "batch"} for n in names},
            opset_version=opset, dynamo=False,
        )
    proto = onnx.load(str(out))
    meta = {"leukotree_format": ONNX_FORMAT,
            "taxonomy": json.dumps(payload["taxonomy"]),
            "model_config": json.dumps(payload["model_config"])}
    if source_sha256:
        meta["source_sha256"] = source_sha256
    if payload.get("patient_model") is not None:
        meta["patient_model"] = json.dumps(payload["patient_model"])
    if payload.get("calibration") is not None:
        meta["calibration"] = json.dumps(payload["calibration"])
    if payload.get("ood") is not None:
        meta["ood"] = json.dumps({k: payload["ood"][k] for k in ("threshold", "quantile",
                                                                 "val_flagged", "classes")})
    if payload.get("conformal") is not None:
        meta["conformal"] = json.dumps(payload["conformal"])
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    return out


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def private_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/leukotree/onnx`` (or ``~/.cache/...``), created readable by this
    user only; refused when it belongs to someone else or others may write to it."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "leukotree" / "onnx"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise LeukotreeError(
            f"The ONNX cache folder '{folder}' belongs to another user or others may write "
            "to it; fix its owner and permissions (chmod 700) or predict with --engine torch.")
    return folder


def _export_source(path: Path) -> str | None:
    """The checkpoint digest recorded in an export of the current format (``None`` for an
    unreadable, foreign or older export, which is made again)."""
    onnx = require("onnx", extra="onnx", purpose="ONNX export")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # a damaged or foreign file is exported again
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    return meta.get("source_sha256") if meta.get("leukotree_format") == ONNX_FORMAT else None


def cached_onnx(checkpoint: str | Path) -> Path:
    """The ONNX export of a checkpoint, made once and kept beside it.

    ``RUN/best.pt`` -> ``RUN/best.onnx``; where the run folder is read-only, in this
    user's private cache folder (:func:`private_cache_dir`). The export records the
    SHA-256 of the checkpoint it came from and is used only while that matches, so a
    changed checkpoint (or a file planted in its place) is exported again.
    """
    checkpoint = RunDir.checkpoint_of(checkpoint)
    if not checkpoint.is_file():
        read_checkpoint(checkpoint)  # raises the error that says what to give
    digest = file_sha256(checkpoint)
    target = checkpoint.with_suffix(".onnx")
    if not os.access(checkpoint.parent, os.W_OK):
        target = private_cache_dir() / f"{digest[:32]}.onnx"
    if target.is_file() and not target.is_symlink() and _export_source(target) == digest:
        return target
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".export-", suffix=".onnx")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        export_onnx(checkpoint, tmp, source_sha256=digest)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp made it private; the export is not secret
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
