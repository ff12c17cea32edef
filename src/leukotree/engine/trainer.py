"""The trainer: one model into one run folder, resumable, on one or several processes.

:class:`Trainer` orchestrates; the work is done by :mod:`leukotree.engine.loop`
(:func:`~leukotree.engine.loop.train_one_epoch`, :func:`~leukotree.engine.loop.validate`),
the data package (discovery, grouped split, pixel cache) and the models package. The
run folder's files are those of :class:`~leukotree.rundir.RunDir`.

Resuming restarts the epoch that was interrupted; every epoch's shuffling and
augmentation are seeded by ``(seed, epoch)``, so a resumed run gives the same
result as an uninterrupted one. The global random state, the thread count and
matplotlib are left as they were found.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from leukotree.calibrate import (
    LabelledCells,
    OodReference,
    PatientStage,
    fit_calibration,
    fit_ood_reference,
    fit_patient_stage,
)
from leukotree.data.cache import cached_pixels
from leukotree.data.discover import Sample, SampleSet, discover
from leukotree.data.images import decode_many, median_side, raise_for_errors
from leukotree.data.splits import (
    assign_folds,
    read_fold_groups,
    train_val_test_split,
    write_split_csv,
)
from leukotree.engine.augment import channel_stats, rotation_balance, with_replay
from leukotree.engine.config import TrainConfig, save_config
from leukotree.engine.distributed import (
    DistInfo,
    barrier,
    broadcast_flag,
    init_distributed,
    resolve_device,
    shutdown,
)
from leukotree.engine.loop import (
    BatchRecipe,
    EpochPlan,
    Precision,
    Split,
    TrainState,
    make_optimizer,
    make_scheduler,
    make_split,
    predict_outputs,
    resolve_precision,
    torch_threads,
    train_one_epoch,
    validate,
    weight_average,
)
from leukotree.errors import LeukotreeError, UnreadableImagesError, display_path
from leukotree.inference.conformal import check_cells
from leukotree.inference.loader import load, trained_run
from leukotree.models import TreeClassifier, build_model
from leukotree.models.checkpoint import (
    environment,
    load_model,
    read_training_state,
    save_model,
    save_training_state,
    update_checkpoint,
)
from leukotree.models.losses import TreeLoss, balanced_leaf_weights
from leukotree.models.stain import fit_stain_target
from leukotree.patients.guarantee import check_miss_rate_support
from leukotree.patients.models import focus_types, patient_params
from leukotree.report import plots
from leukotree.report.console import say, stderr_console
from leukotree.report.model_card import write_model_card
from leukotree.rundir import RunDir, write_csv, write_json, write_text
from leukotree.taxonomy import Taxonomy, load_taxonomy

_VAL_KEYS = ("val_loss", "val_accuracy", "val_macro_f1")
#: Fewer validation images than this make ``--monitor`` other than ``last`` a lottery.
MIN_SELECTION_IMAGES = 100


def choose_split(sample_set: SampleSet, config: TrainConfig) -> np.ndarray:
    """``'train'``/``'val'``/``'test'`` per image: a grouped validation fraction; or a CV
    fold held out as ``'test'`` with ``fold_val_fraction`` of the other patients as
    ``'val'`` (grouped, like the folds), or, that fraction 0, the fold as ``'val'``."""
    labels, groups = sample_set.labels, sample_set.groups.tolist()
    if config.fold is not None:
        folds = (read_fold_groups(config.fold_groups, groups, config.folds)
                 if config.fold_groups else assign_folds(labels, groups, config.folds,
                                                         config.seed)[0])
        held = folds == config.fold
        if not config.fold_val_fraction:
            return np.where(held, "val", "train")
        parts = np.full(len(labels), "test", dtype=object)
        rest = np.flatnonzero(~held)
        try:
            parts[rest] = train_val_test_split([labels[i] for i in rest],
                                               [groups[i] for i in rest],
                                               config.fold_val_fraction, 0.0, config.seed)
        except LeukotreeError:
            k = max(2, round(1 / config.fold_val_fraction))
            n_groups = len({groups[i] for i in rest})
            why = (f"it has {n_groups} patient groups, fewer than the {k} that one group in "
                   f"{k} needs" if k > n_groups else
                   f"every class has fewer than {k} images (one group in {k}, stratified)")
            raise LeukotreeError(
                f"Fold {config.fold}'s training images cannot spare a validation part of "
                f"--fold-val-fraction {config.fold_val_fraction} for its temperatures and "
                f"out-of-distribution threshold: {why}. Give a larger --fold-val-fraction "
                "(below 0.5), --fold-val-fraction 0 to validate each fold on its test fold "
                "instead (uncalibrated, no unclassifiable flag), or more patients.") from None
        return parts
    if config.val_fraction <= 0:
        raise LeukotreeError("Training needs validation data: give --val DATA, --fold k, or a "
                             "--val-fraction above 0.")
    return train_val_test_split(labels, groups, config.val_fraction, 0.0, config.seed)


class Trainer:
    """Trains one model into one run folder; :meth:`fit` runs or resumes it."""

    def __init__(self, data: str | Path, out: str | Path, config: TrainConfig, *,
                 resume: bool = False, progress: bool = True,
                 console: Console | None = None) -> None:
        self.data = Path(data)
        self.run = RunDir(out)
        self.config = config
        self.resume = resume
        self.progress = progress
        self.console = console or stderr_console()
        self.device = resolve_device(config.device)
        self.dist = DistInfo()
        self.cell_taxonomy = (load_taxonomy(config.cell_taxonomy) if config.cell_taxonomy
                              else None)
        self._listed: dict[Path, list[dict[str, str]]] = {}
        self._n_new = 0  # training images of the data itself; --replay images follow them
        self._test: list[Sample] = []  # a CV fold's test images, with its own validation
        self._miss_rate = config.patient_miss_rate  # None in a fold that cannot state it

    @property
    def out(self) -> Path:
        return self.run.path

    @property
    def train_size(self) -> int:
        """Side of the cached training images (``train_pad`` larger than ``img_size``)."""
        return round(self.config.img_size * (1 + self.config.train_pad))

    @property
    def eval_crop(self) -> float:
        """Central fraction of each image that validation and prediction see."""
        return self.config.crop_fraction * self.config.img_size / self.train_size

    def _log(self, text: str, style: str | None = None) -> None:
        if self.dist.is_main:
            say(self.console, text, style)

    # ----------------------------------------------------------------- run
    def fit(self) -> dict[str, Any]:
        """Train (or resume) and return the best validation metrics."""
        self.dist = init_distributed(self.device)
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with ExitStack() as stack:
                if self.dist.is_main:
                    self._check_out_folder()
                    stack.enter_context(self.run.locked())
                stack.enter_context(torch_threads(self.config.threads))
                stack.enter_context(torch.random.fork_rng(devices=cuda))
                return self._fit()
        finally:
            shutdown(self.dist)

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        self._open_run_dir()
        taxonomy, train, val = self._prepare()
        held = (f", {len(self._test)} test images of fold {cfg.fold} held out"
                if self._test else "")
        self._log(f"training on {len(train)} images, validating on {len(val)}{held} "
                  f"({cfg.head} head, {cfg.model_config().arch_name}, {cfg.img_size}px, "
                  f"device {self.device}, {torch.get_num_threads()} threads)")
        absent = sorted({s.label for s in train.samples} - {s.label for s in val.samples})
        if absent:
            self._log(f"no validation image of {', '.join(absent)}: the validation scores, "
                      "temperatures and out-of-distribution threshold leave "
                      f"{'it' if len(absent) == 1 else 'them'} out (more patients of "
                      f"{'that class' if len(absent) == 1 else 'those classes'} would help)",
                      style="yellow")
        if cfg.monitor != "last" and len(val) < MIN_SELECTION_IMAGES:
            self._log(f"only {len(val)} validation images: one image moves their accuracy by "
                      f"{100 / len(val):.1f} points, too coarse to pick the best epoch (an "
                      "early one may win by chance); --monitor last keeps the last epoch",
                      style="yellow")
        if cfg.fold is not None and not self._test and (cfg.monitor != "last"
                                                        or cfg.patience):
            self._log(f"fold {cfg.fold}: its validation images are its test images; picking "
                      f"the best '{cfg.monitor}' epoch (or stopping early) on them makes its "
                      "figures optimistic (leukotree cv uses --monitor last)", style="yellow")
        model = self._build(taxonomy, train)
        channels_last = (cfg.channels_last and self.device.type == "cpu"
                         and model.supports_channels_last)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        precision = resolve_precision(cfg.amp, self.device)
        state, plan = self._training_state(model, train, precision)
        criterion = self._criterion(model, taxonomy, train, plan.index)
        net: torch.nn.Module = model
        if self.dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=model.ddp_find_unused_parameters)
        recipe = BatchRecipe(cfg.img_size, cfg.augment, cfg.color_jitter, channels_last,
                             cfg.scale_jitter, cfg.stain_jitter)
        for _ in range(state.epoch, cfg.epochs if not state.stopped else state.epoch):
            started = time.perf_counter()
            row = train_one_epoch(net, state, criterion, train, plan, recipe, precision,
                                  seed=cfg.seed, epochs=cfg.epochs,
                                  force_rotations=cfg.balance == "rotate",
                                  progress=self.progress and self.dist.is_main)
            state.epoch += 1
            stop = False
            if self.dist.is_main:
                stop = self._end_epoch(state, row, val, precision, channels_last, len(train),
                                       started)
            if broadcast_flag(self.dist, stop):
                break
        barrier(self.dist)
        return self._finish(state, train, val)

    # ----------------------------------------------------------------- setup
    def _check_out_folder(self) -> None:
        """Refuse a run folder inside the data, or one that holds other files."""
        if self.run.path.exists() and not self.run.path.is_dir():
            raise LeukotreeError(f"--out '{self.run.path}' is a file; give a folder for the run.")
        out = self.run.path.resolve()
        cfg = self.config
        replay = cfg.replay if cfg.replay and self._replay_run() is None else None
        for data in (self.data, *(Path(d) for d in (cfg.val_data, replay) if d)):
            if data.is_dir() and out.is_relative_to(data.resolve()):
                raise LeukotreeError(
                    f"--out '{self.run.path}' lies inside the data folder '{data}': its files "
                    "would be read as images and labels next time. Choose a folder outside "
                    "the data.")
        foreign = self.run.foreign_files()
        if foreign:
            shown = ", ".join(f"'{f.name}'" for f in foreign[:5])
            raise LeukotreeError(
                f"--out '{self.run.path}' already holds {len(foreign)} file(s) that are not a "
                f"leukotree run ({shown}{', ...' if len(foreign) > 5 else ''}); nothing was "
                "written. Choose a new or empty folder.")

    def _open_run_dir(self) -> None:
        """Refuse to overwrite a run (unless resuming); write config and environment."""
        run = self.run
        if run.last.exists() and not self.resume:
            raise LeukotreeError(
                f"Run folder '{run.path}' already holds a run; pass --resume to continue it "
                "or choose another --out.")
        if self.resume and not run.last.exists():
            raise LeukotreeError(f"Nothing to resume in '{run.path}' (no {RunDir.LAST}).")
        run.path.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main and not run.marker.exists():  # (a run older than the marker)
            run.mark()
        if self.dist.is_main and not self.resume:
            save_config(self.config, run.config)
            write_json(run.environment, environment() | {
                "seed": self.config.seed, "device": str(self.device),
                "world_size": self.dist.world_size, "threads": torch.get_num_threads()})

    def _samples(self, taxonomy: Taxonomy) -> tuple[list[Sample], list[Sample]]:
        """Training and validation images: a separate validation set, or a grouped split
        (a CV fold's test images, when it has its own validation, in ``self._test``)."""
        cfg = self.config
        sample_set = self._discover(self.data, taxonomy)
        if not cfg.val_data:  # (a separate validation set splits nothing)
            note = sample_set.grouping_note()
            if note:
                self._log(note, style="bold yellow")
            parts = choose_split(sample_set, cfg)
            part = {name: [s for s, p in zip(sample_set.samples, parts, strict=True)
                           if p == name] for name in ("train", "val", "test")}
            self._test = part["test"]
            return part["train"], part["val"]
        val_set = self._discover(Path(cfg.val_data), taxonomy)
        overlap = ({s.group for s in sample_set.samples if s.patient}
                   & {s.group for s in val_set.samples if s.patient})
        if overlap:
            raise LeukotreeError(
                f"{len(overlap)} patient(s) appear in both the training and the validation "
                f"data (e.g. {sorted(overlap)[:3]}); that leaks. Separate them.")
        return sample_set.samples, val_set.samples

    def _replay_samples(self, taxonomy: Taxonomy, train: list[Sample], val: list[Sample],
                        ) -> list[Sample]:
        """The ``--replay`` images: a run's training images (or the images of data), none
        of them a validation image or of a validation patient; images already in the
        training data are not added twice. A run's images keep the cell types its
        ``split.csv`` lists (runs trained before it kept them list none: replay their data,
        a manifest with the cell-type column, to train the cell-type head on them)."""
        cfg = self.config
        if cfg.replay is None:
            return []
        source = self._replay_run()
        if source is not None:
            kept = load_taxonomy(str(source.taxonomy))
            if kept != taxonomy:
                raise LeukotreeError(
                    f"--replay '{cfg.replay}' was trained on the taxonomy '{kept.name}' "
                    f"({', '.join(kept.leaves)}), this training on '{taxonomy.name}' "
                    f"({', '.join(taxonomy.leaves)}); replay a run of the same taxonomy.")
            rows = [(i, r) for i, r in enumerate(source.read_split(), start=2)
                    if r["split"] == "train"]
            cell_types = self._replayed_cell_types(source, [r for _, r in rows])
            samples = [Sample(Path(r["path"]),
                              taxonomy.resolve(r["label"], where=f"{source.split} line {i}"),
                              r.get("patient") or None, r.get("slide") or None,
                              source=str(source.split), cell_label=cell)
                       for (i, r), cell in zip(rows, cell_types, strict=True)]
        else:
            samples = self._discover(Path(cfg.replay), taxonomy).samples
        real = [os.path.realpath(s.path) for s in samples]  # the same file by any link
        val_paths = {os.path.realpath(s.path) for s in val}
        val_groups = {s.group for s in val}
        clash = [s for s, path in zip(samples, real, strict=True)
                 if path in val_paths or s.group in val_groups]
        if clash:
            raise LeukotreeError(
                f"--replay '{cfg.replay}': {len(clash)} of its images are validation (or "
                f"test) images or of such a patient (e.g. '{display_path(clash[0].path)}', "
                f"{clash[0].group}); training on them leaks. Replay another lab's run, or "
                "give the two labs' patients distinct ids.")
        have = {os.path.realpath(s.path) for s in train}
        return [s for s, path in zip(samples, real, strict=True) if path not in have]

    def _replayed_cell_types(self, source: RunDir, rows: list[dict[str, str]],
                             ) -> list[str | None]:
        """The cell types ``split.csv`` of the replayed run lists for ``rows``, as this
        training's cell taxonomy names them; none when it has no cell-type head, or when
        the replayed run's cell types are not of its taxonomy (said)."""
        cells = self.cell_taxonomy
        if cells is None:
            return [None] * len(rows)
        try:
            return [cells.resolve(r["cell_type"]) if r.get("cell_type") else None
                    for r in rows]
        except LeukotreeError:
            self._log(f"the cell types of --replay '{self.config.replay}' are not of the cell "
                      f"taxonomy '{cells.name}': its images train the diagnosis only", "yellow")
            return [None] * len(rows)

    def _replay_run(self) -> RunDir | None:
        """The run folder ``--replay`` names (itself or its ``.pt`` file), or None when it
        names data (:func:`~leukotree.inference.loader.trained_run`)."""
        return trained_run(self.config.replay) if self.config.replay else None

    def _discover(self, data: Path, taxonomy: Taxonomy) -> SampleSet:
        """The usable images of ``data``; files not used are named (on screen and in
        ``not_used.csv``), and with ``skip_unreadable`` unreadable images are left out and
        named (``skipped.csv``) instead of stopping the run."""
        cfg = self.config
        sample_set = discover(data, taxonomy, patients=cfg.patients, labels=cfg.labels,
                              cell_labels=cfg.cell_labels, cell_taxonomy=self.cell_taxonomy)
        sample_set.raise_for_problems()
        audit = [i for i, s in enumerate(sample_set.samples) if s.audit]
        self._name_files(sample_set.not_used() + [
            (sample_set.samples[i].source, "an audit cell (its 'audit' column is true): the "
             "lab's unbiased test set, never trained on") for i in audit],
                         self.run.not_used, f"{data}: file(s) not used for training")
        if audit:
            sample_set = sample_set.subset(sorted(set(range(len(sample_set))) - set(audit)))
        if cfg.skip_unreadable:
            errors = decode_many([s.path for s in sample_set.samples], 16, workers=cfg.workers,
                                 on_error="report", progress=False,
                                 max_pixels=cfg.max_pixels).errors
            bad = [i for i, e in enumerate(errors) if e is not None]
            if bad:
                names = [display_path(sample_set.samples[i].path) for i in bad]
                self._name_files([(name, str(errors[i]).removeprefix(
                    f"Cannot read image '{name}': ")) for name, i in zip(names, bad, strict=True)],
                                 self.run.skipped,
                                 f"{data}: unreadable image(s) left out (--skip-unreadable)")
                keep = sorted(set(range(len(sample_set))) - set(bad))
                sample_set = sample_set.subset(keep)
        return sample_set

    def _check_pixel_sizes(self, samples: list[Sample]) -> None:
        """A manifest's ``pixel_size`` column must agree with ``--pixel-size``: one training
        reads all its images at one pixel size (mixed magnifications are not resampled
        in training yet), and a column that says otherwise is not silently ignored."""
        cfg = self.config
        given = {s.pixel_size for s in samples}
        if given <= {None, cfg.pixel_size}:  # rows without a value read at --pixel-size
            return
        values = ", ".join(sorted(f"{v:g}" for v in given if v is not None))
        missing = sum(s.pixel_size is None for s in samples)
        raise LeukotreeError(
            f"The training data's pixel_size column gives {values} micrometres per pixel"
            + (f" ({missing} rows have none)" if missing else "")
            + f", but this training reads every image at --pixel-size "
            f"{'(none)' if cfg.pixel_size is None else f'{cfg.pixel_size:g}'}. One training "
            "uses one pixel size: give --pixel-size with the column's single value, or "
            "train each magnification separately (mixed magnifications are not resampled "
            "in training yet).")

    def _name_files(self, rows: list[tuple[str, str]], csv_path: Path, title: str) -> None:
        """Print every ``(file, reason)`` and add them to ``csv_path`` in the run folder."""
        if not rows or not self.dist.is_main:
            return
        self._log(f"{len(rows)} {title}:", style="yellow")
        for file, reason in rows:
            self._log(f"  - {file}: {reason}")
        listed = self._listed.setdefault(csv_path, [])
        listed.extend({"file": f, "reason": r} for f, r in rows)
        write_csv(csv_path, listed, ["file", "reason"])

    def _prepare(self) -> tuple[Taxonomy, Split, Split]:
        cfg = self.config
        taxonomy = load_taxonomy(cfg.taxonomy)
        train_samples, val_samples = self._samples(taxonomy)
        if not train_samples or not val_samples:
            raise LeukotreeError("The split left no training or no validation images.")
        if cfg.coverage is not None and (cfg.fold is None or self._test):
            try:  # refused before any image is read
                check_cells(taxonomy, [s.label for s in val_samples], 1 - cfg.coverage,
                            cfg.conformal, cells="validation")
            except LeukotreeError as err:
                raise LeukotreeError(f"The 'coverage' parameter (--coverage): {err} (the "
                                     "validation split: --val-fraction)") from None
        self._n_new = len(train_samples)
        # replayed images are kept off the validation and the test patients alike
        train_samples += self._replay_samples(taxonomy, train_samples,
                                              val_samples + self._test)
        self._check_miss_rate_support(taxonomy, train_samples)
        self._check_pixel_sizes(train_samples + val_samples)
        listed = train_samples + val_samples + self._test  # the test images: never read
        parts = np.array(["train"] * len(train_samples) + ["val"] * len(val_samples)
                         + ["test"] * len(self._test))
        if self.resume:
            self._check_same_split(listed, parts)
        elif self.dist.is_main:
            write_text(self.run.taxonomy, taxonomy.to_yaml())
            write_split_csv(self.run.split, listed, None, parts)
        cache_dir = self.run.cache if cfg.cache == "disk" else None
        if cache_dir is not None and not self.dist.is_main:
            barrier(self.dist)  # rank 0 decodes first; the others read its cache
        show = self.progress and self.dist.is_main
        # Training images are cached train_pad larger and randomly cropped to img_size;
        # validation sees exactly what prediction will: the centre at img_size. Unreadable
        # images of both sides are named together.
        errors: list[str] = []
        pixels = []
        for samples, size, crop in ((train_samples, self.train_size, cfg.crop_fraction),
                                    (val_samples, cfg.img_size, self.eval_crop)):
            try:
                pixels.append(cached_pixels([s.path for s in samples], size, cache_dir,
                                            crop=crop, crop_mode=cfg.crop_mode,
                                            workers=cfg.workers, progress=show,
                                            max_pixels=cfg.max_pixels))
            except UnreadableImagesError as err:
                errors += err.errors
        raise_for_errors(errors)
        train_px, val_px = pixels
        if cache_dir is not None and self.dist.is_main:
            barrier(self.dist)
        if cfg.cache == "memory":
            train_px, val_px = np.asarray(train_px), np.asarray(val_px)
        focus = None
        if cfg.diagnosis_focus < 1 and self.cell_taxonomy is not None:
            focus = (focus_types(self.cell_taxonomy, cfg.focus_cells, "focus_cells"),
                     cfg.diagnosis_focus)
        train = make_split(train_samples, train_px, taxonomy, self.cell_taxonomy, focus)
        if focus is not None and train.diagnosis_weight is not None:
            n_focus = sum(w == 1 and s.cell_label is not None  # the weights say which
                          for s, w in zip(train_samples, train.diagnosis_weight, strict=True))
            self._log(f"the diagnosis loss is focused on the {', '.join(focus[0])} cells "
                      f"({n_focus} of {len(train_samples)} training images); the other cells "
                      f"with a cell type weigh {cfg.diagnosis_focus:g}")
        return taxonomy, train, make_split(val_samples, val_px, taxonomy, self.cell_taxonomy)

    def _check_miss_rate_support(self, taxonomy: Taxonomy, train: list[Sample]) -> None:
        """Refuse, before any image is read, a ``--patient-miss-rate`` the training split's
        positive patients cannot promise (:mod:`leukotree.patients.guarantee`). A fold of
        a cross-validation (a held-out cluster may hold many of the positive patients)
        trains without the promise instead, and says so: the CV pools the miss rate over
        the folds that state it."""
        cfg = self.config
        self._miss_rate = cfg.patient_miss_rate
        if cfg.patient_miss_rate is None or cfg.patient_model == "none":
            return
        positive = cfg.positive or taxonomy.leaves[0]
        n = len({s.patient for s in train if s.patient is not None and s.label == positive})
        try:
            check_miss_rate_support(n, cfg.patient_miss_rate, cfg.patient_miss_confidence,
                                    positive)
        except LeukotreeError as err:
            if cfg.fold is None:
                raise
            self._miss_rate = None
            self._log(f"fold {cfg.fold + 1}: {err} This fold states no miss rate; the "
                      "cross-validation's miss-rate figure leaves its patients out.",
                      "bold yellow")

    def _check_same_split(self, samples: list[Sample], parts: np.ndarray) -> None:
        """On resume, the data must give the split the run started with."""
        saved = {(r["path"], r["label"], r["split"]) for r in self.run.read_split()}
        now = {(os.path.abspath(s.path), s.label, str(p))
               for s, p in zip(samples, parts, strict=True)}
        if saved != now:
            raise LeukotreeError(
                f"The data changed since the run started: {len(now - saved)} image(s) or "
                f"labels are new and {len(saved - now)} are gone or moved between the parts "
                f"of the split (compared with {self.run.split}). Resuming would mix two "
                "data sets; start a new run with another --out.")

    def _build(self, taxonomy: Taxonomy, train: Split) -> TreeClassifier:
        """The model, normalised by the training pixels, seeded, with any given weights."""
        cfg = self.config
        mean, std = channel_stats(train.pixels)
        stain = None
        if cfg.stain_norm != "none":
            try:
                stain = fit_stain_target(cfg.stain_norm, train.pixels)
            except ValueError as err:
                raise LeukotreeError(f"--stain-norm {cfg.stain_norm}: {err}.") from None
        source = None
        if cfg.init:
            source = self._init_model(taxonomy)
            # the weights expect the source's normalisation
            mean, std, stain = source.config.mean, source.config.std, source.config.stain_target
        cells = self.cell_taxonomy.to_dict() if self.cell_taxonomy is not None else None
        field_um = None
        if cfg.pixel_size is not None:  # the physical side of what validation sees
            # the data's own images: replayed ones may come from another camera
            field_um = (self.eval_crop
                        * median_side([s.path for s in train.samples[:self._n_new]])
                        * cfg.pixel_size)
        mcfg = cfg.model_config(crop_fraction=self.eval_crop, mean=mean, std=std,
                                cell_taxonomy=cells, pixel_size=cfg.pixel_size,
                                field_um=field_um, stain_norm=cfg.stain_norm,
                                stain_target=stain)
        torch.manual_seed(cfg.seed)
        model = build_model(taxonomy, mcfg)
        if source is not None:
            try:
                model.load_state_dict(source.state_dict())
            except RuntimeError as err:
                raise LeukotreeError(
                    f"--init '{cfg.init}' does not fit this model ("
                    f"{str(err).strip().splitlines()[0]}); give the same options as that run "
                    "(its config.yaml), or no --init.") from None
            self._log(f"fine-tuning from {cfg.init}")
        elif cfg.weights or cfg.pretrained:
            for line in model.load_backbone_weights(cfg.weights, cfg.pretrained):
                self._log(line)
        return model.to(self.device)

    def _init_model(self, taxonomy: Taxonomy) -> TreeClassifier:
        """The model ``--init`` names, after checking that it fits this training."""
        cfg = self.config
        source = load(cfg.init).torch_model()
        want = {"taxonomy": taxonomy.leaves, "head": cfg.head,
                "backbone": cfg.model_config().arch_name, "img_size": cfg.img_size,
                "norm": cfg.norm, "stain_norm": cfg.stain_norm,
                "cell taxonomy": None if self.cell_taxonomy is None else self.cell_taxonomy.leaves}
        have = {"taxonomy": source.taxonomy.leaves, "head": source.config.head,
                "backbone": source.config.arch_name, "img_size": source.config.img_size,
                "norm": source.config.norm, "stain_norm": source.config.stain_norm,
                "cell taxonomy": None if source.cell_taxonomy is None
                else source.cell_taxonomy.leaves}
        if source.taxonomy != taxonomy:
            have["taxonomy"] = f"{source.taxonomy.name} {have['taxonomy']}"
        differ = [k for k in want if want[k] != have[k]]
        if differ:
            raise LeukotreeError(
                f"--init '{cfg.init}' cannot start this training: its "
                + "; ".join(f"{k} is {have[k]!r}, this training's {want[k]!r}" for k in differ)
                + ". Give the same options as that run (its config.yaml), or no --init.")
        return source

    def _criterion(self, model: TreeClassifier, taxonomy: Taxonomy, train: Split,
                   epoch: np.ndarray) -> TreeLoss:
        """The loss; balanced class weights count each image as often as an epoch shows
        it (``epoch``: the plan's image index; rotated copies, repeated new images)."""
        cfg = self.config
        leaf_w = None
        if cfg.class_weights == "balanced" or cfg.loss == "weighted-ce":
            labels = [s.label for s in train.samples]
            leaf_w = balanced_leaf_weights(taxonomy, [labels[i] for i in epoch]).tolist()
        return TreeLoss(taxonomy, hierarchical=model.is_hierarchical, kind=cfg.loss,
                        gamma=cfg.focal_gamma, leaf_weights=leaf_w,
                        label_smoothing=cfg.label_smoothing, cell_weight=cfg.cell_weight,
                        level_weights=cfg.level_weights).to(self.device)

    def _training_state(self, model: TreeClassifier, train: Split, precision: Precision,
                        ) -> tuple[TrainState, EpochPlan]:
        """Optimiser, schedule, scaler and weight average; restored from ``last.pt`` on
        resume."""
        cfg = self.config
        n_new = self._n_new
        if cfg.balance == "rotate":
            index, rotations = rotation_balance([s.label for s in train.samples[:n_new]],
                                                cfg.seed)
        else:
            index, rotations = np.arange(n_new), np.zeros(n_new, np.int64)
        n_replay = len(train) - n_new
        index, rotations, repeats = with_replay(index, rotations, n_new, n_replay,
                                                cfg.replay_share)
        if n_replay:
            self._log(f"replaying {n_replay} training images of {cfg.replay}: the {n_new} new "
                      f"ones are repeated {repeats}x, {1 - n_replay / len(index):.0%} of each "
                      "epoch")
        plan = EpochPlan(index, rotations, cfg.batch_size, self.dist)
        optimizer = make_optimizer(model, cfg)
        state = TrainState(model, optimizer, make_scheduler(optimizer, cfg, plan.steps),
                           torch.amp.GradScaler(enabled=precision.needs_scaler),
                           weight_average(model, cfg.ema_decay),
                           world_size=self.dist.world_size)
        if self.resume:
            state.load_state_dict(read_training_state(self.run.last))
            if state.stopped or state.epoch >= cfg.epochs:
                self._log(f"the run already ended after epoch {state.epoch} "
                          f"({'early stop' if state.stopped else 'all epochs done'}); "
                          "nothing left to train")
            else:
                self._log(f"resuming after epoch {state.epoch} of {cfg.epochs}")
        return state, plan

    # ----------------------------------------------------------------- epochs
    def _end_epoch(self, state: TrainState, row: dict[str, float], val: Split,
                   precision: Precision, channels_last: bool, n_train: int,
                   started: float) -> bool:
        """Validate (every ``eval_every`` epochs and after the last), keep the best model,
        write the history and ``last.pt``; returns True to stop early."""
        cfg = self.config
        due = state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs
        improved = False
        if due:
            row.update(validate(state.scored, val, cfg.batch_size * 2, precision, channels_last))
            if cfg.monitor == "last":  # no selection on the validation data
                value, improved = float(state.epoch), True
            else:
                value = row["val_loss" if cfg.monitor == "loss" else f"val_{cfg.monitor}"]
                sign = -1.0 if cfg.monitor == "loss" else 1.0
                # NaN (e.g. macro F1 without leaf-labelled validation images) never
                # improves, but the first validation always gives a best model.
                improved = (state.best is None
                            or (math.isnan(state.best) and not math.isnan(value))
                            or sign * value > sign * state.best)
            if improved:
                state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
            else:
                state.bad_epochs += 1
        else:
            row.update(dict.fromkeys(_VAL_KEYS, math.nan))
        row["seconds"] = time.perf_counter() - started
        state.history.append(row)
        if improved:
            save_model(self.run.best, state.scored, extra={
                "epoch": state.epoch, "metrics": row, "config": cfg.to_dict(),
                "train_images": n_train, "val_images": len(val), "data": str(self.data)})
        self._log(self._epoch_line(row, due, improved))
        self._write_history(state.history)
        stop = bool(cfg.patience and state.bad_epochs >= cfg.patience)
        if stop:
            state.stopped = True
            self._log(f"early stop: no improvement for {cfg.patience} validations")
        save_training_state(self.run.last, state.state_dict())
        return stop

    @staticmethod
    def _epoch_line(row: dict[str, float], validated: bool, improved: bool) -> str:
        text = (f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, "
                f"{row['train_images_per_s']:.0f} img/s")
        if validated:
            text += (f", val loss {row['val_loss']:.4f}, val acc {row['val_accuracy']:.4f}, "
                     f"val macro-F1 {row['val_macro_f1']:.4f}" + (" [best]" if improved else ""))
        return text

    def _write_history(self, history: list[dict[str, float]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        write_text(self.run.history, buffer.getvalue())

    def _finish(self, state: TrainState, train: Split, val: Split) -> dict[str, Any]:
        cfg = self.config
        summary = {"best_epoch": state.best_epoch, "best": state.best, "monitor": cfg.monitor,
                   "history": state.history, "run": str(self.out)}
        if self.dist.is_main:
            plots.learning_curves(state.history, self.run.curves)
            calibrate = ((cfg.calibrate or cfg.ood_quantile > 0 or cfg.coverage is not None)
                         and len(val) > 0)
            if calibrate and cfg.fold is not None and not self._test:
                self._log("no calibration, out-of-distribution threshold"
                          + (" or conformal answers" if cfg.coverage is not None else "")
                          + " for a cross-validation fold validated on its test fold "
                          "(--fold-val-fraction 0)", "dim")
                calibrate = False
            patients = cfg.patient_model != "none"
            if calibrate or patients:
                summary |= self._fit_stages(train, val, calibrate, patients)
            write_json(self.run.summary, summary)
        return summary

    def _fit_stages(self, train: Split, val: Split, calibrate: bool, patients: bool,
                    ) -> dict[str, Any]:
        """One pass of the best model over the sides the fits need, its raw
        (uncalibrated) outputs (a resumed, finished run is fitted afresh, not twice); then
        the stages of :mod:`leukotree.calibrate`: the out-of-distribution reference on the
        training cells, the calibration on the validation cells, the patient model on the
        training patients (scored on the validation ones); ``best.pt`` written once."""
        cfg = self.config
        model, _ = load_model(self.run.best)
        ood = calibrate and cfg.ood_quantile > 0
        if ood and model.ood is None:
            model.set_stage_features(min(cfg.ood_layers, model.max_stages()))
        model = model.to(self.device)
        sides = {"val": val}
        if patients or ood:
            sides["train"] = train
        outputs = {name: predict_outputs(model, part.pixels, cfg.batch_size * 2, self.device,
                                         size=cfg.img_size, raw=True)
                   for name, part in sides.items()}
        result: dict[str, Any] = {}
        sections: dict[str, Any] = {}
        if calibrate:
            reference = None
            if ood and "features" in outputs["val"]:
                # the reference cells: all training cells, or the replayed ones (after
                # the new)
                known = slice(self._n_new if cfg.ood_reference == "replayed" else 0, None)
                reference = fit_ood_reference(
                    outputs["train"][OodReference.key_of(model.ood_stages)][known],
                    [s.label for s in train.samples[known]], model.stage_widths())
            fitted = fit_calibration(model.taxonomy, [s.label for s in val.samples],
                                     outputs["val"], reference=reference,
                                     quantile=cfg.ood_quantile, temperatures=cfg.calibrate,
                                     distance_temperature=cfg.distance_temperature,
                                     coverage=cfg.coverage, conformal=cfg.conformal,
                                     strict=False, log=self._log,
                                     groups=[s.patient for s in val.samples])
            result |= fitted.summary
            sections |= fitted.sections()
            outputs = {name: fitted.apply(out) for name, out in outputs.items()}
        if patients:
            stage = self._fit_patient_model(model, train, val, outputs)
            sections["patient_model"] = stage.fitted.to_dict()
            result["patient_level"] = stage.metrics
        update_checkpoint(self.run.best, **sections)
        return result

    def _fit_patient_model(self, model: TreeClassifier, train: Split, val: Split,
                           outputs: dict[str, dict[str, np.ndarray]]) -> PatientStage:
        """The patient-level model fitted on the training patients (the best model's
        outputs, calibrated as stored) and scored on the validation patients
        (:func:`~leukotree.calibrate.fit_patient_stage`). With ``--replay``, on the
        training images with a patient id only: self-training's pseudo-labelled cells (of
        this run, or replayed from a self-trained one) have none."""
        cfg = self.config
        fit_on = LabelledCells(train.samples, outputs["train"])
        known = np.array([s.patient is not None for s in train.samples])
        if cfg.replay and known.any() and not known.all():
            fit_on = LabelledCells([s for s, k in zip(train.samples, known, strict=True) if k],
                                   {k: v[known] for k, v in outputs["train"].items()})
            self._log(f"patient model fitted on the {int(known.sum())} training images with "
                      f"a patient id ({int((~known).sum())} without one, such as "
                      "self-training's labelled cells, left out)", "dim")
        return fit_patient_stage(cfg.patient_model, model.taxonomy, model.cell_taxonomy,
                                 fit_on, LabelledCells(val.samples, outputs["val"]),
                                 rule=cfg.patient_threshold, positive=cfg.positive,
                                 seed=cfg.seed, params=patient_params(cfg),
                                 miss_rate=self._miss_rate,
                                 miss_confidence=cfg.patient_miss_confidence, log=self._log)


def train(data: str | Path, out: str | Path, config: TrainConfig, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train a model on ``data`` into run folder ``out`` (see :class:`Trainer`); the main
    process then writes the run's model card (``model_card.md``)."""
    trainer = Trainer(data, out, config, resume=resume, progress=progress)
    summary = trainer.fit()
    if trainer.dist.is_main and summary["best"] is not None:
        write_model_card(trainer.out)
    return summary
