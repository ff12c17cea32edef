"""The demo's figures: ``leukotree demo`` timed end to end; prints JSON.

    python benchmarks/bench_demo.py --out bench-out/demo --json benchmarks/results/demo.json

Runs the demo (data check, patient-grouped split, 3-fold cross-validation of the
multi-head model on the 320 bundled PBC images, a patient report) into a new folder and
reports each fold's test figures (accuracy, macro F1, hF, leaf ECE before and after
calibration, the share of cells flagged unclassifiable, the accuracy of the others), their
mean and standard deviation, and the wall time. These are the README's figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from resultfile import add_json_option, write_results

from leukotree.demo import DEMO_TRAINING, run_demo
from leukotree.errors import LeukotreeError
from leukotree.report.console import stderr_console
from leukotree.rundir import DemoDir, require_new_folder

#: The per-fold figures kept (names of ``leukotree cv``'s summary).
FOLD_KEYS = ("accuracy", "macro_f1", "hF", "ece", "ece_uncalibrated", "unclassifiable",
             "accuracy_kept")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/demo"),
                        help="a new folder for the demo's outputs")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="epochs per fold (default: the demo's)")
    parser.add_argument("--img-size", type=int, help="image side (default: the demo's)")
    add_json_option(parser, None if argv is None else ["benchmarks/bench_demo.py", *argv])
    args = parser.parse_args(argv)
    try:
        require_new_folder(args.out, "demo")
    except LeukotreeError as err:
        parser.error(str(err))
    training = {k: v for k, v in (("epochs", args.epochs), ("img_size", args.img_size))
                if v is not None}
    started = time.perf_counter()
    summary = run_demo(args.out, folds=args.folds, seed=args.seed, progress=False,
                       console=stderr_console(), **training)
    minutes = (time.perf_counter() - started) / 60
    cv = DemoDir(args.out).cv.read_summary()
    results = {
        "images": summary["images"], "folds_n": args.folds, "seed": args.seed,
        "minutes": round(minutes, 2), "recipe": {**DEMO_TRAINING, **training},
        "folds": [{"fold": f["fold"], "n_images": f["n_images"],
                   **{k: f.get(k) for k in FOLD_KEYS}} for f in cv["folds"]],
        "mean": {k: cv["mean"][k] for k in FOLD_KEYS if k in cv["mean"]},
    }
    write_results(args, "demo", results)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
