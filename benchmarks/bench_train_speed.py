"""Training and inference speed against this machine's ceiling; prints JSON.

    python benchmarks/bench_train_speed.py [--models resnet18 ...] [--sizes 128 224]

For each model and size it measures, in the same run:

- the fp32 matrix-multiply ceiling (GFLOP/s) at the current thread count;
- training images/s of leukotree's engine step (augmentation from cached uint8
  pixels, forward, masked multi-head loss, backward, AdamW) and of a plain
  minimal PyTorch loop (random float input, cross-entropy) on the same backbone
  and batch; their ratio, and the fraction of the ceiling the engine reaches
  (model FLOPs from ``torch.utils.flop_counter``);
- the multi-head vs flat overhead, and channels_last vs contiguous.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from leukotree.losses import TreeLoss
from leukotree.models import ModelConfig, build_model
from leukotree.taxonomy import load_taxonomy
from leukotree.train import augment, to_batch


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
    with FlopCounterMode(display=False) as counter:
        model(x)["leaf_logp"].sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def time_steps(step, n_warm: int, n_steps: int) -> float:
    for _ in range(n_warm):
        step()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - start) / n_steps


def bench(model_name: str, size: int, head: str, batch: int, steps: int,
          channels_last: bool) -> dict[str, float]:
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

    def engine_step() -> None:
        idx = np.arange(state["i"] % 4 * batch, state["i"] % 4 * batch + batch)
        state["i"] += 1
        x = augment(to_batch(pixels, idx, torch.device("cpu"), channels_last), gen, 0.1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, _ = crit(model(x), mask[idx], heads[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    engine = time_steps(engine_step, 2, steps)
    flops = train_flops(model, torch.rand(batch, 3, size, size) * 255) / batch

    plain_model = build_model(tax, ModelConfig(head="flat", backbone=model_name, img_size=size))
    plain_net = torch.nn.Sequential(plain_model.backbone, plain_model.classifier)
    if channels_last:
        plain_net = plain_net.to(memory_format=torch.channels_last)
    plain_opt = torch.optim.AdamW(plain_net.parameters(), lr=1e-4)
    xs = torch.randn(batch, 3, size, size)
    if channels_last:
        xs = xs.contiguous(memory_format=torch.channels_last)
    ys = torch.randint(0, 7, (batch,))

    def plain_step() -> None:
        loss = torch.nn.functional.cross_entropy(plain_net(xs), ys)
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    plain = time_steps(plain_step, 2, steps)
    return {"engine_images_per_s": batch / engine, "plain_images_per_s": batch / plain,
            "engine_vs_plain": plain / engine, "train_gflop_per_image": flops / 1e9,
            "engine_gflop_per_s": flops * batch / engine / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "convnext_tiny",
                                                         "vit_small_patch16_224"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ceiling = matmul_ceiling()
    results = []
    for name in args.models:
        for size in args.sizes:
            row: dict[str, object] = {"model": name, "img_size": size, "batch": args.batch}
            for head in ("multihead", "flat"):
                for cl in (True, False):
                    r = bench(name, size, head, args.batch, args.steps, cl)
                    key = f"{head}_{'channels_last' if cl else 'contiguous'}"
                    row[key] = r
            mh = row["multihead_channels_last"]
            fl = row["flat_channels_last"]
            row["multihead_overhead"] = fl["engine_images_per_s"] / mh["engine_images_per_s"] - 1
            row["fraction_of_ceiling"] = mh["engine_gflop_per_s"] / ceiling
            results.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "matmul_gflop_per_s": ceiling,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
