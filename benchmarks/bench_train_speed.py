"""Training and inference speed against this machine's ceiling; prints JSON.

    python benchmarks/bench_train_speed.py [--models resnet18 ...] [--sizes 128 224]

For each model and size it measures, in the same run:

- the fp32 matrix-multiply ceiling (GFLOP/s) at the current thread count;
- training images/s of leukotree's engine step — the trainer's own
  :func:`~leukotree.engine.loop.make_batch` and :func:`~leukotree.engine.loop.train_step`
  on the ``cpu-fast`` recipe (random crop from a padded uint8 cache, augmentation,
  forward, masked multi-head loss, backward, AdamW, one-cycle schedule, grad scaler) —
  and of a plain
  minimal PyTorch loop (random float input, cross-entropy) on the same backbone
  and batch (the faster of its channels_last and contiguous forms); their ratio,
  and the fraction of the ceiling the engine reaches (training FLOPs: 3 x the
  forward FLOPs from ``torch.utils.flop_counter``);
- the multi-head vs flat overhead, and channels_last vs contiguous; all variants are
  timed interleaved (round-robin, median step time) so that their ratios are steady;
- on a GPU (``--device cuda``, or auto when one is present) the same with bf16
  autocast, against the GPU's bf16 matmul rate; ``--amp on`` runs the same code
  path on a CPU;
- with ``--data DIR``: a real ``leukotree train`` run (the ``cpu-fast`` recipe,
  ``--data-epochs`` epochs) on that folder, timing the first epoch (images decoded
  once into the pixel cache, then trained on) against the later ones (read from
  the cache only).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from resultfile import add_json_option, write_results
from torch.utils.flop_counter import FlopCounterMode

from leukotree.engine.config import resolve_config
from leukotree.engine.distributed import resolve_device
from leukotree.engine.loop import (
    BatchRecipe,
    Precision,
    TrainState,
    make_batch,
    make_optimizer,
    make_scheduler,
    train_step,
)
from leukotree.engine.trainer import train
from leukotree.models import ModelConfig, build_model
from leukotree.models.losses import TreeLoss
from leukotree.taxonomy import load_taxonomy


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int = 2048,
                   repeats: int = 10, trials: int = 5) -> float:
    """Best GFLOP/s of ``trials`` timings of ``repeats`` n x n matrix products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def train_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Training FLOPs of one batch: 3 x the forward FLOPs counted by torch.

    The backward of a convolution or matrix product costs twice its forward (the
    gradients of input and weight). Counting the backward directly is not used: the
    flop counter of torch 2.14 ignores ``groups`` in ``convolution_backward`` and
    overcounts depthwise convolutions (ConvNeXt) up to 90x (pytorch/pytorch#183405).
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return 3.0 * float(counter.get_total_flops())


def interleaved(steps: dict[str, Callable[[], None]], n_warm: int, rounds: int,
                device: torch.device) -> dict[str, float]:
    """Median seconds per step of each function, timed in round-robin order.

    Interleaving exposes every variant to the same machine state (clock, cache,
    other load), so their ratios are far steadier than back-to-back timings.
    """
    for step in steps.values():
        for _ in range(n_warm):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def autocast(device: torch.device, amp: bool) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def engine_step(model_name: str, size: int, head: str, batch: int, channels_last: bool,
                device: torch.device, amp: bool) -> tuple[Callable[[], None], torch.nn.Module]:
    """One step of leukotree's engine, with the trainer's own functions and the cpu-fast
    recipe: padded uint8 cache -> make_batch (crop, augment) -> train_step."""
    tax = load_taxonomy("leukemia7")
    cfg = resolve_config(preset="cpu-fast", overrides={
        "model": model_name, "head": head, "img_size": size, "batch_size": batch,
        "taxonomy": "leukemia7"})
    torch.manual_seed(0)
    model = build_model(tax, cfg.model_config()).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    cached = round(size * (1 + cfg.train_pad))
    pixels = np.random.default_rng(0).integers(0, 255, (batch * 4, cached, cached, 3), np.uint8)
    labels = [tax.leaves[i % 7] for i in range(len(pixels))]
    mask = torch.from_numpy(tax.leaf_mask(labels)).to(device)
    heads = torch.from_numpy(tax.encode_heads(labels)).to(device)
    crit = TreeLoss(tax, hierarchical=model.is_hierarchical, kind=cfg.loss,
                    label_smoothing=cfg.label_smoothing).to(device)
    precision = Precision(device, amp, torch.bfloat16)
    optimizer = make_optimizer(model, cfg)
    state = TrainState(model, optimizer, make_scheduler(optimizer, cfg, 10_000),
                       torch.amp.GradScaler(enabled=precision.needs_scaler))
    recipe = BatchRecipe(size, cfg.augment, cfg.color_jitter, channels_last, cfg.scale_jitter,
                         cfg.stain_jitter)
    gen = torch.Generator().manual_seed(0)  # CPU draws, as in the engine
    counter = {"i": 0}

    def step() -> None:
        idx = np.arange(counter["i"] % 4 * batch, counter["i"] % 4 * batch + batch)
        counter["i"] += 1
        x = make_batch(pixels, idx, gen, recipe, device)
        train_step(model, state, crit, x, mask[idx], heads[idx], precision)

    return step, model


def plain_step(model_name: str, size: int, batch: int, channels_last: bool,
               device: torch.device, amp: bool) -> Callable[[], None]:
    """A minimal PyTorch loop: the same backbone and linear layer, random floats, CE."""
    tax = load_taxonomy("leukemia7")
    plain_model = build_model(tax, ModelConfig(head="flat", backbone=model_name, img_size=size))
    backbone = plain_model.backbones()[0][1]
    net = torch.nn.Sequential(backbone, plain_model.classifier).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    xs = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, 7, (batch,), device=device)

    def step() -> None:
        with autocast(device, amp):
            loss = torch.nn.functional.cross_entropy(net(xs), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(model_name: str, size: int, batch: int, rounds: int, ceiling: float,
          device: torch.device, amp: bool) -> dict[str, object]:
    """Engine vs plain loop, multi-head vs flat, channels_last vs contiguous, interleaved."""
    on = {"device": device, "amp": amp}
    mh_cl, model = engine_step(model_name, size, "multihead", batch, True, **on)
    steps = {
        "engine_multihead_channels_last": mh_cl,
        "engine_multihead_contiguous": engine_step(model_name, size, "multihead", batch,
                                                   False, **on)[0],
        "engine_flat_channels_last": engine_step(model_name, size, "flat", batch, True,
                                                 **on)[0],
        "plain_channels_last": plain_step(model_name, size, batch, True, **on),
        "plain_contiguous": plain_step(model_name, size, batch, False, **on),
    }
    seconds = interleaved(steps, 2, rounds, device)
    flops = train_flops(model, torch.rand(batch, 3, size, size, device=device) * 255) / batch
    engine = seconds["engine_multihead_channels_last"]
    best_plain = min(seconds["plain_channels_last"], seconds["plain_contiguous"])
    return {
        "model": model_name, "img_size": size, "batch": batch, "rounds": rounds,
        "images_per_s": {name: batch / t for name, t in seconds.items()},
        "engine_vs_plain": best_plain / engine,
        "train_gflop_per_image": flops / 1e9,
        "engine_gflop_per_s": flops * batch / engine / 1e9,
        "fraction_of_ceiling": flops * batch / engine / 1e9 / ceiling,
        "multihead_overhead": engine / seconds["engine_flat_channels_last"] - 1,
        "channels_last_speedup": seconds["engine_multihead_contiguous"] / engine,
    }


def data_epochs(data: Path, taxonomy: str, epochs: int) -> dict[str, object]:
    """First epoch (decode + cache + train) vs later epochs (cache only) of a real run."""
    config = resolve_config(preset="cpu-fast", overrides={"taxonomy": taxonomy,
                                                          "epochs": epochs})
    with tempfile.TemporaryDirectory(prefix="leukotree-bench-") as tmp:
        start = time.perf_counter()
        summary = train(data, Path(tmp) / "run", config, progress=False)
        total = time.perf_counter() - start
    epoch_s = [row["seconds"] for row in summary["history"]]
    setup = total - sum(epoch_s)  # discovery, split, decoding into the cache, model build
    later = float(np.mean(epoch_s[1:])) if len(epoch_s) > 1 else float("nan")
    return {"data": str(data), "recipe": "cpu-fast", "img_size": config.img_size,
            "setup_and_decode_s": setup, "epoch_s": epoch_s,
            "first_epoch_s": setup + epoch_s[0], "later_epoch_s": later,
            "first_vs_later": (setup + epoch_s[0]) / later}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "convnext_tiny",
                                                         "vit_small_patch16_224"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda")
    parser.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                        help="bf16 autocast; auto: on for CUDA (the ceiling is then bf16)")
    parser.add_argument("--matmul-n", type=int, default=0,
                        help="matrix side of the ceiling (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--data", type=Path, help="folder for the first-vs-later epoch test")
    parser.add_argument("--taxonomy", default="pbc", help="taxonomy of --data")
    parser.add_argument("--data-epochs", type=int, default=3)
    add_json_option(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = args.amp == "on" or (args.amp == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if amp else torch.float32
    n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    ceiling = matmul_ceiling(device, dtype, n=n)
    results = []
    for name in args.models:
        for size in args.sizes:
            row = bench(name, size, args.batch, args.rounds, ceiling, device, amp)
            results.append(row)
            print(json.dumps(row), flush=True)
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "amp_bf16": amp,
        "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_gflop_per_s": ceiling,
        "results": results}
    if args.data:
        report["data_epochs"] = data_epochs(args.data, args.taxonomy, args.data_epochs)
    write_results(args, "train_speed", report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
