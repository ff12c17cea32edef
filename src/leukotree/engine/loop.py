"""The reusable parts of training: precision and threads, optimiser and schedule, the
training state, one step, one epoch, and validation.

:class:`~leukotree.engine.trainer.Trainer` orchestrates these for a run folder; the
speed benchmark (``benchmarks/bench_train_speed.py``) times the same
:func:`make_batch` and :func:`train_step`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score

from leukotree.data.discover import Sample
from leukotree.data.images import to_tensor
from leukotree.engine.augment import augment, random_crop, random_zoom_crop, stain_jitter
from leukotree.engine.config import TrainConfig
from leukotree.engine.distributed import DistInfo
from leukotree.errors import LeukotreeError
from leukotree.models.losses import TreeLoss
from leukotree.patients.models import in_focus
from leukotree.progress import make_progress
from leukotree.taxonomy import Taxonomy


# ----------------------------------------------------------------- threads and precision
@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` CPU threads inside the block (0: leave as is); restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


@dataclass(frozen=True)
class Precision:
    """Autocast on or off, and its type (bf16 on CPUs and bf16-capable GPUs, else fp16)."""

    device: torch.device
    enabled: bool = False
    dtype: torch.dtype = torch.bfloat16

    def autocast(self) -> AbstractContextManager:
        if not self.enabled:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """``auto`` (on for CUDA), ``on`` or ``off``; ``on`` on a CPU where bf16 is measured
    slower than fp32 is refused."""
    enabled = amp == "on" or (amp == "auto" and device.type == "cuda")
    if enabled and device.type == "cpu":
        speedup = cpu_bf16_speedup()
        if speedup < 0.8:
            raise LeukotreeError(
                f"--amp on asks for bf16 autocast, but on this CPU it runs {1 / speedup:.1f}x "
                "slower than fp32 (measured on a small convolution). Use --amp off (or "
                "auto, which keeps fp32 on CPUs).")
    dtype = (torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported()
             else torch.float16)
    return Precision(device, enabled, dtype)


# ----------------------------------------------------------------- optimisation
def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Adam or SGD (Nesterov); no weight decay on biases and norm weights."""
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


def _lr_lambda(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
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


def make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig, steps: int,
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: one-cycle, or linear warm-up then cosine (or constant)."""
    if config.schedule == "onecycle":
        # At least 4 steps and a warm-up of at least 2 of them: OneCycleLR divides by
        # the length of each phase (zero for a 1-epoch run of 1 step otherwise).
        total = max(4, config.epochs * steps)
        pct = min(0.5, max(0.05, config.warmup_epochs / max(1, config.epochs), 2 / total))
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total,
                                                   pct_start=pct)
    return torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, steps))


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


@dataclass
class TrainState:
    """Everything a step changes and ``--resume`` restores."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None = None
    epoch: int = 0
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # early stopping ended the run before its last epoch
    world_size: int = 1  # processes that trained it (its steps per epoch depend on it)

    @property
    def scored(self) -> torch.nn.Module:
        """The model that is validated and saved: the weight average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch, "best": self.best, "best_epoch": self.best_epoch,
                 "bad_epochs": self.bad_epochs, "history": self.history,
                 "stopped": self.stopped, "world_size": self.world_size}
        return state | ({} if self.ema is None else {"ema": self.ema.state_dict()})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best = int(state["epoch"]), state["best"]
        self.best_epoch, self.bad_epochs = int(state["best_epoch"]), int(state["bad_epochs"])
        self.history = list(state["history"])
        self.stopped = bool(state.get("stopped", False))
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world_size:
            raise LeukotreeError(
                f"This run was trained by {saved_world} process(es) and is resumed by "
                f"{self.world_size}; its schedule counts steps per process, so resume it with "
                f"the same number of processes (torchrun --nproc_per_node {saved_world}).")


# ----------------------------------------------------------------- data of one side
@dataclass
class Split:
    """Images, pixels and targets of one side of a split."""

    samples: list[Sample]
    pixels: np.ndarray  # (N, S, S, 3) uint8, possibly memory-mapped
    leaf_mask: np.ndarray  # (N, n_leaves) bool
    head_targets: np.ndarray  # (N, n_inner) int64, -1 = ignore
    cell_mask: np.ndarray | None = None  # (N, n_cell_types) bool; all False: no cell type
    diagnosis_weight: np.ndarray | None = None  # (N,) weight of the diagnosis loss; None: 1

    def __len__(self) -> int:
        return len(self.samples)


def make_split(samples: list[Sample], pixels: np.ndarray, taxonomy: Taxonomy,
               cell_taxonomy: Taxonomy | None = None,
               focus: tuple[tuple[str, ...], float] | None = None) -> Split:
    """``focus``: ``(cell types, weight)``: the diagnosis loss of a cell whose cell type is
    known and lies under none of those types is multiplied by ``weight``."""
    labels = [s.label for s in samples]
    cell_mask = None
    weight = None
    if cell_taxonomy is not None:
        cell_mask = np.zeros((len(samples), len(cell_taxonomy.leaves)), dtype=bool)
        known = [i for i, s in enumerate(samples) if s.cell_label is not None]
        if known:
            cell_mask[known] = cell_taxonomy.leaf_mask([samples[i].cell_label for i in known])
        if focus is not None and focus[1] != 1:
            types, other = focus
            weight = np.array([1.0 if s.cell_label is None
                               or in_focus(cell_taxonomy, types, s.cell_label) else other
                               for s in samples], dtype=np.float32)
    return Split(samples, pixels, taxonomy.leaf_mask(labels), taxonomy.encode_heads(labels),
                 cell_mask, weight)


# ----------------------------------------------------------------- the step
@dataclass(frozen=True)
class BatchRecipe:
    """How cached uint8 pixels become a training batch."""

    img_size: int
    augment: bool = True
    jitter: float = 0.1
    channels_last: bool = False
    scale_jitter: float = 0.0
    stain_jitter: float = 0.0


def make_batch(pixels: np.ndarray, idx: np.ndarray, gen: torch.Generator, recipe: BatchRecipe,
               device: torch.device, rotations: np.ndarray | None = None) -> torch.Tensor:
    """Rows ``idx`` of ``pixels`` as a float batch: random crop to ``img_size`` (when the
    cache is padded; at a random magnification with ``scale_jitter``), then flips,
    rotations (plus forced ``rotations``), colour jitter and HED stain jitter."""
    x = to_tensor(pixels[idx], device, channels_last=recipe.channels_last)
    if recipe.augment and recipe.scale_jitter > 0:
        x = random_zoom_crop(x, recipe.img_size, gen, recipe.scale_jitter)
    elif pixels.shape[1] > recipe.img_size:
        x = random_crop(x, recipe.img_size, gen, random=recipe.augment)
    if recipe.augment:
        forced = None if rotations is None else torch.from_numpy(rotations)
        x = augment(x, gen, recipe.jitter, forced)
        if recipe.stain_jitter > 0:
            x = stain_jitter(x, gen, recipe.stain_jitter)
        if recipe.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_step(net: torch.nn.Module, state: TrainState, criterion: TreeLoss, x: torch.Tensor,
               leaf_mask: torch.Tensor, head_targets: torch.Tensor, precision: Precision,
               cell_mask: torch.Tensor | None = None,
               diagnosis_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Forward, tree loss (plus the cell-type loss with ``cell_mask``; each image's
    diagnosis loss weighted by ``diagnosis_weight``), backward, optimiser and schedule
    step, weight average.

    ``net`` is the model or its DDP wrapper; returns the detached loss.
    """
    with precision.autocast():
        loss, _ = criterion(net(x, head_targets), leaf_mask, head_targets, cell_mask,
                            diagnosis_weight)
    if not torch.isfinite(loss):
        raise LeukotreeError(
            f"The training loss became {float(loss.detach())} at epoch {state.epoch + 1}; the "
            "learning rate is probably too high for this model (try a lower --lr). Nothing of "
            "this step was saved.")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update_parameters(state.model)
    return loss.detach()


@dataclass(frozen=True)
class EpochPlan:
    """Which cached images an epoch visits, in which order, with which forced rotation."""

    index: np.ndarray
    rotations: np.ndarray
    batch_size: int
    dist: DistInfo = field(default_factory=DistInfo)

    @property
    def per_rank(self) -> int:
        return len(self.index) // self.dist.world_size

    @property
    def steps(self) -> int:
        """Full batches per rank (the last partial batch is dropped); at least one."""
        return max(1, self.per_rank // self.batch_size)

    def order(self, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """This rank's shuffled images and rotations (the shuffle drawn from ``gen``)."""
        perm = torch.randperm(len(self.index), generator=gen).numpy()
        order, rots = self.index[perm], self.rotations[perm]
        rank, world = self.dist.rank, self.dist.world_size
        return order[rank::world][:self.per_rank], rots[rank::world][:self.per_rank]


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one epoch on one rank; the global torch seed (dropout) follows
    it. Ranks draw different augmentations (rank 0 draws what a single process would)."""
    epoch_seed = seed * 100_003 + epoch + rank * 7_919_000_003
    torch.manual_seed(epoch_seed)
    return torch.Generator().manual_seed(epoch_seed)


def train_one_epoch(net: torch.nn.Module, state: TrainState, criterion: TreeLoss, train: Split,
                    plan: EpochPlan, recipe: BatchRecipe, precision: Precision, *,
                    seed: int, epochs: int, force_rotations: bool = False,
                    progress: bool = True) -> dict[str, float]:
    """One pass over ``plan``; returns the epoch's row of the history (no validation)."""
    device = precision.device
    t0 = time.perf_counter()
    # The shuffle (which image goes to which rank) is drawn alike on every rank; the
    # augmentation and dropout draws then differ between ranks.
    gen = epoch_generator(seed, state.epoch)
    order, rots = plan.order(gen)
    if plan.dist.rank:
        gen = epoch_generator(seed, state.epoch, plan.dist.rank)
    net.train()
    losses: list[float] = []
    seen = 0
    with make_progress(enabled=progress) as bar:
        task = bar.add_task(f"epoch {state.epoch + 1}/{epochs}", total=plan.steps, rate="")
        for step in range(plan.steps):
            sl = slice(step * plan.batch_size, (step + 1) * plan.batch_size)
            idx = order[sl]
            x = make_batch(train.pixels, idx, gen, recipe, device,
                           rots[sl] if force_rotations else None)
            mask = torch.from_numpy(train.leaf_mask[idx]).to(device)
            heads = torch.from_numpy(train.head_targets[idx]).to(device)
            cells = (None if train.cell_mask is None
                     else torch.from_numpy(train.cell_mask[idx]).to(device))
            weight = (None if train.diagnosis_weight is None
                      else torch.from_numpy(train.diagnosis_weight[idx]).to(device))
            losses.append(float(train_step(net, state, criterion, x, mask, heads, precision,
                                           cells, weight)))
            seen += len(idx)
            rate = seen * plan.dist.world_size / (time.perf_counter() - t0)
            bar.update(task, advance=1, rate=f"loss {np.mean(losses):.4f} {rate:.0f} img/s")
    seconds = time.perf_counter() - t0
    return {"epoch": state.epoch + 1, "lr": state.optimizer.param_groups[0]["lr"],
            "train_loss": float(np.mean(losses)),
            "train_images_per_s": seen * plan.dist.world_size / seconds}


# ----------------------------------------------------------------- validation
@torch.no_grad()
def predict_outputs(model: torch.nn.Module, pixels: np.ndarray, batch_size: int,
                    device: torch.device, channels_last: bool = False,
                    precision: Precision | None = None, size: int | None = None,
                    raw: bool = False) -> dict[str, np.ndarray]:
    """``leaf_probs``, ``features`` (and ``stage_features`` when the model gives them) and
    (with a cell-type head) ``cell_probs`` of uint8 pixels, in batches; ``size`` takes the
    central crop of that side first (the view prediction has of a padded training
    cache); ``raw``: ``leaf_probs`` before the model's fitted calibration, if any."""
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(pixels), batch_size):
        with precision.autocast() if precision is not None else nullcontext():
            x = to_tensor(pixels[start:start + batch_size], device, channels_last=channels_last)
            if size is not None and x.shape[-1] > size:
                x = random_crop(x, size, torch.Generator(), random=False)
            result = model(x)
        leaf = result["leaf_logp_raw" if raw and "leaf_logp_raw" in result else "leaf_logp"]
        out.setdefault("leaf_probs", []).append(leaf.float().exp().cpu().numpy())
        for key in ("features", "stage_features"):
            if key in result:
                out.setdefault(key, []).append(result[key].float().cpu().numpy())
        if "cell_logp" in result:
            out.setdefault("cell_probs", []).append(
                result["cell_logp"].float().exp().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def predict_pixels(model: torch.nn.Module, pixels: np.ndarray, batch_size: int,
                   device: torch.device, channels_last: bool = False,
                   precision: Precision | None = None) -> np.ndarray:
    """Leaf probabilities ``(N, n_leaves)`` for uint8 pixels, in batches (under
    ``precision``'s autocast when given)."""
    if len(pixels) == 0:
        return np.zeros((0, 0))
    return predict_outputs(model, pixels, batch_size, device, channels_last,
                           precision)["leaf_probs"]


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


def validate(model: torch.nn.Module, val: Split, batch_size: int, precision: Precision,
             channels_last: bool = False) -> dict[str, float]:
    """Validation loss (``-log P(label)``, the label a leaf or an inner node), tree
    accuracy and leaf macro F1."""
    device = precision.device
    probs = predict_pixels(model, val.pixels, batch_size, device, channels_last,
                           precision if device.type == "cuda" else None)
    logp = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0)))
    mask = torch.from_numpy(val.leaf_mask)
    flat_loss = -torch.logsumexp(logp.masked_fill(~mask, float("-inf")), dim=1).mean()
    return {
        "val_loss": float(flat_loss),
        "val_accuracy": tree_accuracy(probs, val.leaf_mask),
        "val_macro_f1": leaf_macro_f1(probs, val.leaf_mask),
    }
