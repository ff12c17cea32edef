"""End-to-end prediction from JPEG files vs the model alone; prints JSON.

    python benchmarks/bench_predict.py [--data ../shared/data/pbc-dev] [--n 512]

In one run, for a randomly initialised model (speed does not depend on the
weights) it measures:

- ``model_only``: images/s of the model on uint8-range tensors already in memory;
- ``end_to_end``: images/s of ``leukotree.inference.predict_paths`` from files on
  disk (reduced JPEG decode in threads overlapped with the model, batching);
- their ratio (target: at least 0.9), for eager PyTorch (contiguous and
  channels_last), ``torch.compile`` (its one-off compile time reported apart) and
  ONNX Runtime;
- ``default``: the path ``leukotree predict`` takes by default, and the fastest
  end-to-end path measured here.

Without ``--data`` it writes ``--n`` synthetic 360x360 JPEG cells to a temporary
folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from resultfile import add_json_option, write_results

from leukotree.data.images import is_image_file
from leukotree.data.synth import generate
from leukotree.inference.export import export_onnx
from leukotree.inference.predictor import OnnxPredictor, TorchPredictor, predict_paths
from leukotree.models import ModelConfig, build_model
from leukotree.models.checkpoint import save_model
from leukotree.optional import available
from leukotree.taxonomy import load_taxonomy


def model_only(predictor, size: int, n: int, batch: int) -> float:
    """Images/s of ``predictor.predict`` on decoded uint8 pixels (no file reading)."""
    x = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    predictor.predict(x)
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        predictor.predict(x)
    return max(1, n // batch) * batch / (time.perf_counter() - start)


def end_to_end(predictor, paths: list[Path], batch: int) -> float:
    """Images/s of the whole path from files (``predict_paths``), after one warm-up batch."""
    predict_paths(predictor, paths[:batch], batch_size=batch, progress=False)
    start = time.perf_counter()
    predict_paths(predictor, paths, batch_size=batch, progress=False)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, help="folder of images (default: synthetic)")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    add_json_option(parser)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="leukotree-bench-"))
    if args.data:
        paths = sorted(p for p in args.data.rglob("*") if is_image_file(p))[:args.n]
    else:
        tax7 = load_taxonomy("leukemia7")
        per = max(1, args.n // (7 * 8))
        generate(tmp / "data", tax7, patients_per_class=8, cells_per_patient=per, size=360,
                 image_format="jpg", progress=False)
        paths = sorted((tmp / "data").rglob("*.jpg"))
    tax = load_taxonomy("leukemia7")
    model = build_model(tax, ModelConfig(head="multihead", backbone=args.model,
                                         img_size=args.size)).eval()
    results: dict[str, object] = {"images": len(paths), "model": args.model,
                                  "img_size": args.size, "batch": args.batch,
                                  "threads": torch.get_num_threads()}
    for name, cl in (("eager", False), ("channels_last", True)):
        predictor = TorchPredictor(model, channels_last=cl)
        alone = model_only(predictor, args.size, len(paths), args.batch)
        e2e = end_to_end(predictor, paths, args.batch)
        results[name] = {"model_only": alone, "end_to_end": e2e, "ratio": e2e / alone}
    model = model.to(memory_format=torch.contiguous_format)
    if not args.no_compile:
        start = time.perf_counter()
        compiled = TorchPredictor(torch.compile(model, dynamic=False))
        compiled.predict(np.zeros((args.batch, args.size, args.size, 3), np.uint8))
        compile_s = time.perf_counter() - start
        alone = model_only(compiled, args.size, len(paths), args.batch)
        e2e = end_to_end(compiled, paths, args.batch)
        results["torch_compile"] = {"model_only": alone, "end_to_end": e2e,
                                    "ratio": e2e / alone, "compile_s": compile_s}
    save_model(tmp / "best.pt", model)
    onnx_model = OnnxPredictor(export_onnx(tmp / "best.pt", tmp / "m.onnx"))
    alone = model_only(onnx_model, args.size, len(paths), args.batch)
    e2e = end_to_end(onnx_model, paths, args.batch)
    results["onnxruntime"] = {"model_only": alone, "end_to_end": e2e, "ratio": e2e / alone}
    paths_measured = [k for k in ("eager", "channels_last", "torch_compile", "onnxruntime")
                      if k in results]
    results["fastest_end_to_end"] = max(paths_measured,
                                        key=lambda k: results[k]["end_to_end"])
    results["default"] = "onnxruntime" if available("onnx", "onnxruntime") else "eager"
    write_results(args, "predict", results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
