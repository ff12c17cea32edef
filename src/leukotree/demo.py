"""``leukotree demo``: the main job end to end on the bundled PBC sample."""

from __future__ import annotations

from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from leukotree.data.check import check_dataset
from leukotree.data.discover import discover
from leukotree.data.splits import plan_split
from leukotree.engine.config import resolve_config
from leukotree.evaluation.cv import cross_validate
from leukotree.report.console import print_check_report, print_split_plan, say, stdout_console
from leukotree.report.patient import patient_report
from leukotree.rundir import DemoDir, RunDir, read_text, write_json
from leukotree.taxonomy import load_taxonomy

#: A small, fast recipe for the bundled 320 images (about two minutes on 2 CPU cores).
DEMO_TRAINING = {"model": "resnet18", "head": "multihead", "img_size": 64, "epochs": 12,
                 "batch_size": 32, "lr": 2e-3, "schedule": "onecycle", "crop_fraction": 0.65,
                 "train_pad": 0.15, "loss": "ce", "label_smoothing": 0.1}


def bundled_data() -> AbstractContextManager[Path]:
    """Context manager giving the folder of the bundled PBC sample (``pbc`` taxonomy)."""
    return resources.as_file(resources.files("leukotree") / "demo_data" / "pbc")


def _sample_cells(run: RunDir, n: int) -> list[Path]:
    """The first ``n`` test images (validation, for a fold without a validation part of
    its own) of their most frequent label."""
    from collections import Counter

    rows = run.read_split(run.test_part())
    label = Counter(r["label"] for r in rows).most_common(1)[0][0]
    return [Path(r["path"]) for r in rows if r["label"] == label][:n]


def run_demo(out: Path, *, folds: int = 3, seed: int = 0, progress: bool = True,
             console: Console | None = None, **training: object) -> dict[str, object]:
    """Check the bundled data, split it, cross-validate a hierarchical model; write all under
    ``out`` (per-fold reports with plots in ``out/cv/fold_<k>/eval/``).

    ``training`` overrides options of :data:`DEMO_TRAINING` (e.g. ``epochs=1``).
    Returns a summary with the paths written.
    """
    console = console or stdout_console()
    demo = DemoDir(out)
    demo.path.mkdir(parents=True, exist_ok=True)
    taxonomy = load_taxonomy("pbc")
    with bundled_data() as data:
        console.rule("1. data check")
        samples = discover(data, taxonomy)
        report = check_dataset(samples, progress=progress)
        print_check_report(report, taxonomy, console)
        write_json(demo.check, report.to_dict())
        samples.raise_for_problems()

        console.rule("2. patient-grouped split")
        plan = plan_split(samples.samples, folds=folds, seed=seed)
        print_split_plan(plan, console)
        plan.write(demo.folds)

        console.rule(f"3. {folds}-fold cross-validation of the multi-head hierarchical model")
        config = resolve_config(overrides={**DEMO_TRAINING, **training, "taxonomy": "pbc",
                                           "seed": seed})
        cv = cross_validate(data, demo.cv.path, config, folds=folds, progress=progress,
                            console=console)
        say(console, read_text(demo.cv.markdown, "CV summary"))

        console.rule("4. a report for one sample (PBC has no patients: 12 cells of fold 0)")
        sample = _sample_cells(demo.cv.fold(0), 12)
        sample_report = patient_report(demo.cv.fold(0).path, sample, demo.report,
                                       patient="demo-sample", progress=False)
        if sample_report.get("kind") == "cells":  # PBC: cell types, a differential count
            say(console, f"report: {demo.report} (differential count of "
                f"{sample_report['n_cells']} cells)")
        else:
            say(console, f"report: {demo.report} (diagnosis {sample_report['diagnosis']}, "
                f"referral {'advised' if sample_report['refer'] else 'not needed'})")
    summary = {"check": str(demo.check), "folds": str(demo.folds), "cv": str(demo.cv.path),
               "report": str(demo.cv.markdown), "images": report.n_images,
               "usable": report.usable, "accuracy": cv["mean"]["accuracy"],
               "hF": cv["mean"]["hF"], "patient_report": str(demo.report)}
    write_json(demo.summary, summary)
    console.print(f"[bold green]demo finished[/]: results in {escape(str(out))}")
    say(console, "serve the fold-0 model in the lab's web app (http://127.0.0.1:8000): "
        f"leukotree serve {demo.cv.fold(0).path}")
    return summary
