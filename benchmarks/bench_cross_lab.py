"""Another lab's cells: a model trained on PBC (Barcelona) tested on Johns Hopkins cells of
the same types; prints JSON and writes OUT/cross_lab.md.

    python benchmarks/bench_cross_lab.py --out bench-out/cross-lab \
        [--pbc ../shared/data/pbc-dev] [--jhh ../shared/data/apl-aml-discovery] \
        [--preset cpu-fast] [--set key=value ...] [--test-fraction 0.2] [--run RUN]

1. Splits the PBC images into a held-out in-lab test part (``--test-fraction``,
   stratified by class, seed 0) and a development part; trains ``--preset`` (plus any
   ``--set`` overrides, e.g. ``--set calibrate=false``) on the development part, whose
   own validation split fits the calibration and the out-of-distribution threshold.
   ``--run`` reuses a run trained this way instead.
2. Builds manifests (absolute paths, nothing copied) of the Johns Hopkins cells whose
   technologist-signed ``cell_type`` has a PBC class (segmented/band neutrophils ->
   neutrophil; myelocyte, metamyelocyte, promyelocyte -> ig; giant thrombocyte ->
   platelet; lymphocyte, monocyte, eosinophils, basophil, erythroblast by name) and of
   the cells of types the model never saw (blasts, smudge cells, variant lymphocytes...).
3. Adapts the model to all Johns Hopkins cells without their labels (``leukotree
   adapt --method batch-norm``: batch-norm statistics re-estimated; ``--no-adapt`` skips
   it); self-trains it on every cell of half of the patients (``adapt``, labels unread;
   ``--no-self-train`` skips it) and tests that on the other half; and fine-tunes
   the trained model (``train --init``) on at most ``--labelled-per-class`` labelled
   cells per class drawn from half of the patients, replaying the PBC training images
   (``--replay``), and on the labelled cells alone, and the self-trained model on them
   with replay; tests each on the other half, and on the held-out PBC cells (what the
   fine-tune forgot).
4. Evaluates in-lab (held-out PBC; also re-cropped tightly, as labs that export a
   120 px box around the cell do, with the model's centre crop and with
   ``--crop-mode auto``; and with a yellow colour cast, :data:`YELLOW_CAST`) and
   cross-lab (Johns Hopkins, mapped; before and after adaptation): accuracy, macro F1,
   leaf ECE before/after temperature scaling, the share of cells flagged
   unclassifiable and the accuracy of the cells kept; and, per unseen type, the share of
   cells flagged (the out-of-distribution catch rate).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from resultfile import add_json_option, write_results
from sklearn.metrics import roc_auc_score

from leukotree.data.images import is_image_file
from leukotree.engine.adapt import adapt, self_train
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.evaluation.evaluate import EvalSettings, evaluate
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.inference.predictor import predict_paths
from leukotree.rundir import RunDir

#: Johns Hopkins ``cell_type`` -> PBC class (../shared/data/README.md).
JHH_TO_PBC = {
    "segmented-neutrophils": "neutrophil", "band-neutrophils": "neutrophil",
    "myelocyte": "ig", "metamyelocyte": "ig", "promyelocyte": "ig",
    "giant-thrombocyte": "platelet", "lymphocyte": "lymphocyte", "monocyte": "monocyte",
    "eosinophils": "eosinophil", "basophil": "basophil", "erythroblast": "erythroblast",
}


def write_manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def pbc_split(pbc: Path, fraction: float, out: Path) -> tuple[Path, Path]:
    """Development and held-out test manifests of the PBC folder (stratified, seed 0)."""
    rng = np.random.default_rng(0)
    dev, test = [], []
    for folder in sorted(p for p in pbc.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if is_image_file(p))
        order = rng.permutation(len(files))
        n_test = round(fraction * len(files))
        for rank, k in enumerate(order):
            row = {"path": str(files[k].resolve()), "label": folder.name,
                   "patient": files[k].stem}  # PBC images are anonymous: one per "patient"
            (test if rank < n_test else dev).append(row)
    return (write_manifest(out / "pbc-dev.csv", dev), write_manifest(out / "pbc-test.csv", test))


def jhh_manifests(jhh: Path, out: Path) -> tuple[Path, dict[str, list[Path]]]:
    """The mapped Johns Hopkins cells (manifest) and the unseen types' files by type."""
    mapped, unseen = [], defaultdict(list)
    with (jhh / "manifest.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            path = (jhh / row["path"]).resolve()
            label = JHH_TO_PBC.get(row["cell_type"])
            if label is None:
                unseen[row["cell_type"]].append(path)
            else:
                mapped.append({"path": str(path), "label": label, "patient": row["patient"]})
    return write_manifest(out / "jhh-mapped.csv", mapped), dict(unseen)


def first_half(mapped: Path) -> set[str]:
    """Half of the Johns Hopkins patients (seed 0): the new lab's cells a model may adapt
    to, labelled or not; it is tested on the other half."""
    with mapped.open(newline="") as handle:
        patients = sorted({r["patient"] for r in csv.DictReader(handle)})
    return set(np.random.default_rng(0).permutation(patients)[:len(patients) // 2])


def heldout_half(mapped: Path, pool: set[str], out: Path) -> Path:
    """Manifest of the mapped cells of the patients not in ``pool``."""
    with mapped.open(newline="") as handle:
        held = [r for r in csv.DictReader(handle) if r["patient"] not in pool]
    return write_manifest(out / "jhh-heldout-patients.csv", held)


def self_trained(run: Path, pool: set[str], held: Path, jhh: Path, test_pbc: Path,
                 args: argparse.Namespace, options: InferenceOptions) -> dict:
    """``adapt`` (self-training) on every cell of the first half's patients (all types,
    blasts and smudges too; labels unread), tested on the other half's cells and on the
    held-out PBC cells; how many of its labels the technologists' cell types confirm, and
    the share of the other half's cells of unseen types flagged before and after."""
    with (jhh / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    cell_type = {str((jhh / r["path"]).resolve()): r["cell_type"] for r in rows}
    unlabelled = args.out / "jhh-first-half-unlabelled.csv"
    with unlabelled.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "patient"])
        writer.writerows([(jhh / r["path"]).resolve(), r["patient"]]
                         for r in rows if r["patient"] in pool)
    tuned = args.out / "self-trained"
    if not (tuned / RunDir.ADAPT).exists():
        shutil.rmtree(tuned, ignore_errors=True)
        self_train(run, [unlabelled], tuned, progress=False)
    report = json.loads((tuned / RunDir.ADAPT).read_text())
    with (tuned / RunDir.PSEUDO_LABELS).open(newline="") as handle:
        labelled = [(r["label"], cell_type[r["path"]]) for r in csv.DictReader(handle)]
    composition: dict[str, Counter] = defaultdict(Counter)
    for label, truth in labelled:
        composition[label][truth] += 1
    unseen = [(jhh / r["path"]).resolve() for r in rows
              if r["cell_type"] not in JHH_TO_PBC and r["patient"] not in pool]
    return {"self_training": {k: report[k] for k in ("n_cells", "flagged_unclassifiable",
                                                     "pseudo_labelled")}
            | {"labels_right": sum(JHH_TO_PBC.get(t) == lab for lab, t in labelled)
               / len(labelled),
               "labelled_cell_types": {k: dict(v.most_common(4))
                                       for k, v in composition.items()},
               "heldout_unseen_cells": len(unseen),
               "heldout_unseen_flagged_before": flagged_rate(run, unseen),
               "heldout_unseen_flagged_after": flagged_rate(tuned, unseen)},
            "cross_lab_jhh_heldout_self_trained": scored(
                tuned, held, args.out / "eval-jhh-heldout-self-trained", options),
            "in_lab_pbc_test_self_trained": scored(
                tuned, test_pbc, args.out / "eval-pbc-test-self-trained", options)}


def flagged_rate(run: Path, files: list[Path]) -> float:
    """Share of the readable ``files`` that the model of ``run`` flags unclassifiable."""
    predictor = load(run).predictor("torch")
    preds = predict_paths(predictor, files, progress=False)
    return float(preds.unclassifiable[preds.ok].mean())


def few_labels(run: Path, mapped: Path, pool: set[str], test: Path, test_pbc: Path,
               args: argparse.Namespace, options: InferenceOptions) -> dict:
    """Fine-tune the trained model on at most ``--labelled-per-class`` cells per class of
    half of the Johns Hopkins patients, replaying its PBC training images (``train --init
    RUN --replay RUN``), and on the labelled cells alone; test both on the other half's
    cells (``test``) and, for what the fine-tune made it forget, on the held-out PBC
    cells. (Fine-tuning the adapted model instead gives the same model:
    training re-estimates the batch-norm statistics that ``adapt`` set.)"""
    with mapped.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rng = np.random.default_rng(1)
    labelled = []
    for label in sorted({r["label"] for r in rows}):
        cells = [r for r in rows if r["label"] == label and r["patient"] in pool]
        labelled += [cells[k] for k in rng.permutation(len(cells))[:args.labelled_per_class]]
    few = write_manifest(args.out / "jhh-labelled.csv", labelled)
    result = {"labelled_cells": len(labelled),
              "heldout_patients": len({r["patient"] for r in rows} - pool)}
    # (tag, the model it starts from, replay): the result keys name both
    variants = [("fine_tuned", run, True), ("fine_tuned_no_replay", run, False)]
    if (args.out / "self-trained" / RunDir.ADAPT).exists():  # adapt, then the labels
        variants.append(("fine_tuned", args.out / "self-trained", True))
    for tag, init, replay in variants:
        start = "trained" if init == run else "self_trained"
        tag_in_lab = tag if init == run else f"{start}_{tag}"
        name = tag_in_lab.replace("_", "-")
        tuned = args.out / name
        # a few dozen validation cells cannot pick an epoch: keep the last one
        overrides = {"init": str(init), "lr": 5e-4, "val_fraction": 0.2, "patients": "none",
                     "balance": "none", "monitor": "last"}
        # the labelled cells alone: 15 short epochs; with the PBC images replayed
        # (each epoch about twice their number), 5
        overrides |= ({"replay": str(run), "epochs": 5, "warmup_epochs": 0.5} if replay
                      else {"epochs": 15, "warmup_epochs": 1.0})
        if not (tuned / "best.pt").exists():
            shutil.rmtree(tuned, ignore_errors=True)
            train(few, tuned, resolve_config(config_file=RunDir(run).config,
                                             overrides=overrides), progress=False)
        result[f"cross_lab_jhh_heldout_{start}_{tag}"] = scored(
            tuned, test, args.out / f"eval-jhh-heldout-{name}", options)
        result[f"in_lab_pbc_test_{tag_in_lab}"] = scored(tuned, test_pbc,
                                                  args.out / f"eval-pbc-test-{name}", options)
    return result


def tight_crops(test: Path, out: Path, side: int = 120, per_nucleus: float = 1.8) -> Path:
    """The held-out PBC cells re-cropped as some labs export them: a ``side`` px square of
    ``per_nucleus`` nucleus diameters around the nucleus (the cell fills the frame)."""
    from PIL import Image

    from leukotree.data.cells import find_cell

    rows = []
    with test.open(newline="") as handle:
        for row in csv.DictReader(handle):
            img = Image.open(row["path"]).convert("RGB")
            found = find_cell(img)
            cx, cy, d = found if found else (img.width / 2, img.height / 2, min(img.size) / 4)
            half = min(per_nucleus * d / 2, min(img.size) / 2)
            cx = float(np.clip(cx, half, img.width - half))  # the box stays in the image
            cy = float(np.clip(cy, half, img.height - half))
            target = out / "tight" / row["label"] / (Path(row["path"]).stem + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            img.resize((side, side), Image.Resampling.BILINEAR,
                       box=(cx - half, cy - half, cx + half, cy + half)).save(target)
            rows.append({**row, "path": str(target)})
    return write_manifest(out / "pbc-test-tight.csv", rows)


#: RGB gains of :func:`recoloured`: a yellow cast (less blue, a little less green), as a
#: yellow-stained smear or a camera's white balance gives.
YELLOW_CAST = (1.0, 0.93, 0.7)


def recoloured(test: Path, out: Path, gains: tuple[float, float, float] = YELLOW_CAST,
               ) -> Path:
    """The cells of the manifest ``test`` with their colours cast by per-channel ``gains``
    (the same cells and scanner; only the colour differs), as ``OUT/<name>-yellow.csv``."""
    from PIL import Image

    rows = []
    with test.open(newline="") as handle:
        for row in csv.DictReader(handle):
            img = np.asarray(Image.open(row["path"]).convert("RGB"), np.float32)
            cast = np.clip(img * np.array(gains, np.float32), 0, 255).round().astype(np.uint8)
            target = (out / f"{test.stem}-yellow" / row["label"]
                      / (Path(row["path"]).stem + ".png"))
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(cast).save(target)
            rows.append({**row, "path": str(target)})
    return write_manifest(out / f"{test.stem}-yellow.csv", rows)


def summary(metrics: dict) -> dict:
    cal = metrics.get("calibration", {})
    ood = metrics.get("ood") or {}
    return {"n": int(sum(r["support"] for r in metrics["per_class"].values())),
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "ece": cal.get("leaves", {}).get("ece"),
            "ece_uncalibrated": (cal.get("uncalibrated") or {}).get("ece"),
            "flagged_rate": ood.get("rate"), "accuracy_kept": ood.get("accuracy_kept"),
            "domain_shift_alarm": bool(ood.get("domain_shift")),
            "recall": {k: v["recall"] for k, v in metrics["per_class"].items()}}


def accuracy_ci(eval_dir: Path, data: Path, n_boot: int = 1000) -> list[float]:
    """95% percentile bootstrap interval of the accuracy, resampling patients (cells of
    one patient are not independent; a PBC image is its own "patient")."""
    with data.open(newline="") as handle:
        patient = {str(Path(r["path"]).resolve()): r["patient"] for r in csv.DictReader(handle)}
    with (eval_dir / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:  # every evaluated image is in the manifest
        groups[patient[str(Path(r["path"]).resolve())]].append(r["label"] == r["predicted"])
    right = np.array([sum(v) for v in groups.values()], float)
    count = np.array([len(v) for v in groups.values()], float)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(right), (n_boot, len(right)))
    acc = right[draws].sum(1) / count[draws].sum(1)
    return [float(np.percentile(acc, 2.5)), float(np.percentile(acc, 97.5))]


def scored(run: Path, data: Path, out: Path, options: InferenceOptions) -> dict:
    """:func:`summary` of ``evaluate`` (per image, no patient diagnosis), with the
    accuracy's patient-bootstrap interval."""
    result = summary(evaluate(run, data, out, options, EvalSettings(progress=False),
                             patients="none"))
    result["accuracy_ci"] = accuracy_ci(out, data)
    return result


def lab_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options of the benchmarks built on these two labs: where the output and the
    data are, and the training recipe (``--preset`` and ``--set`` overrides)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pbc", type=Path, default=Path("../shared/data/pbc-dev"))
    parser.add_argument("--jhh", type=Path, default=Path("../shared/data/apl-aml-discovery"))
    parser.add_argument("--preset", default="cpu-fast")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a training option over the preset (YAML value)")
    return parser


def main() -> None:
    parser = lab_arguments(__doc__)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--run", type=Path, help="a run already trained on OUT/pbc-dev.csv "
                                                 "(or a 'leukotree ensemble' of such runs: "
                                                 "with --no-adapt --no-self-train "
                                                 "--labelled-per-class 0)")
    parser.add_argument("--no-adapt", action="store_true",
                        help="skip leukotree adapt --method batch-norm")
    parser.add_argument("--no-self-train", action="store_true",
                        help="skip leukotree adapt (self-training)")
    parser.add_argument("--labelled-per-class", type=int, default=20,
                        help="fine-tune the trained model (with and without --replay) on "
                             "this many labelled cells per class of half the Johns Hopkins "
                             "patients (0: skip)")
    add_json_option(parser)
    args = parser.parse_args()
    # absolute: the manifests written under OUT name their images by full path (a relative
    # --out was joined twice when a manifest's paths were read from its own folder)
    args.out = args.out.resolve()
    import yaml

    args.out.mkdir(parents=True, exist_ok=True)
    dev, test = pbc_split(args.pbc, args.test_fraction, args.out)
    mapped, unseen = jhh_manifests(args.jhh, args.out)
    overrides = {"taxonomy": "pbc", "patients": "none"}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    result: dict[str, object] = {"preset": args.preset, "overrides": overrides}
    run = args.run
    if run is None:
        run = args.out / "run"
        start = time.perf_counter()
        train(dev, run, resolve_config(preset=args.preset, overrides=overrides))
        result["train_minutes"] = (time.perf_counter() - start) / 60
    result["run"] = str(run)
    options = InferenceOptions()
    result["in_lab_pbc_test"] = scored(run, test, args.out / "eval-pbc-test", options)
    result["cross_lab_jhh"] = scored(run, mapped, args.out / "eval-jhh", options)
    tight = tight_crops(test, args.out)
    auto = InferenceOptions(crop_mode="auto")
    result["tight_crops"] = scored(run, tight, args.out / "eval-tight", options)
    result["tight_crops_auto"] = scored(run, tight, args.out / "eval-tight-auto", auto)
    result["yellow_cast"] = scored(run, recoloured(test, args.out), args.out / "eval-yellow",
                                   options)
    # a lab that exports tight crops of yellow-stained smears
    result["tight_yellow_auto"] = scored(run, recoloured(tight, args.out),
                                         args.out / "eval-tight-yellow-auto", auto)
    result["in_lab_pbc_test_auto"] = scored(run, test, args.out / "eval-pbc-auto", auto)
    result["cross_lab_jhh_auto"] = scored(run, mapped, args.out / "eval-jhh-auto", auto)
    if not args.no_adapt:
        adapted = args.out / "adapted"
        if not (adapted / "adapt.json").exists():
            shutil.rmtree(adapted, ignore_errors=True)
            adapt(run, [args.jhh / "manifest.csv"], adapted, progress=False)
        result["cross_lab_jhh_adapted"] = scored(adapted, mapped, args.out / "eval-jhh-adapted",
                                                 options)
    if args.labelled_per_class > 0 or not args.no_self_train:
        pool = first_half(mapped)
        held = heldout_half(mapped, pool, args.out)
        result["cross_lab_jhh_heldout_trained"] = scored(run, held,
                                                         args.out / "eval-jhh-heldout", options)
    if not args.no_self_train:
        result |= self_trained(run, pool, held, args.jhh, test, args, options)
    if args.labelled_per_class > 0:
        result |= few_labels(run, mapped, pool, held, test, args, options)
    predictor = load(run).predictor("torch")
    catch: dict[str, dict[str, float]] = {}
    unseen_scores = []
    for cell_type, files in sorted(unseen.items(), key=lambda kv: -len(kv[1])):
        preds = predict_paths(predictor, files, progress=False)
        if preds.ood_score is None:
            break
        ok = preds.ok
        unseen_scores.append(preds.ood_score[ok])
        catch[cell_type] = {"n": int(ok.sum()),
                            "flagged_rate": float(preds.unclassifiable[ok].mean())}
        votes = Counter(predictor.taxonomy.leaves[i] for i in preds.leaf_probs[ok].argmax(1))
        catch[cell_type]["predicted_as"] = dict(votes.most_common(3))
    if catch:
        total = sum(c["n"] for c in catch.values())
        result["unseen_types"] = catch
        result["unseen_flagged_rate"] = sum(c["n"] * c["flagged_rate"]
                                            for c in catch.values()) / total
        # Within one lab: how well the score tells unseen types from the 8 known ones
        # (the flag rates above also count how unlike the training lab the images are).
        with mapped.open() as handle:
            known = predict_paths(predictor, [Path(r["path"]) for r in csv.DictReader(handle)],
                                  progress=False)
        a, b = known.ood_score[known.ok], np.concatenate(unseen_scores)
        result["ood_auroc_unseen_vs_known_jhh"] = float(roc_auc_score(
            np.r_[np.zeros(len(a)), np.ones(len(b))], np.r_[a, b]))
    (args.out / "cross_lab.json").write_text(json.dumps(result, indent=2))
    (args.out / "cross_lab.md").write_text(markdown(result))
    write_results(args, "cross_lab", result)
    print(json.dumps(result, indent=2))


def markdown(r: dict) -> str:
    def pct(v: object) -> str:
        return "n/a" if v is None else f"{100 * float(v):.1f}%"

    def ci(s: dict) -> str:
        low, high = s.get("accuracy_ci") or (None, None)
        return "" if low is None else f" [{100 * low:.1f}, {100 * high:.1f}]"

    lines = ["| test set | cells | accuracy [95% CI] | macro F1 | leaf ECE (before -> after) | "
             "flagged unclassifiable | accuracy of kept cells |", "|---|---|---|---|---|---|---|"]
    few = r.get("labelled_cells")
    for name, key in (("PBC, held out (same lab)", "in_lab_pbc_test"),
                      ("same, `--crop-mode auto`", "in_lab_pbc_test_auto"),
                      ("same cells re-cropped tightly (120 px, cell filling the frame)",
                       "tight_crops"),
                      ("same tight crops, `--crop-mode auto`", "tight_crops_auto"),
                      ("same cells with a yellow cast (RGB gains "
                       f"{', '.join(f'{g:g}' for g in YELLOW_CAST)})", "yellow_cast"),
                      ("tight crops with the yellow cast, `--crop-mode auto`",
                       "tight_yellow_auto"),
                      ("Johns Hopkins, same 8 types", "cross_lab_jhh"),
                      ("same, `--crop-mode auto`", "cross_lab_jhh_auto"),
                      ("Johns Hopkins, after `adapt --method batch-norm` (no labels)",
                       "cross_lab_jhh_adapted"),
                      ("Johns Hopkins, other half of the patients",
                       "cross_lab_jhh_heldout_trained"),
                      ("same, after `adapt` (self-training) on all cells of the first half "
                       "(no labels)", "cross_lab_jhh_heldout_self_trained"),
                      ("PBC held out, after that self-training", "in_lab_pbc_test_self_trained"),
                      (f"Johns Hopkins, other half, fine-tuned on {few} labelled cells of the "
                       "first half, replaying the PBC training images",
                       "cross_lab_jhh_heldout_trained_fine_tuned"),
                      ("PBC held out, after that fine-tune", "in_lab_pbc_test_fine_tuned"),
                      (f"Johns Hopkins, other half, fine-tuned on the {few} cells alone",
                       "cross_lab_jhh_heldout_trained_fine_tuned_no_replay"),
                      ("PBC held out, after that fine-tune",
                       "in_lab_pbc_test_fine_tuned_no_replay"),
                      (f"Johns Hopkins, other half, `adapt` then fine-tuned on the {few} "
                       "cells, replaying the PBC training images",
                       "cross_lab_jhh_heldout_self_trained_fine_tuned"),
                      ("PBC held out, after both", "in_lab_pbc_test_self_trained_fine_tuned")):
        if key not in r:
            continue
        s = r[key]
        ece = (f"{s['ece_uncalibrated']:.3f} -> {s['ece']:.3f}"
               if s["ece_uncalibrated"] is not None else f"{s['ece']:.3f}")
        lines.append(f"| {name} | {s['n']} | {pct(s['accuracy'])}{ci(s)} | {pct(s['macro_f1'])} | "
                     f"{ece} | {pct(s['flagged_rate'])} | {pct(s['accuracy_kept'])} |")
    if "unseen_types" in r:
        lines += ["", "| cell type never seen in training | cells | flagged unclassifiable |",
                  "|---|---|---|"]
        lines += [f"| {t} | {c['n']} | {pct(c['flagged_rate'])} |"
                  for t, c in r["unseen_types"].items()]
        lines.append(f"| all unseen types | {sum(c['n'] for c in r['unseen_types'].values())}"
                     f" | {pct(r['unseen_flagged_rate'])} |")
    if "labels_right" in r.get("self_training", {}):
        st = r["self_training"]
        lines += ["", f"Self-training: {sum(st['pseudo_labelled'].values())} of "
                  f"{st['n_cells']} cells labelled, {pct(st['labels_right'])} of the labels "
                  "right by the technologists' cell types; of the other half's "
                  f"{st['heldout_unseen_cells']} cells of unseen types, "
                  f"{pct(st['heldout_unseen_flagged_before'])} flagged before, "
                  f"{pct(st['heldout_unseen_flagged_after'])} after."]
    if "ood_auroc_unseen_vs_known_jhh" in r:
        lines += ["", "AUROC of the out-of-distribution score, unseen types against the eight "
                  f"known types of the same lab: {r['ood_auroc_unseen_vs_known_jhh']:.3f}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
