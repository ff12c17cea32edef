"""``leukotree demo``: the main job end to end on the bundled PBC sample."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path

from rich.console import Console

from leukotree.check import check_dataset
from leukotree.config import resolve_config
from leukotree.cv import cross_validate
from leukotree.data import discover
from leukotree.render import print_check_report, print_split_plan
from leukotree.report import patient_report
from leukotree.splits import plan_split
from leukotree.taxonomy import load_taxonomy

#: A small, fast recipe for the bundled 320 images (about two minutes on 2 CPU cores).
DEMO_TRAINING = {"model": "resnet18", "head": "multihead", "img_size": 64, "epochs": 12,
                 "batch_size": 32, "lr": 2e-3, "schedule": "onecycle", "crop_fraction": 0.65,
                 "train_pad": 0.15, "loss": "ce", "label_smoothing": 0.1}


def bundled_data() -> AbstractContextManager[Path]:
    """Context manager giving the folder of the bundled PBC sample (``pbc`` taxonomy)."""
    return resources.as_file(resources.files("leukotree") / "demo_data" / "pbc")


def _sample_cells(split_csv: Path, n: int) -> list[Path]:
    """The first ``n`` validation images of the most frequent validation label."""
    import csv
    from collections import Counter

    with split_csv.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "val"]
    label = Counter(r["label"] for r in rows).most_common(1)[0][0]
    return [Path(r["path"]) for r in rows if r["label"] == label][:n]


def run_demo(out: Path, *, folds: int = 3, seed: int = 0, progress: bool = True,
             console: Console | None = None, **training: object) -> dict[str, object]:
    """Check the bundled data, split it, cross-validate a hierarchical model; write all under
    ``out`` (per-fold reports with plots in ``out/cv/fold_<k>/eval/``).

    ``training`` overrides options of :data:`DEMO_TRAINING` (e.g. ``epochs=1``).
    Returns a summary with the paths written.
    """
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    taxonomy = load_taxonomy("pbc")
    with bundled_data() as data:
        console.rule("1. data check")
        samples = discover(data, taxonomy)
        report = check_dataset(samples, progress=progress)
        print_check_report(report, taxonomy, console)
        check_path = out / "check.json"
        check_path.write_text(json.dumps(report.to_dict(), indent=2))
        samples.raise_for_problems()

        console.rule("2. patient-grouped split")
        plan = plan_split(samples.samples, folds=folds, seed=seed)
        print_split_plan(plan, console)
        split_path = out / "folds.csv"
        plan.write(split_path)

        console.rule(f"3. {folds}-fold cross-validation of the multi-head hierarchical model")
        config = resolve_config(overrides={**DEMO_TRAINING, **training, "taxonomy": "pbc",
                                           "seed": seed})
        cv = cross_validate(data, out / "cv", config, folds=folds, progress=progress,
                            console=console)
        console.print((out / "cv" / "summary.md").read_text(), markup=False, highlight=False)

        console.rule("4. a report for one sample (PBC has no patients: 12 cells of fold 0)")
        sample = _sample_cells(out / "cv" / "fold_0" / "split.csv", 12)
        sample_report = patient_report(out / "cv" / "fold_0", sample, out / "report.html",
                                       patient="demo-sample", progress=False)
        console.print(f"report: {out / 'report.html'} (diagnosis {sample_report['diagnosis']}, "
                      f"referral {'advised' if sample_report['refer'] else 'not needed'})")
    summary = {"check": str(check_path), "folds": str(split_path), "cv": str(out / "cv"),
               "report": str(out / "cv" / "summary.md"), "images": report.n_images,
               "usable": report.usable, "accuracy": cv["mean"]["accuracy"],
               "hF": cv["mean"]["hF"], "patient_report": str(out / "report.html")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]demo finished[/]: results in {out}")
    return summary
