"""``leukotree demo``: the main job end to end on the bundled PBC sample."""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from importlib import resources
from pathlib import Path

from rich.console import Console

from leukotree.check import check_dataset
from leukotree.config import resolve_config
from leukotree.data import discover
from leukotree.evaluate import EvalSettings, evaluate, validation_manifest
from leukotree.render import print_check_report, print_split_plan
from leukotree.splits import plan_split
from leukotree.taxonomy import load_taxonomy
from leukotree.train import train

#: A small, fast recipe for the bundled 320 images (about a minute on 2 CPU cores).
DEMO_TRAINING = {"model": "resnet18", "head": "multihead", "img_size": 64, "epochs": 8,
                 "batch_size": 32, "lr": 2e-3, "schedule": "onecycle", "crop_fraction": 0.7,
                 "folds": 3, "fold": 0}


def bundled_data() -> AbstractContextManager[Path]:
    """Context manager giving the folder of the bundled PBC sample (``pbc`` taxonomy)."""
    return resources.as_file(resources.files("leukotree") / "demo_data" / "pbc")


def run_demo(out: Path, *, folds: int = 3, seed: int = 0, progress: bool = True,
             console: Console | None = None) -> dict[str, object]:
    """Check the bundled data, split it, and write every artefact under ``out``.

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

        console.rule("3. train the multi-head hierarchical model (fold 0 validates)")
        run = out / "run"
        config = resolve_config(overrides={**DEMO_TRAINING, "taxonomy": "pbc", "seed": seed,
                                           "folds": folds})
        result = train(data, run, config, resume=(run / "last.pt").exists(),
                       progress=progress)

        console.rule("4. evaluate on the validation fold")
        manifest = validation_manifest(run, out / "val.csv")
        metrics = evaluate(run, manifest, out / "eval", EvalSettings(progress=progress))
        console.print((out / "eval" / "metrics.md").read_text(), markup=False,
                      highlight=False)
    summary = {"check": str(check_path), "folds": str(split_path), "run": str(run),
               "evaluation": str(out / "eval" / "metrics.json"),
               "images": report.n_images, "usable": report.usable,
               "best_val_accuracy": result["best"], "accuracy": metrics.get("accuracy"),
               "hF": metrics["hierarchical"]["hF"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"[bold green]demo finished[/]: results in {out}")
    return summary
