"""The guarantees measured (conformal answers on the tree, a patient miss rate): prints JSON
and writes OUT/guarantees.md.

    python benchmarks/bench_guarantees.py --out bench-out/guarantees \
        [--pbc ../shared/data/pbc-dev] [--jhh ../shared/data/apl-aml-discovery] \
        [--run RUN] [--coverage 0.95] [--sizes 100 200] [--draws 5] [--cv CV]

1. The ``cpu-fast`` model trained on 80% of the PBC images (the split of
   ``bench_cross_lab.py``; ``--run`` reuses a run trained on ``OUT/pbc-dev.csv``, e.g.
   ``bench-out/cross-lab/run``) with conformal answers at ``--coverage`` fitted on its own
   validation split (a run without them gets them from ``leukotree calibrate`` on that
   split, which fits what ``train --coverage`` fits).
2. PBC held out (same lab): the answers' coverage with its 95% interval, the share of
   leaf answers, the mean depth and number of leaves of the answers.
3. The Johns Hopkins cells of the same types (another lab), on the half of the patients
   that ``bench_cross_lab.py`` tests on: the coverage with the PBC answers (the domain-shift
   alarm says the guarantee does not transfer), then after ``leukotree calibrate`` on
   ``n`` random labelled cells of the OTHER half's patients, for each ``n`` of ``--sizes``
   and ``--draws`` random draws of those cells: coverage, mean depth, leaf share, flagged
   share and leaf ECE on the tested half, and the share of draws reaching the target.
4. APL vs other AML (``--cv``: a ``leukotree cv`` folder of ``examples/apl-aml.yaml`` run
   with ``--patient-miss-rate A --confidence C``): the observed out-of-fold miss rate
   of the pooled calls (each fold's threshold chosen on its own training patients) with
   its exact binomial interval, against the stated ``A``; and the smallest miss rate the
   22 APL patients of the Discovery cohort can promise at ``C``
   (:func:`leukotree.patients.guarantee.achievable_miss_rate`).
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
from bench_cross_lab import (
    first_half,
    heldout_half,
    jhh_manifests,
    lab_arguments,
    pbc_split,
    write_manifest,
)
from resultfile import add_json_option, guarantees_table, write_results

from leukotree.calibrate.run import calibrate_run
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.evaluation.evaluate import EvalSettings, evaluate
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.patients.guarantee import achievable_miss_rate
from leukotree.rundir import RunDir


def with_answers(run: Path, coverage: float, out: Path) -> Path:
    """``run`` itself when it states conformal answers at ``coverage``, else a copy
    calibrated on its own validation split with answers at ``coverage``."""
    own = load(run).predictor("torch").conformal
    if own is not None and abs(own.alpha - (1 - coverage)) < 1e-9:
        return run
    target = out / f"run-coverage-{coverage:g}"
    if (target / "best.pt").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    val = RunDir(run).read_split("val")
    manifest = write_manifest(out / "run-val.csv", [
        {"path": str(Path(r["path"]).resolve()), "label": r["label"],
         "patient": r.get("patient") or Path(r["path"]).name} for r in val])
    calibrate_run(run, manifest, target, coverage=coverage, progress=False)
    return target


def answers(run: Path, data: Path, out: Path) -> dict:
    """``evaluate``'s conformal section, flagged share and leaf ECE of ``run`` on ``data``
    (an evaluation already in ``out``, newer than the run's model, is read again: the
    script resumes)."""
    done, model = out / "metrics.json", RunDir(run).best
    if done.exists() and done.stat().st_mtime > model.stat().st_mtime:
        metrics = json.loads(done.read_text())
    else:
        metrics = evaluate(run, data, out, InferenceOptions(), EvalSettings(progress=False),
                           patients="auto")
    section = metrics["conformal"]
    ood = metrics.get("ood") or {}
    return {"n": section["n"], "coverage": section["coverage"],
            "coverage_ci95": section["coverage_ci95"], "ci_method": section["ci_method"],
            "target_coverage": section["target_coverage"], "fitted_on": section["fitted_on"],
            "leaf_share": section["leaf_share"], "mean_depth": section["mean_depth"],
            "mean_leaves": section["mean_leaves"], "accuracy": metrics["accuracy"],
            "ece": metrics.get("calibration", {}).get("leaves", {}).get("ece"),
            "flagged_rate": ood.get("rate"), "domain_shift_alarm": bool(ood.get("domain_shift")),
            "note": section.get("note"),
            "per_class": {k: round(v["coverage"], 4) for k, v in section["per_class"].items()}}


def recalibrated(run: Path, mapped: Path, pool: set[str], held: Path, out: Path,
                 sizes: list[int], draws: int, coverage: float) -> dict:
    """For each size and draw: ``calibrate`` on that many random labelled cells of the
    ``pool`` patients, scored on ``held``; the draws' results and their summary."""
    with mapped.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient"] in pool]
    result: dict[str, dict] = {}
    for n in sizes:
        runs = []
        for d in range(draws):
            pick = np.random.default_rng(1000 * n + d).choice(len(rows), n, replace=False)
            sample = write_manifest(out / f"jhh-sample-{n}-{d}.csv",
                                    [rows[i] for i in sorted(pick)])
            target = out / f"calibrated-{n}-{d}"
            if not (target / "best.pt").exists():
                shutil.rmtree(target, ignore_errors=True)
                calibrate_run(run, sample, target, coverage=coverage, progress=False)
            runs.append(answers(target, held, out / f"eval-jhh-calibrated-{n}-{d}"))
        cov = np.array([r["coverage"] for r in runs])
        result[str(n)] = {
            "draws": runs, "coverage_mean": float(cov.mean()), "coverage_min": float(cov.min()),
            "coverage_max": float(cov.max()),
            "share_of_draws_on_target": float((cov >= coverage).mean()),
            "mean_depth_mean": float(np.mean([r["mean_depth"] for r in runs])),
            "leaf_share_mean": float(np.mean([r["leaf_share"] for r in runs])),
            "flagged_rate_mean": float(np.mean([r["flagged_rate"] or 0 for r in runs])),
            "ece_mean": float(np.mean([r["ece"] for r in runs if r["ece"] is not None]))}
    return result


def patient_promise(cv: Path, manifest: Path, positive: str) -> dict:
    """The pooled out-of-fold miss rate of a cv folder whose patient model promises one,
    and the smallest rate the cohort's positive patients support at its confidence."""
    summary = json.loads((cv / "summary.json").read_text())
    pooled = summary["patient_level"]
    if not pooled or "miss_rate" not in pooled[0]:
        raise SystemExit(f"{cv} has no patient miss rate: run leukotree cv with "
                         "--patient-miss-rate A --confidence C")
    with manifest.open(newline="") as handle:
        n_pos = len({r["patient"] for r in csv.DictReader(handle) if r["label"] == positive})
    repeats = [p["miss_rate"] | {"auroc": p.get("auroc"), "auroc_ci95": p.get("auroc_ci95"),
                                 "accuracy": p.get("accuracy")} for p in pooled]
    confidence = repeats[0]["confidence"]
    folds = summary["config"].get("folds") or 5
    return {"cv": str(cv), "positive": positive, "repeats": repeats,
            "cohort_positive_patients": n_pos,
            "achievable_miss_rate_cohort": achievable_miss_rate(n_pos, confidence),
            "achievable_miss_rate_per_fold": achievable_miss_rate(
                n_pos - -(-n_pos // folds), confidence)}


def main() -> None:
    parser = lab_arguments(__doc__)
    parser.add_argument("--run", type=Path, help="a run already trained on OUT/pbc-dev.csv")
    parser.add_argument("--coverage", type=float, default=0.95)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--cv", type=Path, help="a leukotree cv folder of examples/apl-aml.yaml "
                                                "with --patient-miss-rate (else skipped)")
    parser.add_argument("--positive", default="APL")
    add_json_option(parser)
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    import yaml

    dev, test = pbc_split(args.pbc, 0.2, args.out)
    mapped, _ = jhh_manifests(args.jhh, args.out)
    result: dict[str, object] = {"coverage": args.coverage, "sizes": args.sizes,
                                 "draws": args.draws}
    run = args.run
    if run is None:
        run = args.out / "run"
        overrides = {"taxonomy": "pbc", "patients": "none", "coverage": args.coverage}
        overrides |= {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
        if not (run / "best.pt").exists():
            start = time.perf_counter()
            train(dev, run, resolve_config(preset=args.preset, overrides=overrides))
            result["train_minutes"] = (time.perf_counter() - start) / 60
    run = with_answers(run.resolve(), args.coverage, args.out)
    result["run"] = str(run)
    result["pbc_heldout"] = answers(run, test, args.out / "eval-pbc")
    pool = first_half(mapped)
    held = heldout_half(mapped, pool, args.out)
    result["jhh_before"] = answers(run, held, args.out / "eval-jhh")
    result["jhh_after"] = recalibrated(run, mapped, pool, held, args.out, args.sizes,
                                       args.draws, args.coverage)
    if args.cv is not None:
        result["apl"] = patient_promise(args.cv, args.jhh / "manifest.csv", args.positive)
    (args.out / "guarantees.json").write_text(json.dumps(result, indent=2))
    (args.out / "guarantees.md").write_text(guarantees_table(result) + "\n")
    write_results(args, "guarantees", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
