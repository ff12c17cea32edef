"""Training configuration: defaults < preset < YAML file < command-line flags.

Every option is a :class:`TrainConfig` field whose metadata (help, choices, bounds,
flag: :func:`leukotree.options.option`) is the single source for the command line
(:func:`add_config_arguments`) and for validation (:meth:`TrainConfig.validate`), so
the two cannot drift. Unknown keys and impossible values are refused before any image
is read. The resolved configuration is saved as ``RUN/config.yaml`` beside every run.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from leukotree.data.images import CROP_MODES, STAIN_NORMS
from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.options import add_field_arguments, check_field, check_fields, option
from leukotree.rundir import read_yaml

_HYBRID = ["vgg16", "inception_v3", "legacy_xception"]


def _patient_model_choices() -> tuple[str, ...]:
    """``none`` and every registered patient model."""
    from leukotree.patients.models import PATIENT_MODELS

    return ("none", *PATIENT_MODELS)



@dataclass
class TrainConfig:
    """Every training option; the CLI flag of ``foo_bar`` is ``--foo-bar``."""

    taxonomy: str = option("leukemia7", "built-in taxonomy name or YAML file")
    model: str = option("resnet18", "timm backbone (resnet18, resnet50, densenet121, "
                        "inception_v3, googlenet, convnext_tiny, vit_small_patch16_224, vgg16, "
                        "legacy_xception...)")
    head: str = option("multihead", "flat | multihead | per-node | hybrid")
    hybrid_backbones: list[str] = option(
        help="comma-separated backbones of the hybrid head", factory=lambda: list(_HYBRID))
    pretrained: bool = option(False, "ImageNet weights from the hub (needs network; else use "
                              "--weights)")
    weights: str | None = option(None, "local file with backbone weights (timm/torchvision "
                                 "state dict); hybrid head: NAME=PATH,NAME=PATH, one file per "
                                 "backbone")
    init: str | None = option(None, "fine-tune: start from the weights (and normalisation) "
                              "of a trained leukotree model, a run folder or its best.pt, of "
                              "the same taxonomy, head, backbone and image size")
    replay: str | None = option(
        None, "fine-tune without forgetting: keep training on these cells as well (a run "
        "folder or its .pt file: its training images, usually the --init run; or a data "
        "folder or manifest, read with this training's --patients and --labels); they are "
        "never validated on")
    replay_share: float = option(0.5, "with --replay, the share of each epoch's training "
                                 "images drawn from the new data, at least (its images "
                                 "repeated to reach it; all replayed images are seen once)",
                                 low=0, high=1, low_open=True, high_open=True)
    norm: str = option("batch", "normalisation layers of the backbone: batch (the model's "
                       "own) or group (GroupNorm: per image, so another lab's batch statistics "
                       "cannot shift it; from scratch only, and adapt --method batch-norm has "
                       "nothing to re-estimate)", choices=("batch", "group"))
    img_size: int = option(224, "image side in pixels", low=16, high=4096)
    epochs: int = option(30, "number of epochs", low=1, high=100_000)
    batch_size: int = option(32, "batch size (per process)", low=1, high=65_536)
    lr: float = option(1e-3, "peak learning rate", low=0, low_open=True, high=10)
    weight_decay: float = option(0.05, "weight decay", low=0, high=10)
    optimizer: str = option("adamw", "optimizer", choices=("adamw", "adam", "sgd"))
    schedule: str = option("cosine", "learning-rate schedule (all with warm-up)",
                           choices=("cosine", "onecycle", "constant"))
    warmup_epochs: float = option(1.0, "warm-up length in epochs", low=0, high=100_000)
    loss: str = option("focal", "training loss", choices=("focal", "ce", "weighted-ce"))
    focal_gamma: float = option(2.0, "focal loss gamma", low=0, high=10)
    class_weights: str = option("none", "per-class alpha / weights",
                                choices=("none", "balanced"))
    label_smoothing: float = option(0.0, "label smoothing", low=0, high=1, high_open=True)
    level_weights: list[float] | None = option(
        None, "loss weight of each level of the tree, root's choice first (config files only)",
        cli=False)
    drop_rate: float = option(0.0, "dropout before the classifier", low=0, high=1,
                              high_open=True)
    ema_decay: float = option(0.0, "validate and save a moving average of the weights with "
                              "this per-step decay, e.g. 0.998 (0: off)", low=0, high=1,
                              high_open=True)
    augment: bool = option(True, "turn off flips, rotations and stain jitter",
                           flag="--no-augment")
    color_jitter: float = option(0.1, "relative strength of brightness/contrast/stain jitter",
                                 low=0, high=1)
    scale_jitter: float = option(0.0, "random magnification in [1/(1+x), 1+x] for training "
                                 "(other labs image cells at other scales; 0: off)",
                                 low=0, high=3)
    stain_jitter: float = option(0.0, "random stain variation in haematoxylin-eosin space "
                                 "(relative strength; 0: off)", low=0, high=1)
    crop_fraction: float = option(1.0, "keep this central fraction of each image before "
                                  "resizing", low=0, low_open=True, high=1)
    crop_mode: str = option("centre", "what the crop fraction applies to: the image's "
                            "central square, a square sized and centred by the cell's "
                            "nucleus (cell: independent of the camera's framing), or the "
                            "centre unless the image is a tight crop of its cell (auto)",
                            choices=CROP_MODES)
    pixel_size: float | None = option(
        None, "micrometres per pixel of the training images: the model then records the "
        "physical field of view it sees (the centre crop of the median training image), and "
        "predict/evaluate/serve/adapt --method batch-norm --pixel-size crop another lab's "
        "images (another camera or magnification) to that same field",
        low=0, low_open=True, high=1000)
    context_radius: float = option(
        0.0, "flatten the image beyond this fraction of its side from the centre to one "
        "colour, so the model cannot lean on the red cells and smear around the white "
        "cell, which differ between labs (0: keep everything)", low=0, high=0.75)
    stain_norm: str = option(
        "none", "normalise each image's colours inside the model: white (scale each channel "
        "so the image's brightest pixels match the training images', undoing a colour "
        "cast), reinhard (match the training images' L*a*b* means and deviations) or none",
        choices=STAIN_NORMS)
    train_pad: float = option(0.0, "cache training images this much larger and train on "
                              "random crops", low=0, high=0.5)
    balance: str = option("none", "top up minority classes with rotated copies (rotate)",
                          choices=("none", "rotate"))
    monitor: str = option("accuracy", "validation metric that picks the best checkpoint "
                          "(last: keep the last epoch, no selection on the validation data)",
                          choices=("accuracy", "macro_f1", "loss", "last"))
    patience: int = option(0, "early stopping after this many validations without "
                           "improvement (0: off)", low=0, high=100_000)
    fold: int | None = option(None, "hold out this fold of --folds patient-grouped folds as "
                              "the test images", low=0, high=1000)
    folds: int = option(5, "number of folds for --fold", low=2, high=1000)
    fold_groups: str | None = option(
        None, "with --fold: a CSV with 'group' and 'fold' columns that fixes every patient "
        "group's fold (e.g. the folds.csv of 'leukotree cv --protocol cluster') instead of "
        "stratified grouped folds", metavar="CSV")
    fold_val_fraction: float = option(
        0.15, "with --fold: grouped fraction of the fold's training patients held out to fit "
        "the temperatures and the out-of-distribution threshold (0: validate on the fold "
        "itself, uncalibrated, as earlier versions did)", low=0, high=0.5, high_open=True)
    val_fraction: float = option(0.15, "grouped validation fraction when neither --fold nor "
                                 "--val", low=0, high=0.5, high_open=True)
    val_data: str | None = option(None, "separate validation data (folder or manifest)",
                                  flag="--val")
    seed: int = option(0, "random seed", low=0, high=2**31 - 1)
    patients: str = option("auto", "patient ids: auto, manifest, folder, cnmc, none, "
                           "re:<regex>")
    labels: str = option("folder", "labels: folder, pbc-prefix, re:<regex>")
    threads: int = option(0, "CPU threads (0: all cores)", low=0, high=4096)
    channels_last: bool = option(True, "keep CNNs in the default memory format on CPUs",
                                 flag="--no-channels-last")
    amp: str = option("auto", "mixed precision (auto: on for CUDA)",
                      choices=("auto", "on", "off"))
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    workers: int = option(2, "image-decoding threads", low=1, high=256)
    cache: str = option("disk", "where decoded pixels are kept", choices=("disk", "memory"))
    eval_every: int = option(1, "validate every this many epochs (and after the last)",
                             low=1, high=100_000)
    cell_taxonomy: str | None = option(None, "a second, per-cell taxonomy (e.g. jhh-cells: the "
                                       "cell types a technologist signed) for a cell-type "
                                       "head; its cells give each patient's differential")
    cell_labels: str | None = option(None, "where each cell's type comes from: "
                                     "column:<manifest column> or re:<regex> on the file name")
    cell_weight: float = option(1.0, "weight of the cell-type loss beside the diagnosis loss",
                                low=0, high=100)
    patient_model: str = option("none", "patient-level model fitted on the training patients "
                                "after the cell model (none: only per-cell training)",
                                choices=_patient_model_choices)
    patient_fraction_of: str = option("promyelocyte", "the cell type whose fraction the "
                                      "'fraction' patient model reads")
    focus_cells: str | None = option(
        None, "the cell types that carry the diagnosis (comma list of the cell taxonomy's "
        "nodes; default: the cell taxonomy's informative cells, for jhh-cells blast, "
        "promyelocyte): the 'focused' patient models weigh them, diagnosis_focus trains on them")
    diagnosis_focus: float = option(
        1.0, "weight of the diagnosis loss on the cells whose cell type (as signed) is not one "
        "of focus_cells: 1 every cell alike, 0 the diagnosis head learns from the cells that "
        "carry the disease alone (cells without a cell type weigh 1)", low=0, high=1)
    patient_threshold: str = option("youden", "decision threshold of a two-leaf patient model, "
                                    "chosen on out-of-fold training patients: youden, "
                                    "sensitivity:<x> or a number")
    positive: str | None = option(None, "positive leaf of a two-leaf taxonomy (default: the "
                                  "first leaf)")
    patient_miss_rate: float | None = option(
        None, "a patient miss rate to promise (e.g. 0.1): the patient model calls a patient "
        "negative only below a threshold chosen by Learn-then-Test on out-of-fold training "
        "patients, so that at most this share of positive patients is called negative with "
        "--confidence; patients between it and the decision threshold are referred (needs a "
        "two-leaf taxonomy and --patient-model)", low=0, high=1, low_open=True, high_open=True)
    patient_miss_confidence: float = option(
        0.9, "with --patient-miss-rate: the confidence of the promise, P(miss rate <= it) >= "
        "this", low=0, high=1, low_open=True, high_open=True, flag="--confidence")
    final_model: str = option(
        "single", "what 'train' builds: one model on all the data (single), or the fold "
        "models of a patient-grouped --folds cross-validation kept as one ensemble, with the "
        "patient model fitted on their out-of-fold outputs (folds: RUN is then a cv folder, "
        "and its cross-fitted patient estimate is in RUN/stacked.json)",
        choices=("single", "folds"))
    max_pixels: int = option(60_000_000, "refuse images larger than this many pixels (a "
                             "decompression-bomb guard)", low=1, high=10**10)
    skip_unreadable: bool = option(False, "leave out images that cannot be read (listed on "
                                   "screen and in RUN/skipped.csv) instead of stopping")
    calibrate: bool = option(True, "fit a temperature per tree node on the validation split "
                             "after training (cross-validation folds are left uncalibrated: "
                             "their validation fold is the test fold)", flag="--no-calibrate")
    distance_temperature: bool = option(
        True, "after the temperatures, soften each cell's probabilities with its "
        "out-of-distribution score relative to the validation cells' median (power fitted "
        "on the validation split; softens another lab's cells, never changes a leaf)",
        flag="--no-distance-temperature")
    ood_quantile: float = option(0.95, "flag cells farther from the training cells than this "
                                 "quantile of the validation cells as unclassifiable (0: no "
                                 "out-of-distribution score)", low=0, high=1, high_open=True)
    coverage: float | None = option(
        None, "answer each cell with the deepest tree node that holds its class with this "
        "probability (conformal risk control on the calibrated validation cells; e.g. "
        "0.95; default: no conformal answers)", low=0, high=1, low_open=True,
        high_open=True)
    conformal: str = option("marginal", "conformal answers' guarantee: over all cells "
                            "(marginal) or for every class (mondrian: a threshold per class, "
                            "needs more validation cells of each)",
                            choices=("marginal", "mondrian"))
    ood_layers: int = option(3, "backbone stages, counted from the last, whose feature "
                             "distances add up to the out-of-distribution score (1: the "
                             "pooled features alone)", low=1, high=12)
    ood_reference: str = option(
        "training", "the cells the out-of-distribution score measures distance to: all "
        "training cells, or only the --replay ones (for labels the model gave itself, as "
        "adapt's self-training does: cells it merely labelled are not known cells)",
        choices=("training", "replayed"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, check_device: bool = True) -> None:
        """Check every value against its field's rule, then the names that must exist
        (head, backbones, patient and label rules, and the device unless
        ``check_device`` is false) — all before any image is read."""
        check_fields(self)
        if self.fold is not None and self.fold >= self.folds:
            raise LeukotreeError(
                f"The 'fold' parameter must be in 0..{self.folds - 1} for {self.folds} folds; "
                f"got {self.fold}.")
        if (self.cell_taxonomy is None) != (self.cell_labels is None):
            raise LeukotreeError(
                "The 'cell_taxonomy' and 'cell_labels' parameters go together: a cell-type "
                "head needs both the tree of cell types and where each cell's type comes from.")
        from leukotree.patients.fit import check_threshold_rule

        check_threshold_rule(self.patient_threshold)
        if self.norm != "batch" and (self.pretrained or self.weights):
            raise LeukotreeError(
                f"The 'norm' parameter '{self.norm}' builds the backbone from scratch with "
                "other normalisation layers: it cannot take --pretrained or --weights (made "
                "for batch norm); use norm batch for those.")
        if self.pixel_size is not None and self.crop_mode == "cell":
            raise LeukotreeError(
                "The 'pixel_size' parameter has no effect with crop_mode cell (the crop is "
                "sized by each cell's nucleus, not by the camera); leave one of them out.")
        if self.fold is not None and self.val_data:
            raise LeukotreeError(
                "The 'fold' and 'val_data' parameters exclude each other: validate on a fold "
                "of the data, or on separate data (--val), not both.")
        self._validate_names(check_device)

    def _validate_names(self, check_device: bool) -> None:
        from leukotree.data.discover import label_rule, patient_rule
        from leukotree.models import head_class
        from leukotree.models.backbones import check_input_size
        from leukotree.taxonomy import load_taxonomy

        head = head_class(self.head)
        if self.norm != "batch" and not head.supports_norm_choice:
            raise LeukotreeError(
                f"The {self.head} head keeps its backbones' own normalisation; the 'norm' "
                f"parameter '{self.norm}' needs the flat, multihead or per-node head.")
        for name in head.arch_name(self.model_config()).split("+"):
            check_input_size(name, self.img_size)
        taxonomy = load_taxonomy(self.taxonomy)
        if self.init is not None:
            from leukotree.inference.loader import trained_checkpoint

            trained_checkpoint(self.init, "--init")
        if self.ood_reference == "replayed" and self.replay is None:
            raise LeukotreeError("--ood-reference replayed needs --replay: the distance is "
                                 "measured to the replayed training images.")
        if self.replay is not None and not Path(self.replay).exists():
            raise LeukotreeError(f"--replay '{self.replay}' does not exist: give the run folder "
                                 "whose training images to keep training on (usually the "
                                 "--init run), or a data folder or manifest.")
        if self.positive is not None:
            self.positive = taxonomy.resolve(self.positive, where="--positive")
        if self.cell_taxonomy is not None and not head.supports_cell_head:
            raise LeukotreeError(f"The {self.head} head cannot carry a cell-type head; use "
                                 "flat, multihead or hybrid with --cell-taxonomy.")
        if self.patient_miss_rate is not None:
            self._check_miss_rate(len(taxonomy.leaves))
        if self.diagnosis_focus < 1:
            from leukotree.patients.models import focus_types

            if self.cell_taxonomy is None:
                raise LeukotreeError(
                    f"The 'diagnosis_focus' parameter ({self.diagnosis_focus}) weighs cells by "
                    "their signed cell type, which needs a cell-type head: give "
                    "--cell-taxonomy and --cell-labels, or leave diagnosis_focus at 1.")
            focus_types(load_taxonomy(self.cell_taxonomy), self.focus_cells, "focus_cells")
        if self.patient_model != "none":
            from leukotree.patients.models import patient_model_class, patient_params

            patient_model_class(self.patient_model).check_params(
                patient_params(self),
                None if self.cell_taxonomy is None else load_taxonomy(self.cell_taxonomy))
        patient_rule(self.patients)
        label_rule(self.labels)
        if check_device:
            from leukotree.engine.distributed import resolve_device

            resolve_device(self.device)

    def _check_miss_rate(self, n_leaves: int) -> None:
        """A promised patient miss rate needs two diagnoses and a fitted patient model."""
        if n_leaves != 2:
            raise LeukotreeError(
                f"The 'patient_miss_rate' parameter promises how many positive patients are "
                f"missed, which needs a taxonomy of two diagnoses (e.g. aml-apl); taxonomy "
                f"'{self.taxonomy}' has {n_leaves} leaves. Give a two-leaf taxonomy, or leave "
                "out --patient-miss-rate.")
        if self.patient_model == "none":
            raise LeukotreeError(
                "The 'patient_miss_rate' parameter chooses the threshold of a patient model, "
                "but patient_model is none: give one with --patient-model (e.g. mean, "
                "fraction or differential), or leave out --patient-miss-rate.")

    def model_config(self, **extra: Any) -> Any:
        """The :class:`~leukotree.models.ModelConfig` of this training configuration."""
        from leukotree.models import ModelConfig

        return ModelConfig(head=self.head, backbone=self.model, img_size=self.img_size,
                           crop_mode=self.crop_mode, context_radius=self.context_radius,
                           norm=self.norm,
                           drop_rate=self.drop_rate, hybrid_backbones=list(self.hybrid_backbones),
                           **extra)


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def check_value(name: str, value: Any) -> Any:
    """``value`` converted to training option ``name``'s type and checked against its rule."""
    return check_field(_FIELDS[name], value)


#: Named recipes. ``cpu-fast`` trains PBC-sized data on a 2-core CPU in minutes.
PRESETS: dict[str, dict[str, Any]] = {
    # PBC (../shared/data/pbc-dev, pbc taxonomy) in about 15 minutes on 2 CPU cores, from
    # scratch; context_radius keeps another lab's smear from steering it, stain_norm white
    # another lab's colour cast (docs/guide/training.md, "cpu-fast"; docs/guide/other-labs.md
    # and docs/benchmarks/cross-lab.md, from benchmarks/bench_cross_lab.py).
    "cpu-fast": {
        "model": "resnet18", "head": "multihead", "img_size": 112, "crop_fraction": 0.65,
        "train_pad": 0.15, "epochs": 24, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.05,
        "schedule": "onecycle", "loss": "ce", "label_smoothing": 0.1, "augment": True,
        "color_jitter": 0.1, "drop_rate": 0.2, "warmup_epochs": 1.0, "context_radius": 0.35,
        "stain_norm": "white",
    },
    "tiny-test": {
        "model": "test_resnet", "img_size": 32, "epochs": 2, "batch_size": 16, "lr": 3e-3,
        "hybrid_backbones": ["test_resnet", "test_efficientnet"], "workers": 1,
    },
    "paper": {
        "model": "resnet50", "head": "multihead", "img_size": 224, "epochs": 50,
        "batch_size": 32, "lr": 1e-4, "optimizer": "adamw", "loss": "focal", "folds": 5,
    },
    # Sharshar et al. 2025's own recipes (ConvNeXt-Tiny and ViT-Small, AdamW, focal loss,
    # 80 epochs, 224 px, 5 patient-grouped folds): GPU recipes; they start on a CPU.
    "paper-convnext": {
        "model": "convnext_tiny", "head": "multihead", "img_size": 224, "epochs": 80,
        "batch_size": 32, "lr": 1e-4, "weight_decay": 0.05, "optimizer": "adamw",
        "schedule": "cosine", "warmup_epochs": 2.0, "loss": "focal", "focal_gamma": 2.0,
        "folds": 5, "drop_rate": 0.1,
    },
    "paper-vit": {
        "model": "vit_small_patch16_224", "head": "multihead", "img_size": 224, "epochs": 80,
        "batch_size": 32, "lr": 5e-5, "weight_decay": 0.05, "optimizer": "adamw",
        "schedule": "cosine", "warmup_epochs": 5.0, "loss": "focal", "focal_gamma": 2.0,
        "folds": 5, "drop_rate": 0.1,
    },
}


def check_keys(data: Iterable[str], source: str) -> None:
    """Refuse keys that are not options, with "did you mean"."""
    for key in data:
        if key not in _FIELDS:
            raise LeukotreeError(
                f"Unknown option '{key}' in {source}." + did_you_mean(str(key), _FIELDS)
                + f" Valid options: {', '.join(sorted(_FIELDS))}.")


def resolve_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge defaults, a preset, a YAML file and explicit overrides (in that order)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise LeukotreeError(f"Unknown preset '{preset}'; choose one of "
                                 f"{', '.join(PRESETS)}." + did_you_mean(preset, PRESETS))
        values.update(PRESETS[preset])
    if config_file is not None:
        path = Path(config_file)
        data = read_yaml(path, "Config file") or {}
        if not isinstance(data, dict):
            raise LeukotreeError(f"Config file '{path}' must hold a mapping of options; it "
                                 f"holds a {type(data).__name__}.")
        check_keys(data, f"config file '{path}'")
        values.update(data)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_keys(overrides, "the command line")
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


#: Options a resumed run may change: they do not alter what the run computes.
RESUMABLE = frozenset({"threads", "workers", "device", "cache", "patience", "eval_every"})


def resume_config(saved: TrainConfig, wanted: TrainConfig | dict[str, Any],
                  ) -> tuple[TrainConfig, list[str]]:
    """The configuration to resume with: ``saved``, with the changes in ``wanted`` (a full
    configuration or the options given on the command line) that :data:`RESUMABLE`
    allows. Other changes are refused, all named at once. Returns the configuration and
    one line per applied change."""
    wanted = wanted.to_dict() if isinstance(wanted, TrainConfig) else dict(wanted)
    old = saved.to_dict()
    changed = {k: v for k, v in wanted.items() if v is not None and v != old[k]}
    refused = sorted(set(changed) - RESUMABLE)
    if refused:
        listed = "; ".join(f"{k}: {old[k]!r} in the run, {changed[k]!r} now" for k in refused)
        raise LeukotreeError(
            f"A resumed run keeps its options, but these differ ({listed}). Resume without "
            "them, or start a new run with another --out to change them. Only "
            f"{', '.join(sorted(RESUMABLE))} may change on resume.")
    config = TrainConfig(**(old | changed))
    config.validate()
    return config, [f"{k}: {old[k]!r} -> {changed[k]!r}" for k in sorted(changed)]


def save_config(config: TrainConfig, path: Path) -> None:
    from leukotree.rundir import write_text

    write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config(path: Path, *, check_device: bool = True) -> TrainConfig:
    """A configuration saved by :func:`save_config`, checked like any other (its device
    only with ``check_device``: a run saved on a GPU machine may resume elsewhere)."""
    data = read_yaml(path, "Saved configuration")
    if not isinstance(data, dict):
        raise LeukotreeError(f"Saved configuration '{path}' must hold a mapping of options.")
    check_keys(data, str(path))
    if data.get("fold") is not None:  # a fold saved before the option: validated on itself
        data.setdefault("fold_val_fraction", 0.0)
    config = TrainConfig(**data)
    config.validate(check_device=check_device)
    return config


# ----------------------------------------------------------------- command line
def add_config_arguments(parser: argparse.ArgumentParser, skip: Iterable[str] = (),
                         short: dict[str, str] | None = None) -> None:
    """One flag per :class:`TrainConfig` field (``default=None``: unset flags do not
    override presets or config files). Booleans are switches that flip the default."""
    add_field_arguments(parser, TrainConfig, skip=skip, short=short, unset=True)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (those left unset are ``None``)."""
    return {f.name: getattr(args, f.name, None) for f in fields(TrainConfig)}
