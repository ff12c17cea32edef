"""``leukotree adapt``: fit a trained model to another lab's cells without their labels.

Two methods: self-training (:func:`self_train`, the default of ``leukotree adapt``; the
last paragraph) and batch-norm statistics (:func:`adapt`, ``--method batch-norm``).

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
``benchmarks/bench_cross_lab.py``). Fitting the temperatures again needs labelled cells
of the new lab: ``leukotree calibrate ADAPTED DATA --out RUN2``
(:mod:`leukotree.calibrate.run`); without an out-of-distribution reference, it flags no
cell.

AdaBN also moves the statistics with the new lab's mix of cell types, not only with its
stain and camera: on the Johns Hopkins cells (many blasts and lymphocytes) it raised a
model that sees the whole smear from 45.6% to 62.5%, but lowered the ``cpu-fast`` model
(``context_radius``: the smear around the cell flattened) from 63.9% to 54.8%. Check an
adapted model on a few labelled cells before using it.

A model trained with ``--stain-norm white`` or ``reinhard`` normalises each image's
colours on its own (:mod:`leukotree.models.stain`), so there is no stain reference of the new lab to
re-estimate: it keeps the training images' target.

Self-training (``--method self-train``, :func:`self_train`) instead lets the model label
the new lab's cells itself and fine-tunes it on the labels it is surest of: per predicted
class, the most probable ``keep`` share of the cells not flagged unclassifiable (so
each class keeps a share of its own cells, not only the easiest class; and the cells
flagged as unlike the training ones, most blasts and smudges among them, are not
labelled), while replaying the source run's training images (``train --init RUN --replay
RUN``) and validating on its validation images; its out-of-distribution score keeps
measuring the distance to the source run's cells (``ood_reference: replayed``: counted as
known, the cells it merely labelled let it flag far fewer blasts and smudges). Its own
errors are learnt too: only a class the model already reads mostly right gains. On the
cross-lab benchmark it raised the ``cpu-fast`` model on unseen Johns Hopkins patients
from 67.2% to 71.3% (two other training seeds: 65.0% to 66.3%, 60.9% to 64.5%), where
batch-norm adaptation lowered it.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from leukotree.data.discover import collect_inputs, utf8_problem
from leukotree.data.images import DEFAULT_MAX_PIXELS
from leukotree.errors import LeukotreeError, display_path
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predictor import Predictions, TorchPredictor, predict_paths
from leukotree.models.checkpoint import read_checkpoint, save_model, update_checkpoint
from leukotree.patients.fit import without_promise
from leukotree.report.model_card import write_model_card
from leukotree.rundir import RunDir, read_yaml, require_new_folder, write_json, write_text

if TYPE_CHECKING:
    from leukotree.engine.config import TrainConfig
    from leukotree.taxonomy import Taxonomy

#: Fewest pseudo-labelled cells a self-training ``adapt`` trains on.
MIN_PSEUDO_LABELS = 10

#: Self-training's default learning rate, as a share of the source run's (``cpu-fast``:
#: 2e-3 -> 5e-4; the ViT paper preset: 5e-5 -> 1.25e-5).
SELF_TRAIN_LR_SHARE = 0.25

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
    :meth:`~leukotree.inference.options.InferenceOptions.input_config`) and write the adapted run to
    ``out``. With ``pixel_size``, the adapted model keeps it as its input pixel size:
    ``predict``, ``evaluate`` and ``serve`` of the adapted run decode at that size unless
    given another."""
    target = _new_folder(out, inputs)
    if batch_size < 2:
        raise LeukotreeError(f"The 'batch_size' parameter must be >= 2 for batch statistics; "
                             f"got {batch_size}.")
    loaded = load(run)
    model, payload = loaded.torch_model(), loaded.payload
    source = loaded.run_dir("")  # one run (torch_model refused the rest)
    found = collect_inputs(inputs, "none")
    paths = [i.path for i in found.images]
    if len(paths) < 2:
        raise LeukotreeError(f"adapt needs the new lab's cells: found {len(paths)} image(s) in "
                             f"{', '.join(map(str, inputs))}.")
    # An adapted run being adapted again: its last lab's pixel size is not this lab's.
    model.config = replace(model.config, input_pixel_size=None)
    view = InferenceOptions(pixel_size=pixel_size).input_config(model.config, source=run)
    predictor = TorchPredictor(model)
    with estimating_batch_norm(model) as layers:
        preds = predict_paths(predictor, paths, batch_size=batch_size, workers=workers,
                              progress=progress, on_error="report", max_pixels=max_pixels,
                              config=view)
    unreadable = [e for e in preds.errors if e is not None]
    seen = int(preds.ok.sum())
    if seen < 2:
        raise LeukotreeError(f"Only {seen} of the given images could be read (batch "
                             "statistics need at least 2); nothing was adapted."
                             + "".join(f"\n  {e}" for e in unreadable[:10]))
    target.mark()
    for name in _COPIED:
        if (source.path / name).exists():
            shutil.copy2(source.path / name, target.path / name)
    dropped = [k for k in ("calibration", "ood", "conformal") if k in payload]
    report = {"source": str(display_path(loaded.checkpoint)),
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
        update_checkpoint(target.best, patient_model=without_promise(payload["patient_model"],
                                                                     report))
    write_json(target.path / RunDir.ADAPT, report)
    write_model_card(target.path)
    return report


def _new_folder(out: str | Path, inputs: Sequence[str | Path] = ()) -> RunDir:
    target = RunDir(out)
    require_new_folder(target.path, "adapted run")
    for item in map(Path, inputs):
        if item.is_dir() and target.path.resolve().is_relative_to(item.resolve()):
            raise LeukotreeError(f"--out '{target.path}' lies inside the input folder "
                                 f"'{item}': its files would be read as cells next time. "
                                 "Choose a folder outside the new lab's images.")
    return target


def pseudo_labels(probs: np.ndarray, flagged: np.ndarray, keep: float) -> np.ndarray:
    """Rows given a pseudo-label, in row order: of the rows whose most probable leaf is
    ``c`` (``argmax`` of a row of ``probs``, ``(n, leaves)``; rows with a NaN, unreadable
    images, and ``flagged`` rows left out), the ``ceil(keep * n_c)`` most probable, for
    every leaf ``c``."""
    if not 0 < keep <= 1:
        raise LeukotreeError(f"The 'keep' parameter must be in (0, 1]; got {keep}.")
    usable = ~np.isnan(probs).any(axis=1) & ~np.asarray(flagged, bool)
    filled = np.nan_to_num(probs)
    leaf = np.where(usable, filled.argmax(axis=1), -1)
    top = filled.max(axis=1)
    chosen = []
    for c in np.unique(leaf[leaf >= 0]):
        rows = np.flatnonzero(leaf == c)
        order = rows[np.argsort(-top[rows], kind="stable")]
        # rounded first: 0.07 * 100 is 7.000000000000001, whose ceiling is 8
        chosen.append(order[:math.ceil(round(keep * len(rows), 9))])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def _self_train_config(source: RunDir, checkpoint: Path, out: Path, epochs: int,
                       lr: float | None, workers: int, max_pixels: int | None,
                       cell_taxonomy: Taxonomy | None = None) -> TrainConfig:
    """The source run's configuration, made a fine-tune on the pseudo-labelled cells that
    replays its training images and validates on its validation images (real labels:
    the temperatures and the out-of-distribution threshold are fitted on them, as in the
    source run; the distance score's class means, and its patient model, on the replayed
    images only: ``ood_reference: replayed``). ``lr`` None:
    :data:`SELF_TRAIN_LR_SHARE` of the source run's. Device and precision are this
    machine's (auto)."""
    from leukotree.engine.config import check_keys, resolve_config

    if not source.split.exists() or not source.read_split("val"):
        raise LeukotreeError(f"Self-training replays the training images of the run it "
                             f"adapts and validates on its validation images, both listed "
                             f"in its {RunDir.SPLIT}; '{source.path}' has none. Give a run "
                             "folder written by 'leukotree train'.")
    values = read_yaml(source.config, "Config file") or {}
    check_keys(values, f"the config file '{source.config}' of the run to adapt")
    if values.get("pixel_size"):
        raise LeukotreeError(f"--method self-train cannot adapt '{source.path}' yet: it was "
                             "trained with --pixel-size (its field of view is in "
                             "micrometres, and the new lab's pixel size is unknown here). Use "
                             "--method batch-norm, or fine-tune on labelled cells (train "
                             "--init --replay).")
    out.mkdir(parents=True, exist_ok=True)  # the source folder may be read-only
    cells = {}
    if cell_taxonomy is not None:
        # the cell-type head keeps learning from the replayed images' cell types (the new
        # cells get none: their column is left empty)
        if "cell_type" not in source.read_split()[0]:
            raise LeukotreeError(f"--method self-train cannot adapt '{source.path}': its "
                                 f"{RunDir.SPLIT} lists no cell types (it was trained before "
                                 "runs kept them), so its cell-type head would train on "
                                 "none. Train it again, or use --method batch-norm.")
        # the model's own cell taxonomy, kept beside the run (the source config may name
        # a file relative to where it was trained)
        kept = write_text(out / RunDir.CELL_TAXONOMY, cell_taxonomy.to_yaml())
        cells = {"cell_labels": "column:cell_type", "cell_taxonomy": str(kept.resolve())}
    val = out.resolve() / RunDir.VAL_MANIFEST
    config = resolve_config(overrides={
        **values, "fold": None,  # dropped: the source's fold, if any, is not this split
        "taxonomy": str(source.path.resolve() / RunDir.TAXONOMY),
        "init": str(checkpoint.resolve()), "replay": str(source.path.resolve()),
        "val_data": str(source.write_val_manifest(val)), "epochs": epochs,
        "lr": values.get("lr") if lr is None else lr, "warmup_epochs": 0.5,
        "monitor": "last", "balance": "none", "labels": "folder",
        # auto: the validation manifest's patient column (pseudo_labels.csv has none)
        "patients": "auto", "device": "auto", "amp": "auto",
        # cells the model only labelled are not known cells: blasts stay far
        "ood_reference": "replayed",
        "workers": workers, "max_pixels": max_pixels, **cells})
    return config if lr is not None else replace(config, lr=config.lr * SELF_TRAIN_LR_SHARE)


def _write_pseudo_labels(path: Path, cells: Sequence[Path], labels: Sequence[str],
                         probs: np.ndarray, cell_types: bool = False) -> None:
    """``path,label,probability`` per labelled cell (and an empty ``cell_type`` column
    for a model with a cell-type head: the new cells get no cell type)."""
    bad = [p for p in map(utf8_problem, cells) if p is not None]
    if bad:
        raise LeukotreeError(f"{len(bad)} of the new lab's file names are not valid UTF-8 "
                             f"(e.g. {bad[0].where}); rename them and run adapt again.")
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "probability"] + ["cell_type"] * cell_types)
        for cell, label, p in zip(cells, labels, probs, strict=True):
            writer.writerow([os.path.abspath(cell), label, f"{p:.6f}"] + [""] * cell_types)


def _new_cells(inputs: Sequence[str | Path], source: RunDir) -> tuple[list[Path], int]:
    """The images of ``inputs``, each once (by real path), without the source run's own
    training and validation images (their real labels are already used); and how many of
    those were left out."""
    known = {os.path.realpath(r["path"]) for r in source.read_split()}
    seen: set[str] = set()
    paths, in_source = [], 0
    for image in collect_inputs(inputs, "none").images:
        real = os.path.realpath(image.path)
        if real in seen:
            continue
        seen.add(real)
        if real in known:
            in_source += 1
        else:
            paths.append(image.path)
    return paths, in_source


def _label_new_cells(model: nn.Module, paths: Sequence[Path], keep: float, device: Any,
                     **predict: Any,
                     ) -> tuple[Predictions, np.ndarray, list[str], np.ndarray | None]:
    """The model's predictions of the new cells, the rows it labels
    (:func:`pseudo_labels`), their labels and the flags (None: the model has no
    out-of-distribution score)."""
    preds = predict_paths(TorchPredictor(model, device), paths, on_error="report",
                          **predict)
    rows = pseudo_labels(preds.leaf_probs, preds.unclassifiable, keep)  # none without OOD
    flagged = None if preds.ood_score is None else preds.unclassifiable
    leaves = list(model.taxonomy.leaves)
    labels = [leaves[k] for k in preds.leaf_probs[rows].argmax(axis=1)]
    if len(rows) < MIN_PSEUDO_LABELS:
        raise LeukotreeError(
            f"Self-training needs at least {MIN_PSEUDO_LABELS} cells the model can label; of "
            f"{len(preds.paths)} image(s) it labelled {len(rows)} "
            f"({0 if flagged is None else int(flagged.sum())} flagged unclassifiable, the "
            "rest unreadable or left out by --keep). Give more of the new lab's cells, or "
            "adapt with --method batch-norm.")
    return preds, rows, labels, flagged


def self_train(run: str | Path, inputs: Sequence[str | Path], out: str | Path, *,
               keep: float = 0.5, epochs: int = 5, lr: float | None = None,
               batch_size: int = 64, workers: int = 2, progress: bool = True,
               max_pixels: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Adapt the model of ``run`` to the cells of ``inputs`` by self-training (module
    docstring): label them with the model (:func:`pseudo_labels`), write them to
    ``out/pseudo_labels.csv`` and fine-tune on them into the run folder ``out`` (``epochs``
    at learning rate ``lr``, by default :data:`SELF_TRAIN_LR_SHARE` of the source run's;
    the last epoch kept), replaying the source run's training images and validated,
    calibrated and given its out-of-distribution threshold on its validation images; a
    patient model of the source run is fitted again, on its training patients, from the
    fine-tuned cell model. Images given twice are used once; the source run's own images
    are left out. ``max_pixels`` None: the source run's. A refusal before the fine-tune
    leaves ``out`` as it was. A stopped fine-tune continues with ``resume`` (the labels,
    ``out/self_training.json`` and the options in ``out/config.yaml`` kept; ``inputs``
    and the tuning options are not read again)."""
    from leukotree.engine.config import load_config
    from leukotree.engine.distributed import running_under_torchrun
    from leukotree.engine.trainer import train

    if running_under_torchrun():
        raise LeukotreeError("leukotree adapt runs in one process (every process would label "
                             "and write the same folder); run it without torchrun.")
    target = RunDir(out)
    if resume:
        labelling = _stopped_self_training(target)
        started = labelling.get("source_model")
        if started and started != os.path.realpath(load(run).checkpoint):
            raise LeukotreeError(f"The self-training in '{target.path}' adapts '{started}', "
                                 f"not '{run}'; resume it with that run.")
        config = load_config(target.config, check_device=False)
    else:
        labelling, config = _label_for_self_training(run, inputs, target, keep, epochs, lr,
                                                     batch_size, workers, progress,
                                                     max_pixels)
    summary = train(target.path / RunDir.PSEUDO_LABELS, target.path, config,
                    resume=target.last.exists(), progress=progress)
    report = labelling | {
        "patient_model": (f"'{config.patient_model}', fitted again on the source run's "
                          "training patients" if config.patient_model != "none" else None)}
    extra = read_checkpoint(target.best).get("extra", {})
    update_checkpoint(target.best, extra={**extra, "adapted": report})
    write_json(target.path / RunDir.ADAPT, {**report, "training": summary})
    write_model_card(target.path)  # again: the checkpoint now says it was adapted
    return report


def _stopped_self_training(target: RunDir) -> dict[str, Any]:
    """The labelling report of the self-training stopped in ``target``, which resumes."""
    from leukotree.rundir import read_json

    if (target.path / RunDir.ADAPT).exists():
        raise LeukotreeError(f"The self-training in '{target.path}' has finished (it has "
                             f"{RunDir.ADAPT}); nothing to resume.")
    needed = (RunDir.SELF_TRAINING, RunDir.PSEUDO_LABELS, RunDir.CONFIG)
    missing = [name for name in needed if not (target.path / name).exists()]
    if missing:
        raise LeukotreeError(f"No stopped self-training to resume in '{target.path}' (no "
                             f"{', '.join(missing)}); run adapt without --resume into a new "
                             "folder.")
    return read_json(target.path / RunDir.SELF_TRAINING, "Self-training report")


def _label_for_self_training(run: str | Path, inputs: Sequence[str | Path], target: RunDir,
                             keep: float, epochs: int, lr: float | None, batch_size: int,
                             workers: int, progress: bool, max_pixels: int | None,
                             ) -> tuple[dict[str, Any], TrainConfig]:
    """Label the new cells into ``target`` (``pseudo_labels.csv``, ``val.csv``, the
    fine-tune's ``config.yaml`` and the labelling report ``self_training.json``); on a
    refusal or an interruption ``target`` is left as it was."""
    from leukotree.engine.config import save_config
    from leukotree.engine.distributed import resolve_device

    if target.path.is_dir() and (target.path / RunDir.SELF_TRAINING).exists() and not (
            target.path / RunDir.ADAPT).exists():
        raise LeukotreeError(f"'{target.path}' holds a stopped self-training; add --resume to "
                             "finish it, or choose a new folder.")
    _new_folder(target.path, inputs)
    loaded = load(run)
    checkpoint = loaded.checkpoint
    model = loaded.torch_model()
    source = loaded.run_dir("")  # one run (its checkpoint refused the rest)
    if model.config.input_pixel_size is not None:
        raise LeukotreeError(f"'{source.path}' decodes its images at a pixel size "
                             f"({model.config.input_pixel_size:g} um; adapted with "
                             "--pixel-size): self-training cannot adapt it yet. Self-train the "
                             "run it was adapted from.")
    created = not target.path.exists()
    try:
        config = _self_train_config(source, checkpoint, target.path, epochs, lr, workers,
                                    max_pixels, model.cell_taxonomy)
        paths, in_source = _new_cells(inputs, source)
        preds, rows, labels, flagged = _label_new_cells(
            model, paths, keep, resolve_device(config.device), batch_size=batch_size,
            workers=workers, progress=progress, max_pixels=config.max_pixels)
        _write_pseudo_labels(target.path / RunDir.PSEUDO_LABELS,
                             [preds.paths[r] for r in rows], labels,
                             preds.leaf_probs[rows].max(axis=1),
                             cell_types=config.cell_taxonomy is not None)
        labelling = {
            "source": str(display_path(checkpoint)),
            "source_model": os.path.realpath(checkpoint),
            "method": "self-training: fine-tuned on its own surest labels of the new cells, "
                      "replaying the source run's training images",
            "inputs": [str(i) for i in inputs], "n_cells": int(preds.ok.sum()),
            "flagged_unclassifiable": None if flagged is None else int(flagged.sum()),
            "keep": keep, "pseudo_labelled": {leaf: labels.count(leaf)
                                              for leaf in model.taxonomy.leaves
                                              if leaf in labels},
            "in_source_run": in_source, "unreadable": [e for e in preds.errors if e is not None],
            "epochs": epochs, "lr": config.lr}
        target.mark()  # a run from the start (train's folder check accepts it)
        save_config(config, target.config)  # what --resume trains with
        write_json(target.path / RunDir.SELF_TRAINING, labelling)
    except BaseException:
        if created:
            shutil.rmtree(target.path, ignore_errors=True)
        else:  # an empty folder given (_new_folder): emptied again
            for child in target.path.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise
    return labelling, config
