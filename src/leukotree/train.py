"""The training engine: data preparation, the epoch loop, checkpoints and resume.

A run folder ``RUN`` receives:

- ``config.yaml`` (resolved options), ``environment.json`` (versions, seed),
  ``taxonomy.yaml`` and ``split.csv`` (which image trained and which validated);
- ``history.csv`` and ``learning_curves.png`` (per-epoch metrics);
- ``best.pt`` (the best model by the monitored validation metric, a
  self-describing file) and ``last.pt`` (everything needed for ``--resume``);
- ``cache/`` (decoded pixels, reused by later runs on the same images).

Resuming restarts the epoch that was interrupted; every epoch's shuffling and
augmentation are seeded by ``(seed, epoch)``, so a resumed run gives the same
result as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from sklearn.metrics import f1_score

from leukotree import plots
from leukotree.cache import cached_pixels
from leukotree.checkpoint import environment, save_model
from leukotree.config import TrainConfig, save_config
from leukotree.data import Sample, SampleSet, discover
from leukotree.distributed import DistInfo, barrier, broadcast_flag, init_distributed, shutdown
from leukotree.errors import LeukotreeError
from leukotree.losses import TreeLoss, balanced_leaf_weights
from leukotree.models import ModelConfig, TreeClassifier, build_model
from leukotree.progress import make_progress
from leukotree.splits import assign_folds, train_val_test_split, write_split_csv
from leukotree.taxonomy import Taxonomy, load_taxonomy


@dataclass
class Split:
    """Images, pixels and targets of one side of a split."""

    samples: list[Sample]
    pixels: np.ndarray  # (N, S, S, 3) uint8, possibly memory-mapped
    leaf_mask: np.ndarray  # (N, n_leaves) bool
    head_targets: np.ndarray  # (N, n_inner) int64, -1 = ignore

    def __len__(self) -> int:
        return len(self.samples)


def make_split(samples: list[Sample], pixels: np.ndarray, taxonomy: Taxonomy) -> Split:
    labels = [s.label for s in samples]
    return Split(samples, pixels, taxonomy.leaf_mask(labels), taxonomy.encode_heads(labels))


def choose_split(sample_set: SampleSet, config: TrainConfig) -> np.ndarray:
    """``'train'``/``'val'`` per image: a CV fold, or a grouped validation fraction."""
    labels, groups = sample_set.labels, sample_set.groups.tolist()
    if config.fold is not None:
        folds, _ = assign_folds(labels, groups, config.folds, config.seed)
        return np.where(folds == config.fold, "val", "train")
    if config.val_fraction <= 0:
        raise LeukotreeError("Training needs validation data: give --val DATA, --fold k, or a "
                             "--val-fraction above 0.")
    return train_val_test_split(labels, groups, config.val_fraction, 0.0, config.seed)


def channel_stats(pixels: np.ndarray, chunk: int = 512) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation (in [0, 1] units) of uint8 pixels."""
    total = np.zeros(3)
    total_sq = np.zeros(3)
    count = 0
    for start in range(0, len(pixels), chunk):
        block = np.asarray(pixels[start:start + chunk], dtype=np.float64) / 255.0
        total += block.sum(axis=(0, 1, 2))
        total_sq += (block ** 2).sum(axis=(0, 1, 2))
        count += block.shape[0] * block.shape[1] * block.shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 1e-8))
    return mean.tolist(), std.tolist()


def rotation_balance(labels: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed paper's balancing: minority classes topped up with rotated copies.

    Returns ``(index, rotation)`` arrays: every image once with rotation 0, then
    copies of images of smaller classes with rotations 1, 2, 3 (x 90 degrees),
    until each class reaches the largest class's count or four copies per image.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    index = [np.arange(len(labels_arr))]
    rotation = [np.zeros(len(labels_arr), np.int64)]
    counts = {lab: int((labels_arr == lab).sum()) for lab in set(labels_arr.tolist())}
    target = max(counts.values())
    for lab, n in sorted(counts.items()):
        members = np.flatnonzero(labels_arr == lab)
        need = min(target - n, 3 * n)
        if need <= 0:
            continue
        extra = np.concatenate([rng.permutation(members) for _ in range(3)])[:need]
        rot = 1 + np.arange(need) // n
        index.append(extra)
        rotation.append(rot.astype(np.int64))
    return np.concatenate(index), np.concatenate(rotation)


def random_crop(batch: torch.Tensor, size: int, gen: torch.Generator, random: bool = True,
                ) -> torch.Tensor:
    """A ``size`` x ``size`` crop of every image, at a random place (or the centre)."""
    room = batch.shape[-1] - size
    if not random:
        o = room // 2
        return batch[..., o:o + size, o:o + size].contiguous()
    offsets = torch.randint(0, room + 1, (batch.shape[0], 2), generator=gen).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for img, (y, x) in zip(batch, offsets,
                                                                          strict=True)])


def augment(batch: torch.Tensor, gen: torch.Generator, jitter: float,
            forced_rot: torch.Tensor | None = None) -> torch.Tensor:
    """Smear-friendly augmentation of a float batch in [0, 255] (``(B, 3, S, S)``).

    Random horizontal flip, rotation by a multiple of 90 degrees (plus any forced
    rotation from class balancing), and small brightness, contrast and per-channel
    stain gains of relative size ``jitter``.
    """
    b, dev = batch.shape[0], batch.device
    # Random draws come from the CPU generator ``gen`` whatever the device, so a seed
    # gives the same augmentation on a CPU and a GPU; they then move to the batch.
    flip = (torch.rand(b, generator=gen) < 0.5).to(dev)
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    k = torch.randint(0, 4, (b,), generator=gen)
    if forced_rot is not None:
        k = (k + forced_rot.cpu()) % 4
    out = batch.clone()
    for r in range(1, 4):
        sel = torch.nonzero(k == r).flatten()
        if sel.numel():
            sel = sel.to(dev)
            out[sel] = torch.rot90(batch[sel], r, dims=(2, 3))
    if jitter > 0:
        gains = (1 + (torch.rand(b, 3, generator=gen) * 2 - 1) * jitter).to(dev)
        bright = (1 + (torch.rand(b, 1, generator=gen) * 2 - 1) * jitter).to(dev)
        contrast = (1 + (torch.rand(b, 1, generator=gen) * 2 - 1) * jitter).to(dev)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast[:, :, None, None] + mean
        out = out * (gains * bright)[:, :, None, None]
        out = out.clamp(0, 255)
    return out


def to_batch(pixels: np.ndarray, index: np.ndarray, device: torch.device,
             channels_last: bool) -> torch.Tensor:
    """uint8 NHWC rows of ``pixels`` -> float NCHW tensor on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels[index]))
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


@torch.no_grad()
def predict_pixels(model: torch.nn.Module, pixels: np.ndarray, batch_size: int,
                   device: torch.device, channels_last: bool = False,
                   amp: bool = False) -> np.ndarray:
    """Leaf probabilities ``(N, n_leaves)`` for uint8 pixels, in batches."""
    model.eval()
    out = []
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    for start in range(0, len(pixels), batch_size):
        idx = np.arange(start, min(start + batch_size, len(pixels)))
        with ctx:
            logp = model(to_batch(pixels, idx, device, channels_last))["leaf_logp"]
        out.append(logp.float().exp().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def tree_accuracy(probs: np.ndarray, leaf_mask: np.ndarray) -> float:
    """Share of images whose predicted leaf lies under their label (a leaf: equal to it)."""
    if len(probs) == 0:
        return float("nan")
    pred = probs.argmax(1)
    return float(leaf_mask[np.arange(len(pred)), pred].mean())


def leaf_macro_f1(probs: np.ndarray, leaf_mask: np.ndarray) -> float:
    """Macro F1 over leaves, on the images labelled with a leaf."""
    exact = leaf_mask.sum(1) == 1
    if not exact.any():
        return float("nan")
    truth = leaf_mask[exact].argmax(1)
    present = np.unique(truth)
    return float(f1_score(truth, probs[exact].argmax(1), labels=present, average="macro",
                          zero_division=0))


def _lr_lambda(config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warm = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)


def _make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig, steps: int,
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        # At least 4 steps and a warm-up of at least 2 of them: OneCycleLR divides by
        # the length of each phase (zero for a 1-epoch run of 1 step otherwise).
        total = max(4, config.epochs * steps)
        pct = min(0.5, max(0.05, config.warmup_epochs / max(1, config.epochs), 2 / total))
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total,
                                                   pct_start=pct)
    return torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, steps))


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device(spec)


def cpu_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time / bf16-autocast time of a small conv forward+backward on this CPU.

    Some CPUs advertise bf16 instructions yet run bf16 autocast far slower than
    fp32; a measurement is the only reliable answer.
    """
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(4, 32, 32, 32)

    def timed(amp: bool) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16) if amp else nullcontext():
                conv(x).float().sum().backward()
            best = min(best, time.perf_counter() - start)
        return best

    timed(False), timed(True)  # warm-up
    return timed(False) / timed(True)


def weight_average(model: torch.nn.Module, decay: float,
                   ) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers, or None.

    After every optimiser step ``w_ema <- decay * w_ema + (1 - decay) * w``; batch-norm
    statistics are averaged the same way, so the average needs no extra pass over data.
    """
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


class Trainer:
    """Trains one model into one run folder; :meth:`fit` runs or resumes it."""

    def __init__(self, data: str | Path, out: str | Path, config: TrainConfig, *,
                 resume: bool = False, progress: bool = True,
                 console: Console | None = None) -> None:
        self.data = Path(data)
        self.out = Path(out)
        self.config = config
        self.resume = resume
        self.progress = progress
        self.console = console or Console(stderr=True)
        self.device = resolve_device(config.device)
        self.dist = DistInfo()

    # ----------------------------------------------------------------- setup
    def _log(self, text: str) -> None:
        if self.dist.is_main:
            self.console.print(text, highlight=False)

    def _check_run_dir(self) -> None:
        last = self.out / "last.pt"
        if last.exists() and not self.resume:
            raise LeukotreeError(
                f"Run folder '{self.out}' already holds a run; pass --resume to continue it "
                "or choose another --out.")
        if self.resume and not last.exists():
            raise LeukotreeError(f"Nothing to resume in '{self.out}' (no last.pt).")

    def _prepare(self) -> tuple[Taxonomy, Split, Split]:
        cfg = self.config
        taxonomy = load_taxonomy(cfg.taxonomy)
        sample_set = discover(self.data, taxonomy, patients=cfg.patients, labels=cfg.labels)
        sample_set.raise_for_problems()
        note = sample_set.grouping_note()
        if note:
            self._log(f"[bold yellow]{note}[/]")
        if cfg.val_data:
            val_set = discover(cfg.val_data, taxonomy, patients=cfg.patients, labels=cfg.labels)
            val_set.raise_for_problems()
            train_samples, val_samples = sample_set.samples, val_set.samples
            overlap = {s.group for s in train_samples if s.patient} & {
                s.group for s in val_samples if s.patient}
            if overlap:
                raise LeukotreeError(
                    f"{len(overlap)} patient(s) appear in both the training and the validation "
                    f"data (e.g. {sorted(overlap)[:3]}); that leaks. Separate them.")
        else:
            parts = choose_split(sample_set, cfg)
            train_samples = [s for s, p in zip(sample_set.samples, parts, strict=True)
                             if p == "train"]
            val_samples = [s for s, p in zip(sample_set.samples, parts, strict=True)
                           if p == "val"]
        if not train_samples or not val_samples:
            raise LeukotreeError("The split left no training or no validation images.")
        if self.dist.is_main:
            write_split_csv(self.out / "split.csv", train_samples + val_samples, None,
                            np.array(["train"] * len(train_samples) + ["val"] * len(val_samples)))
        cache_dir = self.out / "cache" if cfg.cache == "disk" else None
        if cache_dir is not None and not self.dist.is_main:
            barrier(self.dist)  # rank 0 decodes first; the others read its cache
        show = self.progress and self.dist.is_main
        # Training images are cached train_pad larger and randomly cropped to img_size;
        # validation sees exactly what prediction will: the centre at img_size.
        train_px = cached_pixels([s.path for s in train_samples], self.train_size, cache_dir,
                                 crop=cfg.crop_fraction, workers=cfg.workers, progress=show)
        val_px = cached_pixels([s.path for s in val_samples], cfg.img_size, cache_dir,
                               crop=self.eval_crop, workers=cfg.workers, progress=show)
        if cache_dir is not None and self.dist.is_main:
            barrier(self.dist)
        if cfg.cache == "memory":
            train_px, val_px = np.asarray(train_px), np.asarray(val_px)
        return (taxonomy, make_split(train_samples, train_px, taxonomy),
                make_split(val_samples, val_px, taxonomy))

    @property
    def train_size(self) -> int:
        return round(self.config.img_size * (1 + self.config.train_pad))

    @property
    def eval_crop(self) -> float:
        return self.config.crop_fraction * self.config.img_size / self.train_size

    def _build(self, taxonomy: Taxonomy, train: Split) -> TreeClassifier:
        cfg = self.config
        mean, std = channel_stats(train.pixels)
        mcfg = ModelConfig(head=cfg.head, backbone=cfg.model, img_size=cfg.img_size,
                           drop_rate=cfg.drop_rate, hybrid_backbones=list(cfg.hybrid_backbones),
                           crop_fraction=self.eval_crop, mean=mean, std=std)
        _seed_all(cfg.seed)
        model = build_model(taxonomy, mcfg)
        if cfg.weights or cfg.pretrained:
            self._load_backbone_weights(model)
        return model

    def _load_backbone_weights(self, model: TreeClassifier) -> None:
        from leukotree.backbones import (
            create_backbone,
            create_feature_extractor,
            hybrid_weight_files,
            load_weights,
        )

        cfg = self.config
        if cfg.head == "hybrid":
            names = list(cfg.hybrid_backbones)
            files = hybrid_weight_files(cfg.weights, names) if cfg.weights else {}
            for name, extractor in zip(names, model.extractors, strict=True):
                if cfg.weights and name not in files:
                    self._log(f"{name}: no weights file given, random initialisation")
                    continue
                ref = create_feature_extractor(name, img_size=cfg.img_size,
                                               pretrained=cfg.pretrained and not cfg.weights,
                                               weights=files.get(name))
                extractor.load_state_dict(ref.state_dict())
                self._log(f"{name}: loaded {files.get(name, 'hub weights')}")
            return
        backbones = ([model.backbone] if hasattr(model, "backbone")
                     else [m[0] for m in model.node_models])
        for bb in backbones:
            if cfg.weights:
                missing, _ = load_weights(bb, cfg.weights)
                self._log(f"loaded {cfg.weights} ({len(missing)} backbone tensors not in file)")
            else:
                ref = create_backbone(cfg.model, img_size=cfg.img_size, pretrained=True)
                bb.load_state_dict(ref.state_dict())

    def _arch(self) -> str:
        cfg = self.config
        return "+".join(cfg.hybrid_backbones) if cfg.head == "hybrid" else cfg.model

    # ----------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train (or resume) and return the best validation metrics."""
        self.dist = init_distributed(self.device)
        try:
            return self._fit()
        finally:
            shutdown(self.dist)

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._check_run_dir()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main and not self.resume:
            save_config(cfg, self.out / "config.yaml")
            env = environment() | {"seed": cfg.seed, "device": str(self.device),
                                   "world_size": self.dist.world_size,
                                   "threads": torch.get_num_threads()}
            (self.out / "environment.json").write_text(json.dumps(env, indent=2))
        taxonomy, train, val = self._prepare()
        if self.dist.is_main:
            (self.out / "taxonomy.yaml").write_text(taxonomy.to_yaml())
        self._log(f"training on {len(train)} images, validating on {len(val)} "
                  f"({cfg.head} head, {self._arch()}, "
                  f"{cfg.img_size}px, device {self.device}, {torch.get_num_threads()} threads)")
        model = self._build(taxonomy, train).to(self.device)
        use_cl = cfg.channels_last and self.device.type == "cpu" and cfg.head != "hybrid"
        if use_cl:
            model = model.to(memory_format=torch.channels_last)
        leaf_w = None
        if cfg.class_weights == "balanced" or cfg.loss == "weighted-ce":
            leaf_w = balanced_leaf_weights(taxonomy, [s.label for s in train.samples]).tolist()
        criterion = TreeLoss(taxonomy, cfg.head, kind=cfg.loss, gamma=cfg.focal_gamma,
                             leaf_weights=leaf_w, label_smoothing=cfg.label_smoothing,
                             level_weights=cfg.level_weights).to(self.device)

        if cfg.balance == "rotate":
            train_index, train_rot = rotation_balance([s.label for s in train.samples], cfg.seed)
        else:
            train_index = np.arange(len(train))
            train_rot = np.zeros(len(train), np.int64)
        per_rank = len(train_index) // self.dist.world_size
        steps = max(1, per_rank // cfg.batch_size)
        if per_rank < cfg.batch_size:
            steps = 1
        optimizer = _make_optimizer(model, cfg)
        scheduler = _make_scheduler(optimizer, cfg, steps)
        net: torch.nn.Module = model
        if self.dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.head == "per-node")
        amp = cfg.amp == "on" or (cfg.amp == "auto" and self.device.type == "cuda")
        if amp and self.device.type == "cpu":
            speedup = cpu_bf16_speedup()
            if speedup < 0.8:
                raise LeukotreeError(
                    f"--amp on asks for bf16 autocast, but on this CPU it runs {1 / speedup:.1f}x "
                    "slower than fp32 (measured on a small convolution). Use --amp off (or "
                    "auto, which keeps fp32 on CPUs).")
        amp_dtype = (torch.bfloat16 if self.device.type == "cpu" or
                     torch.cuda.is_bf16_supported() else torch.float16)
        scaler = torch.amp.GradScaler(enabled=amp and amp_dtype == torch.float16)
        ema = weight_average(model, cfg.ema_decay)

        start_epoch, best, best_epoch, bad_epochs, history = 0, None, -1, 0, []
        if self.resume:
            state = torch.load(self.out / "last.pt", map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best = int(state["epoch"]), state["best"]
            best_epoch, bad_epochs = int(state["best_epoch"]), int(state["bad_epochs"])
            history = list(state["history"])
            self._log(f"resuming after epoch {start_epoch} of {cfg.epochs}")

        sign = -1.0 if cfg.monitor == "loss" else 1.0
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            seed = cfg.seed * 100_003 + epoch
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            perm = torch.randperm(len(train_index), generator=gen).numpy()
            order, rots = train_index[perm], train_rot[perm]
            order = order[self.dist.rank::self.dist.world_size][:per_rank]
            rots = rots[self.dist.rank::self.dist.world_size][:per_rank]
            net.train()
            losses: list[float] = []
            seen = 0
            with make_progress(enabled=self.progress and self.dist.is_main) as bar:
                task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps, rate="")
                for step in range(steps):
                    sl = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
                    idx = order[sl]
                    x = to_batch(train.pixels, idx, self.device, use_cl)
                    if self.train_size > cfg.img_size:
                        x = random_crop(x, cfg.img_size, gen, random=cfg.augment)
                    if cfg.augment:
                        forced = torch.from_numpy(rots[sl]) if cfg.balance == "rotate" else None
                        x = augment(x, gen, cfg.color_jitter, forced)
                        if use_cl:
                            x = x.contiguous(memory_format=torch.channels_last)
                    mask = torch.from_numpy(train.leaf_mask[idx]).to(self.device)
                    heads = torch.from_numpy(train.head_targets[idx]).to(self.device)
                    with (torch.autocast(self.device.type, dtype=amp_dtype) if amp
                          else nullcontext()):
                        outputs = net(x, heads) if cfg.head == "per-node" else net(x)
                        loss, _ = criterion(outputs, mask, heads)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    if ema is not None:
                        ema.update_parameters(model)
                    losses.append(float(loss.detach()))
                    seen += len(idx)
                    rate = seen * self.dist.world_size / (time.perf_counter() - t0)
                    bar.update(task, advance=1, rate=f"loss {np.mean(losses):.4f} "
                               f"{rate:.0f} img/s")
            train_time = time.perf_counter() - t0
            row: dict[str, float] = {
                "epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": float(np.mean(losses)),
                "train_images_per_s": seen * self.dist.world_size / train_time,
            }
            stop = False
            if self.dist.is_main:
                scored = model if ema is None else ema.module
                row.update(self._validate(scored, val, criterion, use_cl, amp))
                row["seconds"] = time.perf_counter() - t0
                history.append(row)
                value = row["val_loss" if cfg.monitor == "loss" else f"val_{cfg.monitor}"]
                improved = best is None or sign * value > sign * best
                if improved:
                    best, best_epoch, bad_epochs = value, epoch + 1, 0
                    save_model(self.out / "best.pt", scored, extra={
                        "epoch": epoch + 1, "metrics": row, "config": cfg.to_dict(),
                        "train_images": len(train), "val_images": len(val),
                        "data": str(self.data)})
                else:
                    bad_epochs += 1
                self._log(
                    f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val loss "
                    f"{row['val_loss']:.4f}, val acc {row['val_accuracy']:.4f}, val macro-F1 "
                    f"{row['val_macro_f1']:.4f}, {row['train_images_per_s']:.0f} img/s"
                    + (" [best]" if improved else ""))
                self._write_history(history)
                torch.save({
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best": best,
                    "best_epoch": best_epoch, "bad_epochs": bad_epochs, "history": history,
                } | ({} if ema is None else {"ema": ema.state_dict()}), self.out / "last.tmp")
                (self.out / "last.tmp").replace(self.out / "last.pt")
                stop = bool(cfg.patience and bad_epochs >= cfg.patience)
                if stop:
                    self._log(f"early stop: no improvement for {cfg.patience} epochs")
            if broadcast_flag(self.dist, stop):
                break
        barrier(self.dist)
        summary = {"best_epoch": best_epoch, "best": best, "monitor": cfg.monitor,
                   "history": history, "run": str(self.out)}
        if self.dist.is_main:
            self._plot(history)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _validate(self, model: TreeClassifier, val: Split, criterion: TreeLoss,
                  channels_last: bool, amp: bool) -> dict[str, float]:
        probs = predict_pixels(model, val.pixels, self.config.batch_size * 2, self.device,
                               channels_last, amp=amp and self.device.type == "cuda")
        logp = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0)))
        mask = torch.from_numpy(val.leaf_mask)
        flat_loss = -torch.logsumexp(logp.masked_fill(~mask, float("-inf")), dim=1).mean()
        return {
            "val_loss": float(flat_loss),
            "val_accuracy": tree_accuracy(probs, val.leaf_mask),
            "val_macro_f1": leaf_macro_f1(probs, val.leaf_mask),
        }

    def _write_history(self, history: list[dict[str, float]]) -> None:
        keys = list(history[0])
        with (self.out / "history.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    def _plot(self, history: list[dict[str, float]]) -> None:
        if plots.learning_curves(history, self.out / "learning_curves.png") is None:
            self._log("matplotlib is not installed: learning_curves.png skipped "
                      "(pip install 'leukotree\\[plot]')")


def train(data: str | Path, out: str | Path, config: TrainConfig, *, resume: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train a model on ``data`` into run folder ``out`` (see :class:`Trainer`)."""
    return Trainer(data, out, config, resume=resume, progress=progress).fit()
