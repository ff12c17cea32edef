"""The ``leukotree`` command line: a thin layer over library calls."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from leukotree import __version__
from leukotree.errors import LeukotreeError
from leukotree.inference.options import REPORT_CONFIDENCE, add_inference_arguments
from leukotree.report.console import print_error, say, stderr_console, stdout_console

Handler = Callable[[argparse.Namespace], int]
#: The inference options ``cv`` takes (its other flags are training options).
CV_INFERENCE = ("aggregate", "min_cells")
#: The inference options ``serve`` takes (its --max-pixels is its upload limit's).
SERVE_INFERENCE = ("engine", "crop_mode", "pixel_size", "confidence", "aggregate")

#: Exit codes (see docs/guide/bad-input.md, "Exit codes").
EXIT_OK = 0
EXIT_NOTHING_DONE = 1  # data check: not usable; predict: no input could be read
EXIT_USER_ERROR = 2  # bad option, file or data: nothing (or nothing more) was written
EXIT_SOME_INPUTS_FAILED = 3  # finished; the inputs that failed are named, results written


def _load(args: argparse.Namespace):
    from leukotree.data.discover import discover
    from leukotree.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(args.taxonomy)
    return taxonomy, discover(args.data, taxonomy, patients=args.patients, labels=args.labels)


def _max_pixels(args: argparse.Namespace) -> dict[str, int]:
    return {"max_pixels": args.max_pixels} if args.max_pixels else {}


def cmd_data_check(args: argparse.Namespace) -> int:
    from leukotree.data.check import check_dataset
    from leukotree.report.console import print_check_report

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
        print_check_report(report, taxonomy, stdout_console())
    if not report.usable:
        return 1
    return 1 if args.strict and report.warnings else 0


def cmd_data_split(args: argparse.Namespace) -> int:
    from leukotree.data.check import scan_images
    from leukotree.data.splits import FilterSettings, plan_split
    from leukotree.report.console import print_split_plan

    _, samples = _load(args)
    samples.raise_for_problems()
    console = stderr_console() if args.json else stdout_console()
    note = samples.grouping_note()
    if note:
        say(console, note, "bold yellow")
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
        say(console, f"wrote {args.out}" + (f" and {dropped}" if dropped else ""))
    return 0


def cmd_data_colour(args: argparse.Namespace) -> int:
    from leukotree.data.discover import discover
    from leukotree.evaluation.confound import colour_confound
    from leukotree.report.console import print_colour_confound
    from leukotree.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(args.taxonomy)
    cells = load_taxonomy(args.cell_taxonomy) if args.cell_taxonomy else None
    if (args.cell_labels is None) != (cells is None):
        raise LeukotreeError("--cell-labels and --cell-taxonomy go together: the first says "
                             "where each image's cell type is, the second which tree it "
                             "belongs to (e.g. --cell-labels column:cell_type "
                             "--cell-taxonomy jhh-cells).")
    if args.cell_labels and not args.cell_types:
        raise LeukotreeError("--cell-labels and --cell-taxonomy only choose images with "
                             "--cell-types (e.g. --cell-types lymphocyte); add it, or leave "
                             "the three out to measure every image.")
    samples = discover(args.data, taxonomy, patients=args.patients, labels=args.labels,
                       cell_labels=args.cell_labels, cell_taxonomy=cells)
    samples.raise_for_problems()
    note = samples.grouping_note()
    if note:
        say(stderr_console(), note, "bold yellow")
    found = colour_confound(samples.samples, features=args.features, stain_norm=args.stain_norm,
                            cell_taxonomy=cells, cell_types=args.cell_types, size=args.size,
                            workers=args.workers, repeats=args.repeats, seed=args.seed,
                            progress=not args.no_progress, **_max_pixels(args))
    payload = json.dumps(found.to_dict(), indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(payload + "\n", encoding="utf-8")
    if args.json:
        print(payload)
    else:
        print_colour_confound(found, stdout_console())
    return 0


def _train_config(args: argparse.Namespace):
    from leukotree.engine.config import config_overrides, resolve_config

    return resolve_config(preset=args.preset, config_file=args.config,
                          overrides=config_overrides(args))


def cmd_train(args: argparse.Namespace) -> int:
    from leukotree.engine.config import config_overrides, load_config, resume_config
    from leukotree.engine.trainer import train
    from leukotree.rundir import RunDir

    run = RunDir(args.out)
    if args.resume and run.is_run:
        wanted = _train_config(args) if args.preset or args.config else config_overrides(args)
        config, changes = resume_config(load_config(run.config, check_device=False), wanted)
        for line in changes:
            say(stderr_console(), f"resuming with a changed option: {line}")
    else:
        config = _train_config(args)
    if config.final_model == "folds":  # the fold models as one ensemble, patients stacked
        from leukotree.evaluation.stacking import train_fold_ensemble

        train_fold_ensemble(args.data, args.out, config, progress=not args.no_progress)
        say(stderr_console(), f"model in {args.out} (the {config.folds} fold models as one "
            f"ensemble; cross-fitted patient estimate in {Path(args.out) / 'stacked.json'})")
        return 0
    summary = train(args.data, args.out, config, resume=args.resume,
                    progress=not args.no_progress)
    if summary["best"] is not None:  # only the main process of a DDP run knows it
        say(stderr_console(), f"best {summary['monitor']} {summary['best']:.4f} at epoch "
            f"{summary['best_epoch']}; model in {run.best}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from leukotree.evaluation.cv import cross_validate
    from leukotree.evaluation.evaluate import EvalSettings
    from leukotree.inference.options import InferenceOptions
    from leukotree.rundir import CVDir, read_text

    if args.val_data:
        raise LeukotreeError("--val does not apply to cv: every fold is validated in turn.")
    cross_validate(args.data, args.out, _train_config(args), folds=args.folds_cv,
                   repeats=args.repeats, protocol=args.protocol,
                   options=InferenceOptions.from_args(args, CV_INFERENCE),
                   settings=EvalSettings(progress=not args.no_progress),
                   progress=not args.no_progress)
    say(stdout_console(), read_text(CVDir(args.out).markdown, "CV summary"))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from leukotree.inference.options import InferenceOptions
    from leukotree.inference.predict import (
        patient_rows,
        prediction_rows,
        run_predict,
        write_rows,
    )

    result = run_predict(args.run, args.inputs, InferenceOptions.from_args(args),
                         patients=args.patients, target_error=args.target_error,
                         progress=not args.no_progress)
    console = stderr_console()
    if not args.no_progress or result.engine_note:
        note = f" ({result.engine_note})" if result.engine_note else ""
        say(console, f"engine: {result.engine}{note}")
    rows = prediction_rows(result, args.decode)
    text = write_rows(rows, args.out, args.json)
    if args.by_patient:
        options = InferenceOptions.from_args(args)
        prow = patient_rows(result, args.aggregate, args.min_cells, options.evidence())
        pout = args.out.with_name(args.out.stem + "_patients.csv") if args.out else None
        ptext = write_rows(prow, pout, args.json)
        if args.json:
            text = json.dumps({"images": json.loads(text or "[]"),
                               "patients": json.loads(ptext or "[]")}, indent=2)
        for r in prow:
            say(console, f"patient {r['patient']}: {r['diagnosis']} ({r['n_cells']} cells, "
                f"{r['n_informative']} informative)"
                + (f", referred: {r['reason']}" if r["referred"] else ""))
            if r["domain_alarm"]:
                flagged = r["n_unclassifiable"]
                say(console, f"patient {r['patient']}: domain alarm: {flagged} of "
                    f"{flagged + r['n_cells']} readable cells are unlike the training cells "
                    f"(the model flags {result.expected_ood:.0%} of its own validation "
                    "cells); check this patient's stain, magnification and crop", "bold red")
    if text is not None:
        print(text)
    errors = [e for e in result.predictions.errors if e is not None]
    n_refer = sum(bool(r["refer"]) for r in rows if r["error"] == "")
    say(console, f"{len(rows)} image(s): {len(rows) - len(errors)} predicted, {n_refer} referred "
        f"(thresholds per level {', '.join(f'{t:.3f}' for t in result.thresholds)}), "
        f"{len(errors)} unreadable" + (f"; wrote {args.out}" if args.out else ""))
    for error in errors:
        say(console, f"unreadable: {error}", "red")
    if result.predictions.ood_score is not None:
        n_odd = int(result.predictions.unclassifiable.sum())
        say(console, f"{n_odd} cell(s) unclassifiable (unlike the training cells; "
            "left out of patient diagnoses)", "yellow" if n_odd else None)
    if result.conformal is not None:
        answers = [r["answer_node"] for r in rows if r["error"] == ""]
        leaves = sum(a in result.taxonomy.leaf_index for a in answers)
        say(console, f"conformal answers ({result.conformal.mode}, coverage "
            f"{1 - result.conformal.alpha:g} on cells like the validation cells): "
            f"{leaves} of {len(answers)} answered with a leaf")
    alarm = result.domain_shift()
    if alarm:
        say(console, alarm, "bold red")
    _name_not_used(console, result.not_used)
    if errors and len(errors) == len(rows):
        return EXIT_NOTHING_DONE
    return EXIT_SOME_INPUTS_FAILED if errors else EXIT_OK


def cmd_select(args: argparse.Namespace) -> int:
    from leukotree.inference.options import InferenceOptions
    from leukotree.lab.select import read_done, select_from_run
    from leukotree.rundir import write_csv

    done = read_done(args.exclude) if args.exclude else set()
    chosen = select_from_run(args.run, args.inputs, args.n, policy=args.policy,
                             audit_share=args.audit_share, seed=args.seed, exclude=done,
                             patients=args.patients, options=InferenceOptions.from_args(args),
                             progress=not args.no_progress)
    rows = chosen.rows()
    write_csv(args.out, rows, list(rows[0]))
    console = stderr_console()
    n_audit = sum(p.audit for p in chosen.picks)
    say(console, f"chose {len(rows)} of {chosen.n_inputs} cell(s) ({n_audit} audit cells drawn "
        f"at random, {len(rows) - n_audit} by policy '{args.policy}'; {chosen.n_excluded} "
        f"left out as reviewed or given twice); wrote {args.out}")
    for error in chosen.unreadable:
        say(console, f"unreadable: {error}", "red")
    return EXIT_SOME_INPUTS_FAILED if chosen.unreadable else EXIT_OK


def _name_not_used(console: Console, files: list[Path]) -> None:
    """Name every file of a given folder that was not used (hidden, or not an image)."""
    from leukotree.errors import display_path

    if files:
        say(console, f"{len(files)} file(s) in the given folders are not used (hidden, or not "
            "JPEG, PNG, BMP or TIFF):", "yellow")
        for path in files:
            say(console, f"  - {display_path(path)}")


def cmd_explain(args: argparse.Namespace) -> int:
    from leukotree.inference.explain import explain_images
    from leukotree.inference.options import InferenceOptions

    nodes = args.node.split(",") if args.node else None
    written = explain_images(args.run, args.images, args.out, nodes=nodes, method=args.method,
                             target_layer=args.target_layer,
                             options=InferenceOptions.from_args(args))
    for w in written:
        levels = ", ".join(f"{n} ({m['probability']:.2f})" for n, m in w["maps"].items())
        say(stdout_console(), f"{w['image']}: predicted {w['predicted_leaf']}; maps for {levels}; "
            f"strip {args.out / w['strip']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from leukotree.inference.options import InferenceOptions
    from leukotree.report.patient import patient_report

    result = patient_report(args.run, args.inputs, args.out,
                            options=InferenceOptions.from_args(args), patient=args.patient,
                            top_cells=args.top_cells, heatmaps=not args.no_heatmaps,
                            progress=not args.no_progress)
    console = stderr_console()
    if result.get("kind") == "cells":
        shares = ", ".join(f"{r['leaf']} {r['percent']:g}%"
                           for r in result["differential_count"]["rows"] if r["count"])
        say(console, f"patient {result['patient']}: differential count of "
            f"{result['n_cells']} cells ({shares}); wrote {args.out}")
    else:
        say(console, f"patient {result['patient']}: {result['diagnosis'] or 'insufficient'}"
            f"{' (referral advised)' if result['refer'] else ''}, {result['n_cells']} cells; "
            f"wrote {args.out}")
    for error in result["unreadable"]:
        say(console, f"unreadable: {error}", "red")
    _name_not_used(console, [Path(p) for p in result["not_used"]])
    return EXIT_SOME_INPUTS_FAILED if result["unreadable"] else EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from leukotree.inference.export import export_onnx
    from leukotree.inference.loader import load

    path = export_onnx(load(args.run).checkpoint, args.onnx, opset=args.opset)
    say(stderr_console(), f"wrote {path}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from leukotree.engine.adapt import adapt, self_train

    console = stderr_console()
    common = {"batch_size": args.batch_size, "workers": args.workers,
              "progress": not args.no_progress, **_max_pixels(args)}
    tuning = {"keep": args.keep, "epochs": args.epochs, "lr": args.lr}
    given = [f"--{k}" for k, v in tuning.items() if v is not None]
    if args.method == "self-train":
        if args.pixel_size is not None:
            raise LeukotreeError("--pixel-size is not supported with --method self-train: the "
                                 "fine-tune sees the new lab's cells as the source run saw "
                                 "its own. Leave it out, or adapt with --method batch-norm.")
        if args.resume and given:
            raise LeukotreeError(f"A resumed self-training keeps its options (its "
                                 f"config.yaml in {args.out}); leave out {', '.join(given)}.")
        report = self_train(args.run, args.inputs, args.out, **common, resume=args.resume,
                            **{k: v for k, v in tuning.items() if v is not None})
        labelled = ", ".join(f"{k} {v}" for k, v in report["pseudo_labelled"].items())
        flagged = report["flagged_unclassifiable"]
        say(console, f"self-trained on {sum(report['pseudo_labelled'].values())} of "
            f"{report['n_cells']} cells ({labelled}; "
            + ("the model has no out-of-distribution score: no cell was left out as "
               "unlike its training cells" if flagged is None else
               f"{flagged} flagged unclassifiable, not labelled") + f"); wrote {args.out}")
        if report["in_source_run"]:
            say(console, f"{report['in_source_run']} of the given images are the source "
                "run's own training or validation images: left out", "yellow")
    else:
        if given or args.resume:
            raise LeukotreeError(f"{', '.join(given + ['--resume'] * args.resume)} only apply "
                                 "to --method self-train (the default); batch-norm adaptation "
                                 "trains nothing.")
        report = adapt(args.run, args.inputs, args.out, pixel_size=args.pixel_size, **common)
        say(console, f"adapted {report['batch_norm_layers']} batch-norm layers to "
            f"{report['n_cells']} cells; wrote {args.out}")
    for error in report["unreadable"]:
        say(console, f"unreadable: {error}", "red")
    return EXIT_SOME_INPUTS_FAILED if report["unreadable"] else EXIT_OK


def cmd_ensemble(args: argparse.Namespace) -> int:
    from leukotree.inference.loader import make_ensemble

    predictor = make_ensemble(args.runs, args.out)
    say(stderr_console(), f"wrote {args.out}: {predictor.engine.split(' (')[0]} runs of "
        f"taxonomy '{predictor.taxonomy.name}', averaged; give it to predict, evaluate, "
        "report or serve like a run folder")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from leukotree.evaluation.compare import COMPARISON_MD, compare
    from leukotree.rundir import read_text

    compare(args.folders, args.out, n_boot=args.bootstrap, select_by=args.select_by)
    say(stdout_console(), read_text(args.out / COMPARISON_MD, "Comparison"))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from leukotree.evaluation.evaluate import EvalSettings, check_settings, evaluate
    from leukotree.inference.loader import load
    from leukotree.inference.options import InferenceOptions
    from leukotree.rundir import EvalDir, read_text

    settings = EvalSettings(threshold=args.threshold,
                            target_sensitivity=args.target_sensitivity,
                            positive=args.positive, progress=not args.no_progress)
    check_settings(settings)
    options = InferenceOptions.from_args(args)
    where = EvalDir(args.out)
    data = args.data
    if data is None:  # the run's validation images; a CV fold's test images
        run = load(args.run).run_dir("; give the DATA to evaluate on.")
        data = run.write_val_manifest(where.validation, part=run.test_part())
    metrics = evaluate(args.run, data, args.out, options, settings, patients=args.patients,
                       labels=args.labels)
    console = stdout_console()
    say(console, read_text(where.markdown, "Metrics report"))
    say(console, f"wrote {where.metrics} ({metrics['n_images']} images)")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from leukotree.calibrate.run import calibrate_run, describe

    console = stderr_console()
    report = calibrate_run(args.run, args.data, args.out, patients=args.patients,
                           labels=args.labels, ood_quantile=args.ood_quantile,
                           coverage=args.coverage, conformal=args.conformal,
                           batch_size=args.batch_size, workers=args.workers,
                           progress=not args.no_progress, **_max_pixels(args),
                           log=lambda text: say(console, text, "dim"))
    out = stdout_console()
    for line in describe(report):
        say(out, line)
    say(out, f"wrote {args.out}: use it as a run folder (predict, evaluate, report, serve)")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses
    import ipaddress
    import os

    from leukotree.inference.options import InferenceOptions
    from leukotree.optional import require

    for module in ("fastapi", "python_multipart", "jinja2"):
        require(module, extra="serve", purpose="leukotree serve")
    from leukotree.lab.gate import GateRule
    from leukotree.lab.jobs import LabSettings
    from leukotree.serve.app import ServeSettings, create_app, default_store
    from leukotree.serve.store import Store
    from leukotree.serve.uploads import Limits
    from leukotree.serve.worker import Models

    uvicorn = require("uvicorn", extra="serve", purpose="leukotree serve")
    token = args.token or os.environ.get("LEUKOTREE_TOKEN") or None
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and token is None:
        raise LeukotreeError(f"--host {args.host} opens the app to the network: give --token "
                             "(or LEUKOTREE_TOKEN) so that every request must carry it.")
    store = Store(args.store or default_store())  # refuses an unusable store
    store.hold()  # one server per store: refuses with the holder's pid and host
    limits = Limits(args.max_files, args.max_bytes, args.max_pixels or Limits().max_pixels,
                    args.max_file_bytes)
    hosts = tuple(args.allowed_host or ())
    if args.host not in ("0.0.0.0", "::", ""):
        hosts += (args.host,)
    # the worker decodes with the upload limit's pixel bound, as the upload was checked
    options = dataclasses.replace(InferenceOptions.from_args(args, SERVE_INFERENCE),
                      max_pixels=limits.max_pixels)
    lab = LabSettings(epochs=args.train_epochs, min_reviews=args.min_reviews,
                      auto_promote=args.auto_promote,
                      gate=GateRule(tolerance=args.gate_tolerance))
    app = create_app(Models(args.runs, options), store,
                     ServeSettings(token, limits, args.confidence, args.aggregate, hosts, lab))
    say(stderr_console(), f"serving {len(args.runs)} model(s) on http://{args.host}:{args.port} "
        f"(store {store.root}){'' if token is None else '; a token is required'}")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return EXIT_OK


def cmd_synth(args: argparse.Namespace) -> int:
    from leukotree.data.synth import generate
    from leukotree.taxonomy import load_taxonomy

    n = generate(
        args.out, load_taxonomy(args.taxonomy),
        patients_per_class=args.patients_per_class, cells_per_patient=args.cells_per_patient,
        size=args.size, seed=args.seed, inner_fraction=args.inner_fraction,
        image_format=args.format, progress=not args.no_progress,
    )
    say(stdout_console(), f"wrote {n} images to {args.out}")
    return 0


def cmd_taxonomy(args: argparse.Namespace) -> int:
    from leukotree.taxonomy import builtin_taxonomies, load_taxonomy

    if args.name is None:
        for name in builtin_taxonomies():
            tax = load_taxonomy(name)
            print(f"{name:12s} {len(tax.leaves)} leaves, depth {tax.max_depth}, "
                  f"{tax.kind}: {tax.description}")
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


def number(kind: type, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float | int]:
    """An argparse ``type``: ``kind`` (int or float) within ``[low, high]`` (an open end
    with ``low_open``/``high_open``), finite; the message states the rule and the value."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind.__name__}; got {text!r}") from None
        bad = (not math.isfinite(value)
               or (low is not None and (value < low or (low_open and value == low)))
               or (high is not None and (value > high or (high_open and value == high))))
        if bad:
            lo = "-inf" if low is None else f"{low:g}"
            hi = "inf" if high is None else f"{high:g}"
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}; "
                f"got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


POSITIVE = number(int, 1)
COUNT = number(int, 0)
PROBABILITY = number(float, 0, 1)
HALF = number(float, 0, 0.5, high_open=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leukotree",
        description="Hierarchical leukemia classification from blood smear images.",
    )
    parser.add_argument("--version", action="version", version=f"leukotree {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_parsers(sub)
    _add_training_parsers(sub)
    _add_predict_parser(sub)
    _add_select_parser(sub)
    _add_explain_report_export_parsers(sub)
    _add_eval_parser(sub)
    _add_calibrate_parser(sub)
    _add_serve_parser(sub)
    _add_other_parsers(sub)
    return parser


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
    p.add_argument("--workers", type=POSITIVE, default=2,
                   help="image-reading threads (default 2)")
    _add_max_pixels(p)


def _add_max_pixels(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-pixels", type=POSITIVE, default=None,
                   help="refuse images larger than this many pixels (default 60,000,000; a "
                        "decompression-bomb guard)")


def _add_data_parsers(sub: argparse._SubParsersAction) -> None:
    from leukotree.data.images import STAIN_NORMS

    data = sub.add_parser("data", help="check and split data sets, and check their colours")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    check = data_sub.add_parser("check", help="report counts, unreadable files, duplicates...")
    _add_data_args(check)
    check.add_argument("--min-size", type=COUNT, default=64,
                       help="flag images whose shorter side is below this (default 64)")
    check.add_argument("--min-images-per-patient", type=COUNT, default=4,
                       help="flag patients with fewer images (default 4, as the seed paper)")
    check.add_argument("--near-duplicate-distance", type=number(int, 0, 63), default=4,
                       help="pHash Hamming distance counted as near duplicate (default 4)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--out", type=Path, help="also write the JSON report to this file")
    check.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    check.set_defaults(func=cmd_data_check)

    split = data_sub.add_parser("split", help="patient-grouped stratified folds")
    _add_data_args(split)
    split.add_argument("--folds", type=COUNT, default=5,
                       help="number of cross-validation folds (0: one train/val/test split)")
    split.add_argument("--val", type=HALF, default=0.0,
                       help="validation fraction (--folds 0)")
    split.add_argument("--test", type=HALF, default=0.0,
                       help="held-out test fraction (before folds, or with --folds 0)")
    split.add_argument("--seed", type=COUNT, default=0)
    split.add_argument("--out", type=Path, required=True, help="CSV to write")
    split.add_argument("--min-images-per-patient", type=COUNT, default=0,
                       help="drop patients with fewer images (the paper uses 4)")
    split.add_argument("--drop-duplicates", choices=["none", "exact", "near"], default="none",
                       help="drop exact (same bytes) or near (pHash) duplicates, keeping one")
    split.add_argument("--min-size", type=COUNT, default=0,
                       help="drop images whose shorter side is below this many pixels")
    split.add_argument("--json", action="store_true", help="print a JSON summary")
    split.set_defaults(func=cmd_data_split)

    colour = data_sub.add_parser(
        "colour", help="do the slides' colours alone tell the labels apart? (per patient, "
                       "before any model)")
    _add_data_args(colour)
    colour.add_argument("--features", choices=["stats", "parts"], default="stats",
                        help="stats: each image's L*a*b* means and deviations (default); "
                             "parts: the colour of its brightest and darkest tenth (plasma "
                             "and nucleus), which a per-image normalisation keeps")
    colour.add_argument("--stain-norm", choices=STAIN_NORMS, default="none",
                        help="normalise each image first as a model with this option does")
    colour.add_argument("--cell-labels", default=None,
                        help="where each image's cell type is: column:<name> of the "
                             "manifest or re:<regex>")
    colour.add_argument("--cell-taxonomy", default=None,
                        help="the cell types' taxonomy (e.g. jhh-cells)")
    colour.add_argument("--cell-types", default=None,
                        help="only images of these cell types (comma list of nodes, e.g. "
                             "lymphoid,neutrophil: cells that do not show the disease)")
    colour.add_argument("--size", type=POSITIVE, default=96,
                        help="image side the colours are read at (default 96)")
    colour.add_argument("--repeats", type=POSITIVE, default=10,
                        help="repeats of the out-of-fold logistic regression (5 folds, "
                             "fewer when a label has fewer patients; default 10)")
    colour.add_argument("--seed", type=COUNT, default=0)
    colour.add_argument("--json", action="store_true", help="print the result as JSON")
    colour.add_argument("--out", type=Path, help="also write the JSON result to this file")
    colour.set_defaults(func=cmd_data_colour)


def _add_train_args(tr: argparse.ArgumentParser, skip: frozenset[str] | set[str] = frozenset(),
                    ) -> None:
    """The data, run folder and config-file arguments, then one flag per training option
    (generated from :class:`~leukotree.engine.config.TrainConfig`)."""
    from leukotree.engine.config import PRESETS, add_config_arguments

    tr.add_argument("data", type=Path, help="folder DATA/<label>/**/<image> or CSV manifest")
    tr.add_argument("--out", type=Path, required=True, help="run folder")
    tr.add_argument("--config", type=Path, help="YAML file of options (flags override it)")
    tr.add_argument("--preset", help=f"named recipe: {', '.join(PRESETS)}")
    tr.add_argument("--no-progress", action="store_true")
    add_config_arguments(tr, skip=skip, short={"taxonomy": "-t"})


def _add_training_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser("train", help="train a classifier into a run folder")
    _add_train_args(tr)
    tr.add_argument("--resume", action="store_true", help="continue an interrupted run")
    tr.set_defaults(func=cmd_train)

    cv = sub.add_parser("cv", help="patient-grouped cross-validation: train and evaluate "
                                   "every fold (resumes a half-finished CV)")
    _add_train_args(cv, skip={"fold", "folds", "fold_groups"})
    cv.add_argument("--folds", dest="folds_cv", type=number(int, 2), default=5,
                    help="number of folds")
    cv.add_argument("--repeats", type=number(int, 1, 100), default=1,
                    help="repeat the CV with other patient folds (seed + repeat), e.g. 3")
    cv.add_argument("--protocol", default="kfold",
                    help="kfold (patient-grouped stratified folds), repeated (the same "
                         "--repeats times, with the spread), cluster (leave-cluster-out: "
                         "patients clustered by colour and cell mix, one cluster held out per "
                         "fold, a simulated new cohort), colour / colour-swap (the kfold "
                         "models scored again on their test patients recoloured to their "
                         "training patients' average colour / to the other diagnoses' colour: "
                         "what the model owed to colour; no training), stain / stain-swap "
                         "(the same, moving the colour of the nuclei and of the plasma apart, "
                         "which a per-image stain normalisation keeps), or a comma list such "
                         "as kfold,colour,cluster (each CV trained in turn: the cost adds up; "
                         "the estimates side by side) (default kfold)")
    add_inference_arguments(cv, CV_INFERENCE)
    cv.set_defaults(func=cmd_cv, fold=None, folds=None, fold_groups=None)

    ens = sub.add_parser("ensemble", help="average several trained runs (e.g. one recipe "
                                          "trained with several seeds) as one model")
    ens.add_argument("runs", type=Path, nargs="+", help="run folders (or their best.pt), at "
                                                        "least 2, of one taxonomy and size")
    ens.add_argument("--out", type=Path, required=True,
                     help="new folder for the ensemble (it lists the runs; keep them)")
    ens.set_defaults(func=cmd_ensemble)

    cmp = sub.add_parser("compare", help="put CV results of several models side by side")
    cmp.add_argument("folders", type=Path, nargs="+", help="folders written by 'leukotree cv'")
    cmp.add_argument("--out", type=Path, required=True)
    cmp.add_argument("--bootstrap", type=number(int, 10, 1_000_000), default=1000,
                     help="patient-bootstrap resamples for confidence intervals")
    cmp.add_argument("--select-by", default="accuracy",
                     help="fold metric of the one-standard-error choice: the simplest model "
                          "(folders given simplest first) whose mean is within one standard "
                          "error of the best, e.g. accuracy, patient_auroc (default accuracy)")
    cmp.set_defaults(func=cmd_compare)


def _add_predict_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="predict images, folders or manifests")
    pr.add_argument("run", type=Path, help="run folder, its best.pt, or an exported .onnx")
    pr.add_argument("inputs", nargs="+", help="images, folders or CSV manifests")
    pr.add_argument("--out", type=Path, help="CSV of per-image predictions")
    pr.add_argument("--json", action="store_true", help="print the predictions as JSON")
    pr.add_argument("--patients", default="auto",
                    help="patient ids: auto (default: a manifest's patient column; in a "
                         "folder C-NMC names, else the folder rule), none, folder (the first "
                         "folder level below a given folder or its label folders; a file's "
                         "parent folder), cnmc, manifest, re:<regex>")
    pr.add_argument("--by-patient", action="store_true",
                    help="also one diagnosis per patient (<out>_patients.csv)")
    add_inference_arguments(pr, ["aggregate", "min_cells", "confidence", "informative_cells",
                                 "min_informative_cells", "patient_interval"])
    pr.add_argument("--target-error", type=number(float, 0, 1, low_open=True),
                    help="set the per-level thresholds on the run's validation split so that "
                         "accepted decisions err at most this often")
    pr.add_argument("--decode", choices=["argmax", "greedy"], default="argmax",
                    help="leaf choice: most probable leaf, or greedy top-down")
    add_inference_arguments(pr, ["coverage", "conformal", "tta", "engine", "batch_size",
                                 "workers", "crop_mode", "pixel_size", "max_pixels"])
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_predict)


def _add_select_parser(sub: argparse._SubParsersAction) -> None:
    from leukotree.lab.select import AUDIT_SHARE, POLICIES

    se = sub.add_parser("select", help="choose the cells worth a technologist's review (an "
                                       "active-learning queue with a random audit share)")
    se.add_argument("run", type=Path, help="run folder, its best.pt, or an exported .onnx")
    se.add_argument("inputs", nargs="+", help="the candidate cells: images, folders or CSV "
                                              "manifests (as predict reads them)")
    se.add_argument("--n", type=POSITIVE, required=True, help="cells to choose")
    se.add_argument("--out", type=Path, required=True,
                    help="CSV to write: path,reason,audit,predicted_leaf,p,ood_score,patient,"
                         "score")
    se.add_argument("--policy", choices=list(POLICIES), default="active",
                    help="active (default): uncertainty and out-of-distribution score, spread "
                         "over predicted classes and patients; uncertainty; ood; random")
    se.add_argument("--audit-share", type=number(float, 0, 1, high_open=True),
                    default=AUDIT_SHARE,
                    help=f"share of the N cells drawn uniformly at random and marked audit "
                         f"(never train on them: they are the lab's unbiased test set; "
                         f"default {AUDIT_SHARE})")
    se.add_argument("--seed", type=COUNT, default=0)
    se.add_argument("--exclude", type=Path, metavar="DONE.csv",
                    help="CSV with a 'path' column of cells already reviewed (e.g. earlier "
                         "queues): never chosen again")
    se.add_argument("--patients", default="auto",
                    help="patient ids (to spread the queue over patients), as for predict")
    add_inference_arguments(se, ["engine", "batch_size", "workers", "crop_mode", "pixel_size",
                                 "tta", "max_pixels"])
    se.add_argument("--no-progress", action="store_true")
    se.set_defaults(func=cmd_select)


def _add_explain_report_export_parsers(sub: argparse._SubParsersAction) -> None:
    xp = sub.add_parser("explain", help="Grad-CAM heat maps for each level of the tree")
    xp.add_argument("run", type=Path, help="run folder (or its best.pt)")
    xp.add_argument("images", nargs="+", type=Path)
    xp.add_argument("--out", type=Path, required=True, help="folder for the overlays")
    xp.add_argument("--node", help="node(s) to explain, comma-separated (default: every level "
                                   "of the predicted path)")
    xp.add_argument("--method", default="gradcam",
                    help="gradcam, gradcam++, xgradcam, layercam, eigencam or hirescam")
    xp.add_argument("--target-layer", help="dotted module name (default: picked per backbone)")
    add_inference_arguments(xp, ["crop_mode", "pixel_size"])
    xp.set_defaults(func=cmd_explain)

    rp = sub.add_parser("report", help="one self-contained HTML report for one patient")
    rp.add_argument("run", type=Path, help="run folder (or its best.pt)")
    rp.add_argument("inputs", nargs="+", help="the patient's images, folder or manifest")
    rp.add_argument("--out", type=Path, required=True, help="HTML file to write")
    rp.add_argument("--patient", help="patient id shown in the report")
    add_inference_arguments(rp, ["aggregate", "confidence", "min_cells", "informative_cells",
                                 "min_informative_cells", "patient_interval"],
                            defaults={"confidence": REPORT_CONFIDENCE})
    rp.add_argument("--top-cells", type=number(int, 0, 1000), default=8,
                    help="cells shown with heat maps")
    rp.add_argument("--no-heatmaps", action="store_true")
    add_inference_arguments(rp, ["crop_mode", "pixel_size", "max_pixels"])
    rp.add_argument("--no-progress", action="store_true")
    rp.set_defaults(func=cmd_report)

    ad = sub.add_parser("adapt", help="adapt a model to another lab's cells, without labels "
                                      "(self-training on its surest labels of them, or "
                                      "batch-norm statistics re-estimated on them)")
    ad.add_argument("run", type=Path, help="run folder (or its best.pt)")
    ad.add_argument("inputs", nargs="+", help="the new lab's images, folders or manifests "
                                              "(labels are not read)")
    ad.add_argument("--out", type=Path, required=True, help="new folder for the adapted run")
    ad.add_argument("--method", choices=("self-train", "batch-norm"), default="self-train",
                    help="self-train: label the cells with the model and fine-tune on its "
                         "surest labels, replaying the run's training images (minutes; "
                         "needs the run's split.csv); batch-norm: re-estimate batch-norm "
                         "statistics only (AdaBN, seconds; on the cross-lab benchmark it "
                         "lowered the cpu-fast model's accuracy)")
    ad.add_argument("--keep", type=number(float, 0, 1, low_open=True),
                    help="self-train: share of each predicted class's cells (not flagged "
                         "unclassifiable) labelled, the most probable first (default 0.5)")
    ad.add_argument("--epochs", type=POSITIVE, help="self-train: epochs (default 5)")
    ad.add_argument("--lr", type=number(float, 0, 10, low_open=True),
                    help="self-train: learning rate (default: a quarter of the run's own; "
                         "cpu-fast 5e-4)")
    add_inference_arguments(ad, ["batch_size", "workers", "pixel_size"], helps={
        "batch_size": "images per batch when reading the new cells (self-train: the "
                      "fine-tune keeps the run's own batch size)",
        "pixel_size": "batch-norm: micrometres per pixel of the new lab's images (the "
                      "adapted run then decodes images at this pixel size unless told "
                      "otherwise)"})
    ad.add_argument("--resume", action="store_true",
                    help="self-train: finish a self-training that stopped in --out (its "
                         "labels and options kept; the inputs are not read again)")
    _add_max_pixels(ad)
    ad.add_argument("--no-progress", action="store_true")
    ad.set_defaults(func=cmd_adapt)

    ex = sub.add_parser("export", help="export a model (and its tree of probabilities) to ONNX")
    ex.add_argument("run", type=Path, help="run folder (or its best.pt)")
    ex.add_argument("--onnx", type=Path, required=True, help="ONNX file to write")
    ex.add_argument("--opset", type=number(int, 13, 23), default=17)
    ex.set_defaults(func=cmd_export)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="metrics, tables and plots of a model on data")
    ev.add_argument("run", type=Path, help="run folder (or its best.pt)")
    ev.add_argument("data", type=Path, nargs="?",
                    help="folder DATA/<label>/**/<image> or CSV manifest (default: the run's "
                         "validation images, from its split.csv; a CV fold's test images)")
    ev.add_argument("--out", type=Path, required=True, help="folder for metrics and plots")
    ev.add_argument("--patients", default="auto")
    ev.add_argument("--labels", default="folder")
    ev.add_argument("--threshold", type=PROBABILITY,
                    help="binary decision threshold on P(positive)")
    ev.add_argument("--target-sensitivity", type=number(float, 0, 1, low_open=True),
                    help="pick the binary threshold reaching this sensitivity on the run's "
                         "validation split")
    ev.add_argument("--positive", help="positive leaf of a two-leaf taxonomy (default: first)")
    add_inference_arguments(ev, ["aggregate", "min_cells", "tta", "batch_size", "workers",
                                 "crop_mode", "pixel_size", "max_pixels"])
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=cmd_evaluate)


def _add_calibrate_parser(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("calibrate", help="fit a run's temperatures and out-of-distribution "
                        "threshold again on labelled cells (e.g. a new lab's), into a new "
                        "run folder")
    ca.add_argument("run", type=Path, help="run folder (or its best.pt); a trained or "
                    "batch-norm-adapted run")
    ca.add_argument("data", type=Path, help="labelled cells: folder DATA/<label>/**/<image> "
                    "or CSV manifest")
    ca.add_argument("--out", type=Path, required=True,
                    help="new run folder for the calibrated copy (the run is left as it was)")
    ca.add_argument("--patients", default="auto")
    ca.add_argument("--labels", default="folder")
    ca.add_argument("--ood-quantile", type=number(float, 0, 1, low_open=True, high_open=True),
                    help="share of these cells kept below the out-of-distribution threshold "
                         "(default: the run's own, 0.95 unless trained otherwise)")
    ca.add_argument("--coverage", type=number(float, 0, 1, low_open=True, high_open=True),
                    help="fit conformal answers on these cells at this coverage (default: "
                         "the run's own, when it was trained with --coverage)")
    ca.add_argument("--conformal", choices=["marginal", "mondrian"],
                    help="conformal answers' guarantee: over all cells or for every class "
                         "(default: the run's own, else marginal)")
    ca.add_argument("--batch-size", type=POSITIVE, default=64)
    ca.add_argument("--workers", type=POSITIVE, default=2)
    _add_max_pixels(ca)
    ca.add_argument("--no-progress", action="store_true")
    ca.set_defaults(func=cmd_calibrate)


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    sv = sub.add_parser("serve", help="the lab's web app: upload a patient's cells, review, "
                                      "sign out (needs the serve extra)")
    sv.add_argument("runs", nargs="+", help="run folders, .pt or .onnx files, or cv folders")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sv.add_argument("--port", type=number(int, 1, 65535), default=8000)
    sv.add_argument("--store", type=Path,
                    help="folder of the database and images (default: "
                         "$XDG_DATA_HOME/leukotree/serve)")
    sv.add_argument("--token", help="require this token (Bearer header or login); required "
                                    "off 127.0.0.1; also read from LEUKOTREE_TOKEN")
    add_inference_arguments(sv, SERVE_INFERENCE, defaults={"confidence": REPORT_CONFIDENCE})
    sv.add_argument("--max-files", type=POSITIVE, default=2000, help="files per case")
    sv.add_argument("--max-bytes", type=POSITIVE, default=500 * 2**20,
                    help="bytes per case, counting what zip archives unpack to (default "
                         "524,288,000)")
    sv.add_argument("--max-file-bytes", type=POSITIVE, default=64 * 2**20,
                    help="bytes per file or zip member, unpacked (default 67,108,864)")
    sv.add_argument("--allowed-host", action="append", metavar="NAME",
                    help="a host name users reach the server under (repeat for more); "
                         "loopback names and --host are allowed, any other Host header is "
                         "refused (DNS rebinding); '*' allows any")
    _add_max_pixels(sv)
    lab = sv.add_argument_group("the lab loop (reviewed cells train the next model of the "
                                "first RUN, a run folder)")
    lab.add_argument("--auto-promote", action="store_true",
                     help="promote a trained candidate as soon as the gate passes (default: "
                          "a reviewer promotes it on the models page)")
    lab.add_argument("--train-epochs", type=number(int, 1, 1000), default=5,
                     help="epochs of each fine-tune (default 5)")
    lab.add_argument("--min-reviews", type=number(int, 1), default=20,
                     help="reviewed non-audit cells a training needs (default 20)")
    lab.add_argument("--gate-tolerance", type=number(float, 0, 1), default=0.02,
                     help="largest drop of accuracy on the source run's validation images "
                          "a candidate may show (default 0.02: two points)")
    sv.set_defaults(func=cmd_serve)


def _add_other_parsers(sub: argparse._SubParsersAction) -> None:
    synth = sub.add_parser("synth", help="write synthetic smear-like images")
    synth.add_argument("out", type=Path)
    synth.add_argument("--taxonomy", "-t", default="leukemia7")
    synth.add_argument("--patients-per-class", type=number(int, 1, 100_000), default=6)
    synth.add_argument("--cells-per-patient", type=number(int, 1, 100_000), default=20)
    synth.add_argument("--size", type=number(int, 16, 4096), default=96,
                       help="image side in pixels")
    synth.add_argument("--seed", type=COUNT, default=0)
    synth.add_argument("--inner-fraction", type=PROBABILITY, default=0.0,
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
    demo.add_argument("--folds", type=number(int, 2, 20), default=3)
    demo.add_argument("--seed", type=COUNT, default=0)
    demo.add_argument("--epochs", type=POSITIVE, help="epochs per fold (default 12)")
    demo.add_argument("--img-size", type=number(int, 16, 1024),
                      help="image side in pixels (default 64)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one clear message and exit with code 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LeukotreeError as err:
        print_error(stderr_console(), str(err))
        return EXIT_USER_ERROR
    except OSError as err:  # a file system refusal: full disk, permissions, a file in the way
        where = f" '{err.filename}'" if err.filename else ""
        print_error(stderr_console(), f"cannot write or read{where}: {err.strerror or err}. "
                    "Check the path, its permissions and the free disk space.")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        say(stderr_console(), "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
