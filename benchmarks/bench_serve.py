"""The web app under load: ``leukotree serve`` with the ONNX engine; prints JSON.

    python benchmarks/bench_serve.py [--run RUN] [--data FOLDER] [--cells 100] \
        [--cases 5] [--concurrent 20]

It starts ``leukotree serve`` as a separate process on a free local port (uvicorn, as a
lab would run it) with a fresh store, and measures over HTTP:

- ``sequential``: ``--cases`` cases of ``--cells`` cells submitted one after another;
  latency of each from the start of the upload to ``status: done`` (p50, p95) and
  cases per minute;
- ``health_while_busy``: the latency of ``GET /api/health`` polled every 50 ms while
  a case of ``--cells`` cells is being classified (the work runs off the request
  thread, so this should stay in milliseconds);
- ``concurrent``: ``--concurrent`` cases uploaded at once from as many threads; every
  case must end ``done`` with one result per uploaded cell (``lost_cells`` counts
  any missing, ``failed_cases`` any case not done).

Without ``--run`` the served model is a randomly initialised multi-head ResNet-18 on
the leukemia7 tree (speed does not depend on the weights); without ``--data`` the
cells are synthetic 360x360 JPEGs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from resultfile import add_json_option, write_results

from leukotree.data.images import is_image_file
from leukotree.data.synth import generate
from leukotree.models import ModelConfig, build_model
from leukotree.models.checkpoint import save_model
from leukotree.taxonomy import load_taxonomy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p95 and max of ``values`` (seconds), in milliseconds."""
    a = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "max_ms": float(a.max()), "n": len(values)}


def upload(client: httpx.Client, files: list[Path], patient: str) -> str:
    parts = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in files]
    r = client.post("/api/cases", files=parts, data={"patient": patient})
    r.raise_for_status()
    return r.json()["id"]


def wait_done(client: httpx.Client, case_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        case = client.get(f"/api/cases/{case_id}").json()
        if case["status"] in {"done", "failed"}:
            return case
        time.sleep(0.05)
    raise TimeoutError(f"case {case_id} not done after {timeout} s")


def run_case(client: httpx.Client, files: list[Path], patient: str) -> tuple[float, dict]:
    start = time.perf_counter()
    case = wait_done(client, upload(client, files, patient))
    return time.perf_counter() - start, case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="run folder, .pt, .onnx or cv folder to "
                        "serve (default: a random model)")
    parser.add_argument("--data", type=Path, help="folder of cell images (default: synthetic)")
    parser.add_argument("--cells", type=int, default=100, help="cells per case")
    parser.add_argument("--cases", type=int, default=5, help="cases for the sequential run")
    parser.add_argument("--concurrent", type=int, default=20, help="cases submitted at once")
    parser.add_argument("--size", type=int, default=96, help="input size of the random model")
    parser.add_argument("--backbone", default="resnet18", help="backbone of the random model")
    parser.add_argument("--engine", default="onnx")
    add_json_option(parser)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="leukotree-bench-serve-"))
    if args.data:
        cells = sorted(p for p in args.data.rglob("*") if is_image_file(p))[:args.cells]
    else:
        generate(tmp / "data", load_taxonomy("leukemia7"), patients_per_class=1,
                 cells_per_patient=-(-args.cells // 7), size=360, image_format="jpg",
                 progress=False)
        cells = sorted((tmp / "data").rglob("*.jpg"))[:args.cells]
    run = args.run
    if run is None:
        model = build_model(load_taxonomy("leukemia7"),
                            ModelConfig(head="multihead", backbone=args.backbone,
                                        img_size=args.size)).eval()
        run = tmp / "model.pt"
        save_model(run, model)

    port = free_port()
    env = {**os.environ, "LEUKOTREE_TOKEN": ""}
    server = subprocess.Popen(
        [sys.executable, "-m", "leukotree", "serve", str(run), "--engine", args.engine,
         "--store", str(tmp / "store"), "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    results: dict[str, object] = {"cells_per_case": len(cells), "engine": args.engine,
                                  "model": str(args.run or f"random {args.backbone} multihead"),
                                  "cpu_threads": os.cpu_count()}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            start = time.monotonic()
            while True:
                try:
                    client.get("/api/health").raise_for_status()
                    break
                except httpx.TransportError:
                    if server.poll() is not None or time.monotonic() - start > 300:
                        raise RuntimeError(f"leukotree serve did not start:\n"
                                           f"{server.stderr.read()}") from None
                    time.sleep(0.2)
            results["startup_s"] = time.monotonic() - start
            run_case(client, cells[:8], "warm-up")

            latencies = [run_case(client, cells, f"seq-{i}")[0] for i in range(args.cases)]
            results["sequential"] = {**percentiles(latencies),
                                     "cases_per_minute": 60 * len(latencies) / sum(latencies),
                                     "cells_per_second": len(cells) * len(latencies)
                                     / sum(latencies)}

            case_id = upload(client, cells, "busy")
            health: list[float] = []
            while client.get(f"/api/cases/{case_id}").json()["status"] not in {"done",
                                                                                "failed"}:
                t = time.perf_counter()
                client.get("/api/health").raise_for_status()
                health.append(time.perf_counter() - t)
                time.sleep(0.05)
            results["health_while_busy"] = percentiles(health or [0.0])

            outcome: list[tuple[float, dict]] = []
            lock = threading.Lock()

            def one(i: int) -> None:
                with httpx.Client(base_url=client.base_url, timeout=900) as c:
                    got = run_case(c, cells, f"concurrent-{i}")
                with lock:
                    outcome.append(got)

            start_all = time.perf_counter()
            threads = [threading.Thread(target=one, args=(i,)) for i in range(args.concurrent)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start_all
            lost = sum(len(cells) - sum(1 for c in case.get("cells", [])
                                        if c.get("label") or c.get("error"))
                       for _, case in outcome) + len(cells) * (args.concurrent - len(outcome))
            results["concurrent"] = {
                "cases": args.concurrent, "finished": len(outcome),
                "failed_cases": sum(case["status"] != "done" for _, case in outcome),
                "lost_cells": lost, "wall_s": wall,
                "cases_per_minute": 60 * len(outcome) / wall,
                "latency": percentiles([s for s, _ in outcome]),
                "mean_latency_s": statistics.mean(s for s, _ in outcome)}
    finally:
        server.terminate()
        server.wait(timeout=30)
    write_results(args, "serve", results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
