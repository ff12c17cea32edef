"""Accuracy of the flat, multi-head and per-node heads under one CPU budget; prints JSON.

    python benchmarks/bench_cv_heads.py ../shared/data/pbc-dev --taxonomy pbc \\
        --out bench-out/cv-pbc

Runs ``leukotree cv`` (patient-grouped K-fold cross-validation; images are their own
group when a data set has no patient ids) once per head on the same folds, then
``leukotree compare`` on the results, so that ``OUT/comparison/comparison.md`` holds
the seed paper's tables 2-4 and paired tests. Every head gets the same budget: the
``--preset`` recipe with ``--epochs`` epochs at ``--img-size`` pixels on the same
backbone. The script resumes: finished folds are kept, an interrupted fold resumes.

Any folder or manifest that ``leukotree train`` accepts works, with the options that
name its taxonomy, labels and patients (C-NMC: ``--taxonomy cnmc --patients cnmc``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from resultfile import add_json_option, write_results

from leukotree.engine.config import resolve_config
from leukotree.errors import LeukotreeError
from leukotree.evaluation.compare import compare
from leukotree.evaluation.cv import cross_validate
from leukotree.evaluation.evaluate import EvalSettings
from leukotree.rundir import CVDir

#: The documented budget: the cpu-fast recipe shortened to fit 5 folds x 3 heads into
#: about an hour on 2 CPU cores (per-node trains one backbone per inner node).
BUDGET = {"preset": "cpu-fast", "epochs": 8, "img_size": 64}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="folder DATA/<label>/... or CSV manifest")
    parser.add_argument("--out", type=Path, default=Path("bench-out/cv"))
    parser.add_argument("--taxonomy", default="pbc")
    parser.add_argument("--heads", nargs="+", default=["flat", "multihead", "per-node"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--preset", default=BUDGET["preset"])
    parser.add_argument("--epochs", type=int, default=BUDGET["epochs"])
    parser.add_argument("--img-size", type=int, default=BUDGET["img_size"])
    parser.add_argument("--model", default=None, help="backbone (default: the preset's)")
    parser.add_argument("--patients", default="auto")
    parser.add_argument("--labels", default="folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--fold-val-fraction", type=float, default=0.0,
                        help="share of each fold's training patients held out to calibrate "
                             "it (leukotree cv's default is 0.15; 0, this benchmark's "
                             "default: the heads compared on all of a fold's training "
                             "patients, as in the published table)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    add_json_option(parser)
    args = parser.parse_args()

    overrides = {"taxonomy": args.taxonomy, "epochs": args.epochs, "img_size": args.img_size,
                 "model": args.model, "patients": args.patients, "labels": args.labels,
                 "seed": args.seed, "threads": args.threads,
                 "fold_val_fraction": args.fold_val_fraction}
    results: dict[str, dict] = {}
    folders = []
    for head in args.heads:
        config = resolve_config(preset=args.preset, overrides=overrides | {"head": head})
        folder = args.out / head
        start = time.perf_counter()
        summary = cross_validate(args.data, folder, config, folds=args.folds,
                                 settings=EvalSettings(progress=args.progress),
                                 progress=args.progress)
        folders.append(folder)
        results[head] = {
            "wall_s_this_call": round(time.perf_counter() - start, 1),
            "train_s_per_fold": [round(sum(h["seconds"] for h in _history(folder, k)), 1)
                                 for k in range(args.folds)],
            **{key: summary["mean"][key] for key in ("accuracy", "macro_f1", "auroc_macro",
                                                     "hF") if key in summary["mean"]},
            "fold_accuracy": [row.get("accuracy") for row in summary["folds"]],
        }
    comparison = compare(folders, args.out / "comparison")
    result = {
        "data": str(args.data), "taxonomy": args.taxonomy, "folds": args.folds,
        "budget": {"preset": args.preset, "epochs": args.epochs, "img_size": args.img_size,
                   "model": config.model},
        "heads": results,
        "all_leaves_ci95": {m: comparison["table3"][m]["all_leaves"]
                            for m in comparison["models"]},
        "paired_tests": comparison["paired_tests"],
        "tables": str(args.out / "comparison" / "comparison.md"),
    }
    write_results(args, "cv_heads", result)
    print(json.dumps(result, indent=2))


def _history(folder: Path, fold: int) -> list[dict]:
    return CVDir(folder).fold(fold).read_summary()["history"]


if __name__ == "__main__":
    try:
        main()
    except LeukotreeError as err:
        raise SystemExit(f"error: {err}") from None
