"""The ``leukotree`` command line: a thin layer over library calls."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from leukotree import __version__
from leukotree.errors import LeukotreeError

Handler = Callable[[argparse.Namespace], int]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", type=Path, help="folder DATA/<label>/**/<image> or CSV manifest")
    p.add_argument("--taxonomy", "-t", required=True,
                   help="built-in taxonomy name (leukemia7, cnmc, pbc, pbc-fine) or a YAML file")
    p.add_argument("--patients", default="auto",
                   help="where patient ids come from: auto (default), manifest, folder, cnmc, "
                        "none, or re:<regex with (?P<patient>...)> on the file name")
    p.add_argument("--labels", default="folder",
                   help="where labels come from: folder (default; the manifest's column for "
                        "CSV), pbc-prefix, or re:<regex with (?P<label>...)> on the file name")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--workers", type=int, default=2, help="image-reading threads (default 2)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images larger than this many pixels (default 60,000,000)")


def _load(args: argparse.Namespace):
    from leukotree.data import discover
    from leukotree.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(args.taxonomy)
    return taxonomy, discover(args.data, taxonomy, patients=args.patients, labels=args.labels)


def _max_pixels(args: argparse.Namespace) -> dict[str, int]:
    return {"max_pixels": args.max_pixels} if args.max_pixels else {}


def cmd_data_check(args: argparse.Namespace) -> int:
    from leukotree.check import check_dataset
    from leukotree.render import print_check_report

    taxonomy, samples = _load(args)
    report = check_dataset(
        samples,
        min_size=args.min_size,
        min_images_per_patient=args.min_images_per_patient,
        near_duplicate_distance=args.near_duplicate_distance,
        workers=args.workers,
        progress=not args.no_progress,
        **_max_pixels(args),
    )
    payload = json.dumps(report.to_dict(), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(payload)
    if args.json:
        print(payload)
    else:
        print_check_report(report, taxonomy, Console())
    if not report.usable:
        return 1
    return 1 if args.strict and report.warnings else 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from leukotree.check import scan_images
    from leukotree.render import print_split_plan
    from leukotree.splits import FilterSettings, plan_split

    _, samples = _load(args)
    samples.raise_for_problems()
    console = Console(stderr=args.json)
    note = samples.grouping_note()
    if note:
        console.print(f"[bold yellow]{note}[/]")
    filters = FilterSettings(
        min_images_per_patient=args.min_images_per_patient,
        drop_duplicates=args.drop_duplicates,
        min_size=args.min_size,
    )
    infos = None
    if filters.needs_images:
        infos = scan_images([s.path for s in samples.samples], workers=args.workers,
                            progress=not args.no_progress, **_max_pixels(args))
    plan = plan_split(samples.samples, folds=args.folds, val_fraction=args.val,
                      test_fraction=args.test, seed=args.seed, filters=filters, infos=infos)
    dropped = plan.write(args.out)
    if args.json:
        print(json.dumps({"out": str(args.out), "dropped": str(dropped) if dropped else None,
                          "parts": plan.table(), "notes": plan.notes,
                          "filtered": plan.filtered.summary()}, indent=2))
    else:
        print_split_plan(plan, console)
        console.print(f"wrote {args.out}" + (f" and {dropped}" if dropped else ""))
    return 0


#: Flags of ``leukotree train`` that map one-to-one onto TrainConfig fields.
TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "taxonomy": (str, "built-in taxonomy name or YAML file"),
    "model": (str, "timm backbone (resnet18, resnet50, densenet121, inception_v3, googlenet, "
                   "convnext_tiny, vit_small_patch16_224, vgg16, legacy_xception...)"),
    "head": (str, "flat | multihead | per-node | hybrid"),
    "weights": (str, "local file with backbone weights (timm/torchvision state dict); "
                     "hybrid head: NAME=PATH,NAME=PATH, one file per backbone"),
    "img_size": (int, "image side in pixels"),
    "epochs": (int, "number of epochs"),
    "batch_size": (int, "batch size (per process)"),
    "lr": (float, "peak learning rate"),
    "weight_decay": (float, "weight decay"),
    "optimizer": (str, "adamw | adam | sgd"),
    "schedule": (str, "cosine | onecycle | constant (all with warm-up)"),
    "warmup_epochs": (float, "warm-up length in epochs"),
    "loss": (str, "focal | ce | weighted-ce"),
    "focal_gamma": (float, "focal loss gamma"),
    "class_weights": (str, "none | balanced (per-class alpha / weights)"),
    "label_smoothing": (float, "label smoothing"),
    "drop_rate": (float, "dropout before the classifier"),
    "ema_decay": (float, "validate and save a moving average of the weights with this "
                         "per-step decay, e.g. 0.998 (0: off)"),
    "color_jitter": (float, "relative strength of brightness/contrast/stain jitter"),
    "crop_fraction": (float, "keep this central fraction of each image before resizing"),
    "train_pad": (float, "cache training images this much larger and train on random crops"),
    "balance": (str, "none | rotate (top up minority classes with rotated copies)"),
    "monitor": (str, "accuracy | macro_f1 | loss: picks the best checkpoint"),
    "patience": (int, "early stopping after this many epochs without improvement (0: off)"),
    "fold": (int, "validate on this fold of --folds patient-grouped folds"),
    "folds": (int, "number of folds for --fold"),
    "val_fraction": (float, "grouped validation fraction when neither --fold nor --val"),
    "seed": (int, "random seed"),
    "patients": (str, "patient ids: auto, manifest, folder, cnmc, none, re:<regex>"),
    "labels": (str, "labels: folder, pbc-prefix, re:<regex>"),
    "threads": (int, "CPU threads (0: all cores)"),
    "amp": (str, "auto | on | off: mixed precision (auto: on for CUDA)"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "workers": (int, "image-decoding threads"),
    "cache": (str, "disk | memory: where decoded pixels are kept"),
}


def _train_config(args: argparse.Namespace):
    from leukotree.config import resolve_config

    overrides = {name: getattr(args, name) for name in TRAIN_FLAGS}
    overrides["val_data"] = str(args.val) if args.val else None
    if args.hybrid_backbones:
        overrides["hybrid_backbones"] = args.hybrid_backbones.split(",")
    if args.pretrained:
        overrides["pretrained"] = True
    if args.no_augment:
        overrides["augment"] = False
    if args.no_channels_last:
        overrides["channels_last"] = False
    return resolve_config(preset=args.preset, config_file=args.config, overrides=overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from leukotree.config import load_config
    from leukotree.train import train

    saved = args.out / "config.yaml"
    config = load_config(saved) if args.resume and saved.exists() else _train_config(args)
    summary = train(args.data, args.out, config, resume=args.resume,
                    progress=not args.no_progress)
    if summary["best"] is not None:  # only the main process of a DDP run knows it
        Console(stderr=True).print(
            f"best {summary['monitor']} {summary['best']:.4f} at epoch "
            f"{summary['best_epoch']}; model in {args.out / 'best.pt'}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from leukotree.cv import cross_validate
    from leukotree.evaluate import EvalSettings

    if args.val:
        raise LeukotreeError("--val does not apply to cv: every fold is validated in turn.")
    settings = EvalSettings(aggregate=args.aggregate, min_cells=args.min_cells,
                            progress=not args.no_progress)
    cross_validate(args.data, args.out, _train_config(args), folds=args.folds_cv,
                   settings=settings, progress=not args.no_progress)
    Console().print((args.out / "summary.md").read_text(), markup=False, highlight=False)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from leukotree.predict import patient_rows, prediction_rows, run_predict, write_rows

    taxonomy, images, preds, thresholds = run_predict(
        args.run, args.inputs, patients=args.patients, confidence=args.confidence,
        target_error=args.target_error, batch_size=args.batch_size, workers=args.workers,
        progress=not args.no_progress, tta=args.tta, engine=args.engine)
    rows = prediction_rows(taxonomy, images, preds, thresholds, args.decode)
    text = write_rows(rows, args.out, args.json)
    console = Console(stderr=True)
    if args.by_patient:
        prow = patient_rows(taxonomy, images, preds, args.aggregate, args.min_cells)
        pout = args.out.with_name(args.out.stem + "_patients.csv") if args.out else None
        ptext = write_rows(prow, pout, args.json)
        if args.json:
            text = json.dumps({"images": json.loads(text or "[]"),
                               "patients": json.loads(ptext or "[]")}, indent=2)
        for r in prow:
            console.print(f"patient {r['patient']}: {r['diagnosis']} ({r['n_cells']} cells)",
                          highlight=False)
    if text is not None:
        print(text)
    n_bad = sum(e is not None for e in preds.errors)
    n_refer = sum(bool(r["refer"]) for r in rows if r["error"] == "")
    console.print(
        f"{len(rows)} image(s): {len(rows) - n_bad} predicted, {n_refer} referred "
        f"(thresholds per level {', '.join(f'{t:.3f}' for t in thresholds)}), "
        f"{n_bad} unreadable" + (f"; wrote {args.out}" if args.out else ""), highlight=False)
    for r in rows:
        if r["error"]:
            console.print(f"[red]unreadable:[/] {r['error']}", highlight=False)
    return 1 if n_bad == len(rows) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from leukotree.explain import explain_images

    nodes = args.node.split(",") if args.node else None
    written = explain_images(args.run, args.images, args.out, nodes=nodes, method=args.method,
                             target_layer=args.target_layer)
    for w in written:
        levels = ", ".join(f"{n} ({m['probability']:.2f})" for n, m in w["maps"].items())
        Console().print(f"{w['image']}: predicted {w['predicted_leaf']}; maps for {levels}; "
                        f"strip {args.out / w['strip']}", highlight=False)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from leukotree.report import patient_report

    result = patient_report(args.run, args.inputs, args.out, patient=args.patient,
                            method=args.aggregate, confidence=args.confidence,
                            min_cells=args.min_cells, top_cells=args.top_cells,
                            heatmaps=not args.no_heatmaps, progress=not args.no_progress)
    Console(stderr=True).print(
        f"patient {result['patient']}: {result['diagnosis'] or 'insufficient'}"
        f"{' (referral advised)' if result['refer'] else ''}, {result['n_cells']} cells; "
        f"wrote {args.out}", highlight=False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from leukotree.export import export_onnx

    path = export_onnx(args.run, args.onnx, opset=args.opset)
    Console(stderr=True).print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from leukotree.compare import compare

    compare(args.folders, args.out, n_boot=args.bootstrap)
    Console().print((args.out / "comparison.md").read_text(), markup=False, highlight=False)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from leukotree.evaluate import EvalSettings, evaluate

    settings = EvalSettings(
        threshold=args.threshold, target_sensitivity=args.target_sensitivity,
        positive=args.positive, aggregate=args.aggregate, min_cells=args.min_cells,
        batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
        tta=args.tta)
    data = args.data
    if data is None:  # the run's own validation images
        from leukotree.evaluate import validation_manifest

        run_dir = args.run if args.run.is_dir() else args.run.parent
        data = validation_manifest(run_dir, args.out / "validation.csv")
    metrics = evaluate(args.run, data, args.out, settings, patients=args.patients,
                       labels=args.labels)
    console = Console()
    console.print((args.out / "metrics.md").read_text(), markup=False, highlight=False)
    console.print(f"wrote {args.out / 'metrics.json'} ({metrics['n_images']} images)")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from leukotree.synth import generate
    from leukotree.taxonomy import load_taxonomy

    n = generate(
        args.out, load_taxonomy(args.taxonomy),
        patients_per_class=args.patients_per_class, cells_per_patient=args.cells_per_patient,
        size=args.size, seed=args.seed, inner_fraction=args.inner_fraction,
        image_format=args.format, progress=not args.no_progress,
    )
    Console().print(f"wrote {n} images to {args.out}")
    return 0


def cmd_taxonomy(args: argparse.Namespace) -> int:
    from leukotree.taxonomy import builtin_taxonomies, load_taxonomy

    if args.name is None:
        for name in builtin_taxonomies():
            tax = load_taxonomy(name)
            print(f"{name:12s} {len(tax.leaves)} leaves, depth {tax.max_depth}: "
                  f"{tax.description}")
        return 0
    tax = load_taxonomy(args.name)
    if args.yaml:
        print(tax.to_yaml(), end="")
    else:
        print(tax.render())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from leukotree.demo import run_demo

    training = {k: v for k, v in (("epochs", args.epochs), ("img_size", args.img_size))
                if v is not None}
    run_demo(args.out, folds=args.folds, seed=args.seed, progress=not args.no_progress,
             **training)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukotree",
        description="Hierarchical leukemia classification from blood smear images.",
    )
    parser.add_argument("--version", action="version", version=f"leukotree {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="check and split data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    check = data_sub.add_parser("check", help="report counts, unreadable files, duplicates...")
    _add_data_args(check)
    check.add_argument("--min-size", type=int, default=64,
                       help="flag images whose shorter side is below this (default 64)")
    check.add_argument("--min-images-per-patient", type=int, default=4,
                       help="flag patients with fewer images (default 4, as the seed paper)")
    check.add_argument("--near-duplicate-distance", type=int, default=4,
                       help="pHash Hamming distance counted as near duplicate (default 4)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--out", type=Path, help="also write the JSON report to this file")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.set_defaults(func=cmd_data_check)

    split = data_sub.add_parser("split", help="patient-grouped stratified folds")
    _add_data_args(split)
    split.add_argument("--folds", type=int, default=5,
                       help="number of cross-validation folds (0: one train/val/test split)")
    split.add_argument("--val", type=float, default=0.0, help="validation fraction (--folds 0)")
    split.add_argument("--test", type=float, default=0.0,
                       help="held-out test fraction (before folds, or with --folds 0)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", type=Path, required=True, help="CSV to write")
    split.add_argument("--min-images-per-patient", type=int, default=0,
                       help="drop patients with fewer images (the paper uses 4)")
    split.add_argument("--drop-duplicates", choices=["none", "exact", "near"], default="none",
                       help="drop exact (same bytes) or near (pHash) duplicates, keeping one")
    split.add_argument("--min-size", type=int, default=0,
                       help="drop images whose shorter side is below this many pixels")
    split.add_argument("--json", action="store_true", help="print a JSON summary")
    split.set_defaults(func=cmd_data_split)

    tr = sub.add_parser("train", help="train a classifier into a run folder")
    _add_train_args(tr)
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run")
    tr.set_defaults(func=cmd_train)

    cv = sub.add_parser("cv", help="patient-grouped cross-validation: train and evaluate "
                                   "every fold (resumes a half-finished CV)")
    _add_train_args(cv, skip={"fold", "folds"})
    cv.add_argument("--folds", dest="folds_cv", type=int, default=5, help="number of folds")
    cv.add_argument("--aggregate", choices=["majority", "mean"], default="majority")
    cv.add_argument("--min-cells", type=int, default=1)
    cv.set_defaults(func=cmd_cv, fold=None, folds=None)

    cmp = sub.add_parser("compare", help="put CV results of several models side by side")
    cmp.add_argument("folders", type=Path, nargs="+", help="folders written by 'leukotree cv'")
    cmp.add_argument("--out", type=Path, required=True)
    cmp.add_argument("--bootstrap", type=int, default=1000,
                     help="patient-bootstrap resamples for confidence intervals")
    cmp.set_defaults(func=cmd_compare)

    pr = sub.add_parser("predict", help="predict images, folders or manifests")
    pr.add_argument("run", type=Path, help="run folder, its best.pt, or an exported .onnx")
    pr.add_argument("inputs", nargs="+", help="images, folders or CSV manifests")
    pr.add_argument("--out", type=Path, help="CSV of per-image predictions")
    pr.add_argument("--json", action="store_true", help="print the predictions as JSON")
    pr.add_argument("--patients", default="none",
                    help="patient ids: none, folder (parent folder), cnmc, manifest, re:<regex>")
    pr.add_argument("--by-patient", action="store_true",
                    help="also one diagnosis per patient (<out>_patients.csv)")
    pr.add_argument("--aggregate", choices=["majority", "mean"], default="majority")
    pr.add_argument("--min-cells", type=int, default=1,
                    help="patients with fewer cells are 'insufficient'")
    pr.add_argument("--confidence", help="refer below this conditional probability: one "
                                         "value or one per level (e.g. 0.9,0.8,0.7)")
    pr.add_argument("--target-error", type=float,
                    help="set the per-level thresholds on the run's validation split so that "
                         "accepted decisions err at most this often")
    pr.add_argument("--tta", action="store_true",
                    help="average over the 8 flips/rotations of each image (8x slower)")
    pr.add_argument("--decode", choices=["argmax", "greedy"], default="argmax",
                    help="leaf choice: most probable leaf, or greedy top-down")
    pr.add_argument("--engine", choices=["auto", "torch", "onnx"], default="auto",
                    help="auto: ONNX Runtime when the onnx extra is installed (faster on "
                         "CPUs; the export is kept beside best.pt), else PyTorch")
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--workers", type=int, default=2)
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_predict)

    xp = sub.add_parser("explain", help="Grad-CAM heat maps for each level of the tree")
    xp.add_argument("run", type=Path, help="run folder (or its best.pt)")
    xp.add_argument("images", nargs="+", type=Path)
    xp.add_argument("--out", type=Path, required=True, help="folder for the overlays")
    xp.add_argument("--node", help="node(s) to explain, comma-separated (default: every level "
                                   "of the predicted path)")
    xp.add_argument("--method", default="gradcam",
                    help="gradcam, gradcam++, xgradcam, layercam, eigencam or hirescam")
    xp.add_argument("--target-layer", help="dotted module name (default: picked per backbone)")
    xp.set_defaults(func=cmd_explain)

    rp = sub.add_parser("report", help="one self-contained HTML report for one patient")
    rp.add_argument("run", type=Path, help="run folder (or its best.pt)")
    rp.add_argument("inputs", nargs="+", help="the patient's images, folder or manifest")
    rp.add_argument("--out", type=Path, required=True, help="HTML file to write")
    rp.add_argument("--patient", help="patient id shown in the report")
    rp.add_argument("--aggregate", choices=["majority", "mean"], default="majority")
    rp.add_argument("--confidence", default="0.6",
                    help="referral threshold per level (one value or one per level)")
    rp.add_argument("--min-cells", type=int, default=1)
    rp.add_argument("--top-cells", type=int, default=8, help="cells shown with heat maps")
    rp.add_argument("--no-heatmaps", action="store_true")
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser("export", help="export a model (and its tree of probabilities) to ONNX")
    ex.add_argument("run", type=Path, help="run folder (or its best.pt)")
    ex.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=cmd_export)

    _add_eval_parser(sub)
    _add_other_parsers(sub)
    return parser


def _add_train_args(tr: argparse.ArgumentParser, skip: frozenset[str] | set[str] = frozenset(),
                    ) -> None:
    tr.add_argument("data", type=Path, help="folder DATA/<label>/**/<image> or CSV manifest")
    tr.add_argument("--out", type=Path, required=True, help="run folder")
    tr.add_argument("--config", type=Path, help="YAML file of options (flags override it)")
    tr.add_argument("--preset", help="named recipe: cpu-fast, paper, tiny-test")
    tr.add_argument("--val", type=Path, help="separate validation data (folder or manifest)")
    tr.add_argument("--hybrid-backbones", help="comma-separated backbones of the hybrid head")
    tr.add_argument("--pretrained", action="store_true",
                    help="ImageNet weights from the hub (needs network; else use --weights)")
    tr.add_argument("--no-augment", action="store_true")
    tr.add_argument("--no-channels-last", action="store_true")
    tr.add_argument("--no-progress", action="store_true")
    for name, (kind, help_text) in TRAIN_FLAGS.items():
        if name in skip:
            continue
        flags = ["--" + name.replace("_", "-")] + (["-t"] if name == "taxonomy" else [])
        tr.add_argument(*flags, type=kind, default=None, help=help_text)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="metrics, tables and plots of a model on data")
    ev.add_argument("run", type=Path, help="run folder (or its best.pt)")
    ev.add_argument("data", type=Path, nargs="?",
                    help="folder DATA/<label>/**/<image> or CSV manifest (default: the run's "
                         "validation images, from its split.csv)")
    ev.add_argument("--out", type=Path, required=True, help="folder for metrics and plots")
    ev.add_argument("--patients", default="auto")
    ev.add_argument("--labels", default="folder")
    ev.add_argument("--threshold", type=float, help="binary decision threshold on P(positive)")
    ev.add_argument("--target-sensitivity", type=float,
                    help="pick the binary threshold reaching this sensitivity on the run's "
                         "validation split")
    ev.add_argument("--positive", help="positive leaf of a two-leaf taxonomy (default: first)")
    ev.add_argument("--aggregate", choices=["majority", "mean"], default="majority",
                    help="patient-level aggregation (default: majority vote)")
    ev.add_argument("--min-cells", type=int, default=1,
                    help="patients with fewer cells are reported as insufficient")
    ev.add_argument("--tta", action="store_true",
                    help="average over the 8 flips/rotations of each image (8x slower)")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--workers", type=int, default=2)
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_evaluate)


def _add_other_parsers(sub: argparse._SubParsersAction) -> None:
    synth = sub.add_parser("synth", help="write synthetic smear-like images")
    synth.add_argument("out", type=Path)
    synth.add_argument("--taxonomy", "-t", default="leukemia7")
    synth.add_argument("--patients-per-class", type=int, default=6)
    synth.add_argument("--cells-per-patient", type=int, default=20)
    synth.add_argument("--size", type=int, default=96, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--inner-fraction", type=float, default=0.0,
                       help="fraction of cells labelled at their parent node")
    synth.add_argument("--format", choices=["png", "jpg", "bmp"], default="png")
    synth.add_argument("--no-progress", action="store_true")
    synth.set_defaults(func=cmd_synth)

    tax = sub.add_parser("taxonomy", help="list built-in taxonomies or show one")
    tax.add_argument("name", nargs="?", help="built-in name or YAML file")
    tax.add_argument("--yaml", action="store_true", help="print as YAML")
    tax.set_defaults(func=cmd_taxonomy)

    demo = sub.add_parser("demo", help="run the main job on the bundled PBC sample")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--folds", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, help="epochs per fold (default 12)")
    demo.add_argument("--img-size", type=int, help="image side in pixels (default 64)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one clear message and exit with code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LeukotreeError as err:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}",
                                                   highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
