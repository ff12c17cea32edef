"""Predictors: one protocol for a PyTorch model and an ONNX Runtime session (ensembles:
:mod:`.ensemble`; which one a path needs: :mod:`.loader`), and batched prediction from
image files that never holds all images in memory.

A :class:`Predictor` maps uint8 pixels ``(N, S, S, 3)`` (already decoded, resized and
centre-cropped as its ``model_config`` says) to leaf probabilities ``(N, n_leaves)``
(:meth:`Predictor.predict`), or to all the model's per-cell outputs
(:meth:`Predictor.outputs`: also ``features``, with a cell-type head
``cell_probs`` and, when fitted, ``ood_score`` ``(N, 1)``; a calibrated PyTorch model
also ``leaf_probs_raw``, before its temperatures), and may carry a fitted
patient-level model (``patient_model``) and conformal answers (``conformal``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from leukotree.inference.conformal import ConformalAnswers
from leukotree.inference.options import check_option, input_config
from leukotree.models import ModelConfig, TreeClassifier
from leukotree.models.checkpoint import ONNX_FORMAT
from leukotree.optional import require
from leukotree.patients.fit import FittedPatientModel
from leukotree.progress import make_progress
from leukotree.taxonomy import Taxonomy

#: Per-cell outputs every predictor gives (``cell_probs`` only with a cell-type head).
OUTPUTS = ("leaf_probs", "features", "cell_probs", "ood_score")


class Predictor(Protocol):
    """What prediction needs of a model, whatever runs it."""

    taxonomy: Taxonomy
    model_config: ModelConfig
    engine: str
    cell_taxonomy: Taxonomy | None
    patient_model: FittedPatientModel | None
    #: Share of its own validation cells the model flags as unclassifiable.
    expected_ood: float
    #: The conformal answers' thresholds fitted with the model (None: none fitted).
    conformal: ConformalAnswers | None

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Leaf probabilities ``(N, n_leaves)`` of uint8 pixels ``(N, S, S, 3)``."""
        ...

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """``leaf_probs``, ``features`` and (with a cell-type head) ``cell_probs``."""
        ...


def _patient_model(doc: dict[str, Any] | None, taxonomy: Taxonomy,
                   cell_taxonomy: Taxonomy | None) -> FittedPatientModel | None:
    return None if doc is None else FittedPatientModel.from_dict(doc, taxonomy, cell_taxonomy)


class TorchPredictor:
    """A :class:`~leukotree.models.TreeClassifier` (or a compiled one) in eval mode on
    ``device``, optionally in channels_last memory format. A calibrated model's outputs
    also hold ``leaf_probs_raw`` (the leaf probabilities before its temperatures); with
    ``stage_features``, also the features of its out-of-distribution score's backbone
    stages, when it reads several (what calibration is fitted on)."""

    engine = "torch"

    def __init__(self, model: TreeClassifier, device: torch.device | str = "cpu", *,
                 channels_last: bool = False, patient_model: dict[str, Any] | None = None,
                 expected_ood: float = 0.05, stage_features: bool = False,
                 conformal: dict[str, Any] | None = None) -> None:
        self.device = torch.device(device)
        self.stage_features = stage_features
        self.channels_last = channels_last
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.taxonomy = model.taxonomy
        self.model_config = model.config
        self.cell_taxonomy = model.cell_taxonomy
        self.patient_model = _patient_model(patient_model, self.taxonomy, self.cell_taxonomy)
        self.expected_ood = expected_ood
        self.conformal = None if conformal is None else ConformalAnswers.from_dict(conformal)

    @torch.no_grad()
    def predict(self, pixels: np.ndarray) -> np.ndarray:
        x = to_tensor(pixels, self.device, channels_last=self.channels_last)
        return self.model(x)["leaf_logp"].float().exp().cpu().numpy()

    @torch.no_grad()
    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        out = self.model(to_tensor(pixels, self.device, channels_last=self.channels_last))
        result = {"leaf_probs": out["leaf_logp"].float().exp().cpu().numpy()}
        if "features" in out:  # every built-in head gives them; a head of one's own may not
            result["features"] = out["features"].float().cpu().numpy()
        if "cell_logp" in out:
            result["cell_probs"] = out["cell_logp"].float().exp().cpu().numpy()
        if "ood_score" in out:
            result["ood_score"] = out["ood_score"].float().cpu().numpy()[:, None]
        if "leaf_logp_raw" in out:
            result["leaf_probs_raw"] = out["leaf_logp_raw"].float().exp().cpu().numpy()
        if self.stage_features and "stage_features" in out:
            result["stage_features"] = out["stage_features"].float().cpu().numpy()
        return result


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
        cells = self.model_config.cell_taxonomy
        self.cell_taxonomy = Taxonomy.from_dict(cells, source=str(path)) if cells else None
        self.patient_model = _patient_model(
            json.loads(meta["patient_model"]) if meta.get("patient_model") else None,
            self.taxonomy, self.cell_taxonomy)
        self._names = [o.name for o in self.session.get_outputs()]
        ood = json.loads(meta["ood"]) if meta.get("ood") else {}
        self.expected_ood = float(ood.get("val_flagged", 0.05))
        self.conformal = (ConformalAnswers.from_dict(json.loads(meta["conformal"]))
                          if meta.get("conformal") else None)

    def outputs(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
        values = dict(zip(self._names, self.session.run(None, {"images": x}), strict=True))
        return {k: values[k] for k in OUTPUTS if k in values}

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.outputs(pixels)["leaf_probs"]


def dihedral_outputs(predictor: Predictor, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Every output averaged over the 8 symmetries of the square (flips, rotations)."""
    total: dict[str, np.ndarray] = {}
    for flip in (False, True):
        base = pixels[:, :, ::-1] if flip else pixels
        for k in range(4):
            view = predictor.outputs(np.ascontiguousarray(np.rot90(base, k, axes=(1, 2))))
            for key, value in view.items():
                total[key] = total.get(key, 0) + value.astype(np.float64)
    return {k: (v / 8).astype(np.float32) for k, v in total.items()}


def dihedral_mean(predictor: Predictor, pixels: np.ndarray) -> np.ndarray:
    """Leaf probabilities averaged over the 8 symmetries of the square (flips, rotations)."""
    return dihedral_outputs(predictor, pixels)["leaf_probs"]


@dataclass
class Predictions:
    """Per-image outputs; rows of unreadable images are NaN and carry their error."""

    paths: list[Path]
    leaf_probs: np.ndarray
    errors: list[str | None]
    features: np.ndarray | None = None
    cell_probs: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. an ensemble's members
    #: Distance to the training cells over the model's threshold (> 1: unclassifiable);
    #: None when the model has no out-of-distribution score.
    ood_score: np.ndarray | None = None

    @property
    def unclassifiable(self) -> np.ndarray:
        """Readable cells unlike the training cells (``ood_score > 1``; an unreadable
        row, NaN, is not one)."""
        if self.ood_score is None:
            return np.zeros(len(self.paths), dtype=bool)
        return np.nan_to_num(self.ood_score, nan=0.0) > 1.0

    @property
    def classified(self) -> np.ndarray:
        """Readable and classifiable cells: those a patient's diagnosis is made from."""
        return self.ok & ~self.unclassifiable

    def member_arrays(self) -> dict[str, np.ndarray]:
        """An ensemble's per-member outputs, keyed as a bag's ``extras`` expect."""
        return {k.removeprefix("member_"): np.nan_to_num(v) for k, v in self.extras.items()
                if k.startswith("member_")}

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
    on_chunk: Callable[[int], None] | None = None,
    pixel_sizes: Sequence[float | None] | None = None,
    config: ModelConfig | None = None,
) -> Predictions:
    """Leaf probabilities of every image; decoding overlaps with the model's work.

    ``config``: how to decode the images (default: the predictor's ``model_config``), e.g.
    a view resolved by :meth:`~leukotree.inference.options.InferenceOptions.input_config`.

    ``on_chunk(n)`` is called after each chunk with the number of images done so far.
    ``pixel_sizes`` (one per path, e.g. a manifest's ``pixel_size`` column): each image
    with one is decoded at it (:func:`input_config`), the others as the predictor's own.

    ``on_error="raise"`` raises one :class:`~leukotree.errors.DataError` listing every
    unreadable image; ``"report"`` keeps going and records the error in its row.
    ``tta`` averages over the 8 flips and 90-degree rotations (smears have no
    orientation), at 8 times the cost.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}; got {on_error!r}")
    batch_size = check_option("batch_size", batch_size)
    paths = [Path(p) for p in paths]
    cfg = predictor.model_config if config is None else config
    groups = decode_groups(cfg, len(paths), pixel_sizes)
    arrays: dict[str, np.ndarray] = {}
    errors: list[str | None] = [None] * len(paths)
    done = 0
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("Predicting", total=len(paths), rate="")
        for rows, options in groups:
            for chunk, decoded in iter_decoded([paths[i] for i in rows], cfg.img_size,
                                               chunk=batch_size, **options, workers=workers,
                                               max_pixels=max_pixels):
                idx = rows[chunk]
                good = np.flatnonzero(decoded.ok)
                for j, err in enumerate(decoded.errors):
                    errors[idx[j]] = err
                if len(good):
                    pixels = decoded.pixels[good]
                    out = (dihedral_outputs(predictor, pixels) if tta
                           else predictor.outputs(pixels))
                    for key, value in out.items():
                        if key not in arrays:
                            arrays[key] = np.full((len(paths), value.shape[1]), np.nan,
                                                  np.float32)
                        arrays[key][idx[good]] = value
                bar.update(task, advance=len(idx))
                done += len(idx)
                if on_chunk is not None:
                    on_chunk(done)
    if on_error == "raise":
        raise_for_errors(errors)
    leaf = arrays.pop("leaf_probs",
                      np.full((len(paths), len(predictor.taxonomy.leaves)), np.nan, np.float32))
    ood = arrays.pop("ood_score", None)
    return Predictions(paths, leaf, errors, arrays.pop("features", None),
                       arrays.pop("cell_probs", None), arrays,
                       None if ood is None else ood[:, 0])


def decode_groups(cfg: ModelConfig, n: int, pixel_sizes: Sequence[float | None] | None,
                   ) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """The images' row indices grouped by how they decode, with the decode options of each
    group (one group of all rows without ``pixel_sizes``)."""
    if pixel_sizes is None or all(v is None for v in pixel_sizes):
        return [(np.arange(n), cfg.decode_options())]
    if len(pixel_sizes) != n:
        raise ValueError(f"{len(pixel_sizes)} pixel sizes for {n} images")
    groups = []
    for value in dict.fromkeys(pixel_sizes):  # first-seen order
        rows = np.array([i for i, v in enumerate(pixel_sizes) if v == value])
        try:
            view = cfg if value is None else input_config(cfg, pixel_size=value)
        except LeukotreeError as err:
            raise LeukotreeError(f"The images' pixel size {value} (a manifest's pixel_size "
                                 f"column): {err}") from None
        groups.append((rows, view.decode_options()))
    return groups

