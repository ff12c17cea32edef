"""Training and inference speed against this machine's ceiling; prints JSON.

    python benchmarks/bench_train_speed.py [--models resnet18 ...] [--sizes 128 224]

For each model and size it measures, in the same run:

- the fp32 matrix-multiply ceiling (GFLOP/s) at the current thread count;
- training images/s of leukotree's engine step (augmentation from cached uint8
  pixels, forward, masked multi-head loss, backward, AdamW) and of a plain
  minimal PyTorch loop (random float input, cross-entropy) on the same backbone
  and batch (the faster of its channels_last and contiguous forms); their ratio,
  and the fraction of the ceiling the engine reaches (training FLOPs: 3 x the
  forward FLOPs from ``torch.utils.flop_counter``);
- the multi-head vs flat overhead, and channels_last vs contiguous; all variants are
  timed interleaved (round-robin, median step time) so that their ratios are steady;
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
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from leukotree.config import resolve_config
from leukotree.losses import TreeLoss
from leukotree.models import ModelConfig, build_model
from leukotree.taxonomy import load_taxonomy
from leukotree.train import augment, to_batch, train


def matmul_ceiling(n: int = 2048, repeats: int = 10, trials: int = 5) -> float:
    """Best fp32 GFLOP/s of ``trials`` timings of ``repeats`` n x n matrix products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
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
                ) -> dict[str, float]:
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
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def engine_step(model_name: str, size: int, head: str, batch: int, channels_last: bool,
                ) -> tuple[Callable[[], None], torch.nn.Module]:
    """One step of leukotree's engine: cached uint8 pixels -> augment -> tree loss -> AdamW."""
    tax = load_taxonomy("leukemia7")
    torch.manual_seed(0)
    model = build_model(tax, ModelConfig(head=head, backbone=model_name, img_size=size))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    pixels = np.random.default_rng(0).integers(0, 255, (batch * 4, size, size, 3), np.uint8)
    labels = [tax.leaves[i % 7] for i in range(len(pixels))]
    mask = torch.from_numpy(tax.leaf_mask(labels))
    heads = torch.from_numpy(tax.encode_heads(labels))
    crit = TreeLoss(tax, head)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    state = {"i": 0}

    def step() -> None:
        idx = np.arange(state["i"] % 4 * batch, state["i"] % 4 * batch + batch)
        state["i"] += 1
        x = augment(to_batch(pixels, idx, torch.device("cpu"), channels_last), gen, 0.1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, _ = crit(model(x), mask[idx], heads[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model


def plain_step(model_name: str, size: int, batch: int, channels_last: bool,
               ) -> Callable[[], None]:
    """A minimal PyTorch loop: the same backbone and linear layer, random floats, CE."""
    tax = load_taxonomy("leukemia7")
    plain_model = build_model(tax, ModelConfig(head="flat", backbone=model_name, img_size=size))
    net = torch.nn.Sequential(plain_model.backbone, plain_model.classifier)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    xs = torch.randn(batch, 3, size, size)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, 7, (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(net(xs), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench(model_name: str, size: int, batch: int, rounds: int, ceiling: float,
          ) -> dict[str, object]:
    """Engine vs plain loop, multi-head vs flat, channels_last vs contiguous, interleaved."""
    mh_cl, model = engine_step(model_name, size, "multihead", batch, True)
    steps = {
        "engine_multihead_channels_last": mh_cl,
        "engine_multihead_contiguous": engine_step(model_name, size, "multihead", batch,
                                                   False)[0],
        "engine_flat_channels_last": engine_step(model_name, size, "flat", batch, True)[0],
        "plain_channels_last": plain_step(model_name, size, batch, True),
        "plain_contiguous": plain_step(model_name, size, batch, False),
    }
    seconds = interleaved(steps, 2, rounds)
    flops = train_flops(model, torch.rand(batch, 3, size, size) * 255) / batch
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
    parser.add_argument("--data", type=Path, help="folder for the first-vs-later epoch test")
    parser.add_argument("--taxonomy", default="pbc", help="taxonomy of --data")
    parser.add_argument("--data-epochs", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling()
    results = []
    for name in args.models:
        for size in args.sizes:
            row = bench(name, size, args.batch, args.rounds, ceiling)
            results.append(row)
            print(json.dumps(row), flush=True)
    report: dict[str, object] = {"threads": torch.get_num_threads(),
                                 "matmul_gflop_per_s": ceiling, "results": results}
    if args.data:
        report["data_epochs"] = data_epochs(args.data, args.taxonomy, args.data_epochs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
