"""Predictors: one protocol for a PyTorch model, an ONNX Runtime session (and, later,
ensembles), and batched prediction from image files that never holds all images in
memory.

A :class:`Predictor` maps uint8 pixels ``(N, S, S, 3)`` (already decoded, resized and
centre-cropped as its ``model_config`` says) to leaf probabilities ``(N, n_leaves)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from leukotree.data.images import (
    DEFAULT_MAX_PIXELS,
    ON_ERROR,
    iter_decoded,
    raise_for_errors,
    to_tensor,
)
from leukotree.errors import LeukotreeError
from leukotree.models import ModelConfig, TreeClassifier
from leukotree.optional import available, require
from leukotree.progress import make_progress
from leukotree.taxonomy import Taxonomy

#: Inference engines of ``leukotree predict``; see :func:`load_predictor`.
ENGINES = ("auto", "torch", "onnx")
ONNX_FORMAT = "leukotree-onnx/1"


class Predictor(Protocol):
    """What prediction needs of a model, whatever runs it."""

    taxonomy: Taxonomy
    model_config: ModelConfig
    engine: str

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Leaf probabilities ``(N, n_leaves)`` of uint8 pixels ``(N, S, S, 3)``."""
        ...


class TorchPredictor:
    """A :class:`~leukotree.models.TreeClassifier` (or a compiled one) in eval mode on
    ``device``, optionally in channels_last memory format."""

    engine = "torch"

    def __init__(self, model: TreeClassifier, device: torch.device | str = "cpu", *,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        self.channels_last = channels_last
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.taxonomy = model.taxonomy
        self.model_config = model.config

    @torch.no_grad()
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = to_tensor(pixels, self.device, channels_last=self.channels_last)
        return self.model(x)["leaf_logp"].float().exp().cpu().numpy()


class OnnxPredictor:
    """A model exported by :func:`~leukotree.inference.export.export_onnx`, run by ONNX
    Runtime; the taxonomy and model configuration come from the file's metadata."""

    engine = "onnxruntime"

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        ort = require("onnxruntime", extra="onnx", purpose="Running an ONNX model")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types
            raise LeukotreeError(f"ONNX Runtime cannot load '{path}' ({type(err).__name__}: "
                                 f"{str(err).strip().splitlines()[0]}).") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("leukotree_format") != ONNX_FORMAT:
            raise LeukotreeError(f"'{path}' is not an ONNX file exported by leukotree.")
        self.taxonomy = Taxonomy.from_dict(json.loads(meta["taxonomy"]), source=str(path))
        self.model_config = ModelConfig.from_dict(json.loads(meta["model_config"]),
                                                  source=f"'{path}'")

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
        leaf, _ = self.session.run(None, {"images": x})
        return leaf


def dihedral_mean(predictor: Predictor, pixels: np.ndarray) -> np.ndarray:
    """Leaf probabilities averaged over the 8 symmetries of the square (flips, rotations)."""
    total = np.zeros((len(pixels), len(predictor.taxonomy.leaves)), np.float64)
    for flip in (False, True):
        base = pixels[:, :, ::-1] if flip else pixels
        for k in range(4):
            total += predictor.predict(np.ascontiguousarray(np.rot90(base, k, axes=(1, 2))))
    return (total / 8).astype(np.float32)


@dataclass
class Predictions:
    """Leaf probabilities per image; rows of unreadable images are NaN with an error."""

    paths: list[Path]
    leaf_probs: np.ndarray
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def predict_paths(
    predictor: Predictor,
    paths: Sequence[Path],
    *,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    on_error: str = "report",
    tta: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Predictions:
    """Leaf probabilities of every image; decoding overlaps with the model's work.

    ``on_error="raise"`` raises one :class:`~leukotree.errors.DataError` listing every
    unreadable image; ``"report"`` keeps going and records the error in its row.
    ``tta`` averages over the 8 flips and 90-degree rotations (smears have no
    orientation), at 8 times the cost.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}; got {on_error!r}")
    if batch_size < 1:
        raise LeukotreeError(f"The 'batch_size' parameter must be >= 1; got {batch_size}.")
    paths = [Path(p) for p in paths]
    cfg = predictor.model_config
    probs = np.full((len(paths), len(predictor.taxonomy.leaves)), np.nan, np.float32)
    errors: list[str | None] = [None] * len(paths)
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("Predicting", total=len(paths), rate="")
        for idx, decoded in iter_decoded(paths, cfg.img_size, chunk=batch_size,
                                         crop=float(cfg.crop_fraction), workers=workers,
                                         max_pixels=max_pixels):
            good = np.flatnonzero(decoded.ok)
            for j, err in enumerate(decoded.errors):
                errors[idx[j]] = err
            if len(good):
                pixels = decoded.pixels[good]
                out = dihedral_mean(predictor, pixels) if tta else predictor.predict(pixels)
                probs[idx[good]] = out
            bar.update(task, advance=len(idx))
    if on_error == "raise":
        raise_for_errors(errors)
    return Predictions(paths, probs, errors)


def load_predictor(run: str | Path, engine: str = "auto") -> tuple[Predictor, dict[str, Any]]:
    """A predictor for ``run`` (a run folder, its ``.pt`` or an exported ``.onnx``) and a
    description: ``engine``, ``engine_note`` (why the engine differs from the one asked
    for) and, for checkpoints, the checkpoint's payload.

    ``engine``: ``onnx`` runs ONNX Runtime (an ``.onnx`` file as given, a checkpoint
    through :func:`~leukotree.inference.export.cached_onnx`); ``torch`` runs the
    checkpoint in eager PyTorch; ``auto`` (the default) picks ONNX Runtime when the onnx
    extra is installed, since on CPUs it predicts faster end to end than eager PyTorch
    (``benchmarks/bench_predict.py``), and PyTorch otherwise.
    """
    from leukotree.inference.export import cached_onnx
    from leukotree.models.checkpoint import load_model

    if engine not in ENGINES:
        raise LeukotreeError(f"The 'engine' parameter must be one of {', '.join(ENGINES)}; "
                             f"got {engine!r}.")
    if str(run).endswith(".onnx"):
        if engine == "torch":
            raise LeukotreeError(f"'{run}' is an ONNX file: it runs with --engine onnx or "
                                 "auto; give the run folder or its .pt file for --engine torch.")
        return OnnxPredictor(run), {"engine": OnnxPredictor.engine}
    note = None
    if engine == "onnx" or (engine == "auto" and available("onnx", "onnxruntime")):
        try:
            return OnnxPredictor(cached_onnx(run)), {"engine": OnnxPredictor.engine}
        except Exception as err:  # auto falls back to PyTorch, saying why
            if engine == "onnx" or isinstance(err, LeukotreeError):
                raise
            note = (f"ONNX export failed ({type(err).__name__}: {err}); predicting with "
                    "PyTorch instead")
    model, payload = load_model(run)
    return TorchPredictor(model), {"engine": "torch", "engine_note": note, "payload": payload}
