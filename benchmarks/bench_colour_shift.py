"""What a patient recipe owes to colour: for each recipe, the patient-grouped k-fold CV and
its fold models scored again on their test patients recoloured
(``leukotree cv --protocol kfold,colour,colour-swap,stain,stain-swap``); prints JSON.

    python benchmarks/bench_colour_shift.py DATA --config examples/apl-aml.yaml \
        --recipe as-is --recipe reinhard:stain_norm=reinhard \
        [--folds 3] [--fold-val-fraction 0] [--batch-cells lymphoid,neutrophil,smudge-cell] \
        --out bench-out/colour [--json FILE]

Each ``--recipe NAME[:KEY=VALUE[,KEY=VALUE...]]`` is the ``--config`` file with those
options over it (YAML values), cross-validated in ``OUT/NAME`` (resumed when half done:
finished folds are kept, so a CV run earlier by ``leukotree cv`` with the same options
can be moved there). For each: the pooled out-of-fold patients' AUROC (patient-bootstrap
95% CI) and accuracy of plain k-fold, ``colour`` (each test patient recoloured to its
training patients' average colour) and ``colour-swap`` (to the other diagnoses' colour),
``stain`` and ``stain-swap`` (the same for the colours of its nuclei and of its plasma,
which a per-image stain normalisation keeps), and the mean change of a patient's
P(positive) under each; once, how well the patients' mean colours alone tell the
diagnoses apart (``colour_only``), and their nuclei's and plasma's colours
(``stain_only``); and, with ``--batch-cells``, how well the colours of the plasma
and nuclei of cell types that do not show the disease tell the diagnoses apart, as the
images are and after a per-image Reinhard normalisation (``leukotree data colour``; a
batch of stain, not the disease, would show there). The same folds and fold models
serve every estimate: their differences are what the model owed to colour, not noise of
other splits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from resultfile import add_json_option, write_results

from leukotree.engine.config import resolve_config
from leukotree.errors import LeukotreeError
from leukotree.evaluation.cv import cross_validate
from leukotree.rundir import CVDir

#: The fold models' test patients recoloured: mean colour, then stain balance.
RECOLOURED = ("colour", "colour-swap", "stain", "stain-swap")
PROTOCOL = ",".join(("kfold", *RECOLOURED))
#: Where the separability of the colour features each protocol moves goes.
ALONE = {"stats": "colour_only", "parts": "stain_only"}


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:KEY=VALUE,...]`` -> the name and its options (YAML values)."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LeukotreeError(f"--recipe {spec!r}: each option is KEY=VALUE; got {item!r}.")
        overrides[key.strip()] = yaml.safe_load(value)
    if not name.strip():
        raise LeukotreeError(f"--recipe {spec!r}: give it a name, e.g. reinhard:{rest}")
    return name.strip(), overrides


def estimate(summary: dict[str, Any]) -> dict[str, Any]:
    """The first repeat's pooled patient figures of a CV summary."""
    pooled = (summary.get("patient_level") or [{}])[0]
    return {key: pooled.get(key) for key in ("n_patients", "auroc", "auroc_ci95", "accuracy",
                                              "sensitivity", "specificity")}


def kept_recipes(path: Path | None, results: dict[str, Any],
                 running: set[str]) -> dict[str, Any]:
    """The recipes of an earlier results file ``path`` to keep beside those ``running`` now:
    those of the same data, config and folds that are not run again, each with the
    ``measured`` block (date, commit, command) of the run that measured it. Nothing when
    the file is missing; a LeukotreeError when it holds other data, config or folds."""
    if path is None or not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        old = doc["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LeukotreeError(f"--json {path}: not a results file of this benchmark ({err}); "
                             "give another file or remove it.") from None
    def same(key: str) -> bool:
        if key in ("data", "config"):  # paths: the same file however written
            return Path(old[key]).resolve() == Path(results[key]).resolve()
        return old[key] == results[key]

    for key in ("data", "config", "folds", "fold_val_fraction"):
        if key in old and not same(key):
            raise LeukotreeError(
                f"--json {path}: its recipes were measured with {key} {old[key]!r}, this "
                f"command has {results[key]!r}; they cannot share one table. Give another "
                "file, or run every recipe again.")
    measured = {k: doc.get("meta", {}).get(k) for k in ("date", "commit", "command")}
    return {name: {"measured": measured} | row for name, row in old["recipes"].items()
            if name not in running}


def kept_batch(path: Path | None) -> dict[str, Any] | None:
    """The ``batch`` block of an earlier results file (see :func:`kept_recipes`)."""
    if path is None or not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["results"].get("batch")


def batch_colours(data: Path, config: Any, cell_types: str) -> dict[str, Any]:
    """``leukotree data colour --features parts --cell-types CELL_TYPES`` on the data as the
    recipe reads them (its taxonomy, patients, labels and cell labels), with stain
    normalisation ``none`` and ``reinhard``."""
    from leukotree.data.discover import discover
    from leukotree.evaluation.confound import colour_confound
    from leukotree.taxonomy import load_taxonomy

    if not config.cell_taxonomy or not config.cell_labels:
        raise LeukotreeError("--batch-cells needs a recipe with cell_taxonomy and "
                             "cell_labels (the cell type of each image).")
    cells = load_taxonomy(config.cell_taxonomy)
    found = discover(data, load_taxonomy(config.taxonomy), patients=config.patients,
                     labels=config.labels, cell_labels=config.cell_labels, cell_taxonomy=cells)
    found.raise_for_problems()
    out: dict[str, Any] = {"cell_types": cell_types, "features": "parts"}
    for norm in ("none", "reinhard"):
        got = colour_confound(found.samples, features="parts", stain_norm=norm,
                              cell_taxonomy=cells, cell_types=cell_types,
                              workers=config.workers, seed=config.seed).to_dict()
        out[norm] = {k: got[k] for k in ("n_images", "n_patients", "separability",
                                         "by_label", "unreadable")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="the manifest (or folder) to cross-validate")
    parser.add_argument("--config", type=Path, required=True, help="the recipe's YAML file")
    parser.add_argument("--recipe", action="append", required=True,
                        help="NAME[:KEY=VALUE,...], e.g. as-is or reinhard:stain_norm=reinhard")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold-val-fraction", type=float, default=0.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-cells", default=None,
                        help="cell types that do not show the disease (comma list of the "
                             "recipe's cell taxonomy), e.g. lymphoid,neutrophil,smudge-cell")
    add_json_option(parser)
    args = parser.parse_args()
    recipes = dict(parse_recipe(spec) for spec in args.recipe)
    results: dict[str, Any] = {"data": str(args.data), "folds": args.folds,
                               "fold_val_fraction": args.fold_val_fraction,
                               "config": str(args.config), "recipes": {}}
    results["recipes"] = kept_recipes(args.json, results, set(recipes))
    base = resolve_config(config_file=args.config)
    if args.batch_cells and not (base.cell_taxonomy and base.cell_labels):
        raise LeukotreeError("--batch-cells needs a recipe with cell_taxonomy and "
                             "cell_labels (the cell type of each image).")
    for name, overrides in recipes.items():
        config = resolve_config(config_file=args.config, overrides={
            **overrides, "fold_val_fraction": args.fold_val_fraction})
        out = args.out / name
        plain = cross_validate(args.data, out, config, folds=args.folds, protocol=PROTOCOL,
                               progress=False)
        row: dict[str, Any] = {"options": overrides, "kfold": estimate(plain)}
        for protocol in RECOLOURED:
            summary = CVDir(out / protocol).read_summary()
            row[protocol] = estimate(summary) | {"p_change": summary["p_change"]}
            results[ALONE[summary.get("colour_features", "stats")]] = summary["colour_only"]
        results["recipes"][name] = row
    if args.batch_cells:
        results["batch"] = batch_colours(args.data, base, args.batch_cells)
    elif (batch := kept_batch(args.json)) is not None:
        results["batch"] = batch  # measured earlier, on the same data
    print(json.dumps(results, indent=2))
    write_results(args, "colour_shift", results)


if __name__ == "__main__":
    try:
        main()
    except LeukotreeError as err:
        raise SystemExit(f"error: {err}") from None
