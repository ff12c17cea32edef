"""``leukotree adapt``: fit a trained model to another lab's cells without their labels.

Batch normalisation layers keep the mean and variance of their inputs over the training
cells; another lab's stain, scanner and magnification shift those statistics, and the
layers then normalise wrongly. Adaptive batch normalisation (AdaBN, Li et al. 2016)
re-estimates them on the new lab's cells: every batch-norm layer's running mean and
variance become the plain averages over all of the new cells (``momentum=None``), with
every weight unchanged. The adapted model is written as a new run folder (the source
run's configuration, taxonomy and split, and ``adapt.json`` saying what was done). Its
patient model is kept; its temperatures and out-of-distribution statistics are not: they
were fitted on the source lab's cells, and on the adapted features they are wrong (on
the Johns Hopkins cells they flagged every cell and doubled the calibration error;
``benchmarks/bench_cross_lab.py``). Fitting them again needs labelled cells of the new
lab.

AdaBN also moves the statistics with the new lab's mix of cell types, not only with its
stain and camera: on the Johns Hopkins cells (many blasts and lymphocytes) it raised a
model that sees the whole smear from 45.6% to 62.5%, but lowered the ``cpu-fast`` model
(``context_radius``: the smear around the cell flattened) from 63.9% to 54.8%. Check an
adapted model on a few labelled cells before using it.

A model trained with ``--stain-norm white`` or ``reinhard`` normalises each image's
colours on its own (:mod:`leukotree.models.stain`), so there is no stain reference of the new lab to
re-estimate: it keeps the training images' target.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from leukotree.data.discover import collect_inputs
from leukotree.data.images import DEFAULT_MAX_PIXELS
from leukotree.errors import LeukotreeError, display_path
from leukotree.inference.predictor import TorchPredictor, predict_paths, set_input
from leukotree.models.checkpoint import load_model, save_model, update_checkpoint
from leukotree.rundir import RunDir, write_json

#: Files of the source run that describe the adapted one as well.
_COPIED = (RunDir.CONFIG, RunDir.TAXONOMY, RunDir.ENVIRONMENT, RunDir.SPLIT)


def batch_norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def estimating_batch_norm(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside, every forward pass of ``model`` (otherwise in eval mode) adds to fresh
    running statistics of its batch-norm layers: their plain average over all batches
    (``momentum=None``). Afterwards the model is in eval mode again."""
    layers = batch_norm_layers(model)
    if not layers:
        raise LeukotreeError("This model has no batch-normalisation layer to adapt (a ViT "
                             "or ConvNeXt uses layer norm, a model trained with --norm group "
                             "GroupNorm: both are per image already); fine-tune it instead.")
    model.eval()
    saved = [(m, m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch
        m.train()
    try:
        yield layers
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()


def adapt(run: str | Path, inputs: Sequence[str | Path], out: str | Path, *,
          batch_size: int = 64, workers: int = 2, progress: bool = True,
          max_pixels: int = DEFAULT_MAX_PIXELS, pixel_size: float | None = None,
          ) -> dict[str, Any]:
    """Adapt the model of ``run`` to the cells of ``inputs`` (folders, files, manifests;
    labels are not read; decoded at ``pixel_size`` micrometres per pixel when given, see
    :func:`~leukotree.inference.predictor.set_input`) and write the adapted run to
    ``out``. With ``pixel_size``, the adapted model keeps it as its input pixel size:
    ``predict``, ``evaluate`` and ``serve`` of the adapted run decode at that size unless
    given another."""
    source = RunDir.of(run)
    target = RunDir(out)
    if target.path.exists() and (not target.path.is_dir() or any(target.path.iterdir())):
        raise LeukotreeError(f"--out '{target.path}' exists and is not an empty folder; "
                             "choose a new folder for the adapted run.")
    if batch_size < 2:
        raise LeukotreeError(f"The 'batch_size' parameter must be >= 2 for batch statistics; "
                             f"got {batch_size}.")
    model, payload = load_model(RunDir.checkpoint_of(run))
    found = collect_inputs(inputs, "none")
    paths = [i.path for i in found.images]
    if len(paths) < 2:
        raise LeukotreeError(f"adapt needs the new lab's cells: found {len(paths)} image(s) in "
                             f"{', '.join(map(str, inputs))}.")
    # An adapted run being adapted again: its last lab's pixel size is not this lab's.
    model.config = replace(model.config, input_pixel_size=None)
    predictor = set_input(TorchPredictor(model), pixel_size=pixel_size, source=run)
    with estimating_batch_norm(model) as layers:
        preds = predict_paths(predictor, paths, batch_size=batch_size, workers=workers,
                              progress=progress, on_error="report", max_pixels=max_pixels)
    unreadable = [e for e in preds.errors if e is not None]
    seen = int(preds.ok.sum())
    if seen < 2:
        raise LeukotreeError(f"Only {seen} of the given images could be read (batch "
                             "statistics need at least 2); nothing was adapted."
                             + "".join(f"\n  {e}" for e in unreadable[:10]))
    target.path.mkdir(parents=True, exist_ok=True)
    for name in _COPIED:
        if (source.path / name).exists():
            shutil.copy2(source.path / name, target.path / name)
    dropped = [k for k in ("calibration", "ood") if k in payload]
    report = {"source": str(display_path(RunDir.checkpoint_of(run))),
              "method": "batch-norm statistics re-estimated on the new cells (AdaBN)",
              "not_carried_over": dropped,
              "inputs": [str(i) for i in inputs], "n_cells": seen,
              "pixel_size": pixel_size,
              "batch_norm_layers": len(layers),
              "unreadable": unreadable}
    if pixel_size is not None:  # the adapted model decodes its lab's images by default
        model.config = replace(model.config, input_pixel_size=float(pixel_size))
    save_model(target.best, model, extra={**payload.get("extra", {}), "adapted": report})
    if "patient_model" in payload:
        update_checkpoint(target.best, patient_model=payload["patient_model"])
    write_json(target.path / RunDir.ADAPT, report)
    return report
