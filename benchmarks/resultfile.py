"""Benchmark results files: each benchmark writes its own (``--json FILE``), the docs render them.

A results file is JSON: ``{"benchmark": NAME, "meta": {...}, "results": {...}}``. ``meta``
says when, where and how the figures were measured: ``date`` (UTC), ``commit`` (``git
rev-parse HEAD`` of the repository, ``dirty`` when the working tree differed from it),
``command`` (the exact command line), ``machine`` (CPU, cores, memory, GPU) and
``versions``. The committed files live in ``benchmarks/results/``; the documentation's
benchmark pages render them with :func:`render_markdown` (``docs/hooks/benchmarks.py``),
never by copying a figure by hand.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: Where the committed results files live.
RESULTS = ROOT / "benchmarks" / "results"


def add_json_option(parser: argparse.ArgumentParser,
                    argv: Sequence[str] | None = None) -> None:
    """``--json FILE``: also write the results with their ``meta`` block to FILE. The block
    is taken now, before the benchmark runs (the commit is the one that ran)."""
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the results, with date, commit, command and "
                             "machine, to FILE (e.g. benchmarks/results/NAME.json)")
    parser.set_defaults(json_meta=meta(argv))


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The CPU model, the cores this process may use, memory and the GPU if any."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
                            "system": f"{platform.system()} {platform.machine()}"}
    info["load_average"] = round(os.getloadavg()[0], 1)  # other work on the machine
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gb"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries loaded by the benchmark."""
    out = {"python": platform.python_version()}
    for name in ("leukotree", "torch", "timm", "onnxruntime"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            out[name] = str(module.__version__)
    return out


def meta(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """When, at which commit, with which command and on which machine (see module doc)."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0])
    if script.is_absolute() and script.is_relative_to(ROOT):
        script = script.relative_to(ROOT)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "command": shlex.join(["python", str(script), *argv[1:]]),
        "machine": machine(),
        "versions": versions(),
    }


def write_results(args: argparse.Namespace, benchmark: str,
                  results: dict[str, Any]) -> Path | None:
    """Write ``results`` with the :func:`meta` taken by :func:`add_json_option` to
    ``args.json`` (nothing when it is None); the date says when the benchmark started."""
    if args.json is None:
        return None
    doc = {"benchmark": benchmark, "meta": args.json_meta, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return args.json


def read_results(path: Path) -> dict[str, Any]:
    """A results file, checked: a ValueError names the file and what is missing."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a results file holds a JSON object")
    missing = [k for k in ("benchmark", "meta", "results") if k not in doc]
    missing += [f"meta.{k}" for k in ("date", "commit", "command", "machine")
                if k not in doc.get("meta", {})]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}; write it with the "
                         "benchmark's --json FILE option")
    return doc


# ----------------------------------------------------------------- rendering
def fmt(value: Any) -> str:
    """One table cell: floats to 4 significant digits, None and NaN as an en dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _scalar(value: Any) -> bool:
    return not isinstance(value, dict | list) or (
        isinstance(value, list) and all(not isinstance(v, dict | list) for v in value))


def render_value(name: str, value: Any, depth: int = 0) -> list[str]:
    """Generic rendering: scalars as a two-column table, a list of flat records as one
    table (a column per key), nested mappings as sub-sections."""
    title = "#" * min(3 + depth, 6) + f" {name}" if name else ""
    if isinstance(value, dict):
        flat = {k: v for k, v in value.items() if _scalar(v)}
        parts = [title] if title else []
        if flat:
            parts.append(table(["", "value"], list(flat.items())))
        for key, sub in value.items():
            if key not in flat:
                parts += render_value(str(key), sub, depth + 1)
        return parts
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        keys = list(dict.fromkeys(k for row in value for k, v in row.items() if _scalar(v)))
        return [title, table(keys, [[row.get(k) for k in keys] for row in value])]
    return [title, table(["", "value"], [[name, value]])]


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def demo_table(results: dict[str, Any]) -> str:
    """The demo's figures (mean ± standard deviation over the folds) as one table."""
    mean = results["mean"]

    def pm(key: str, percent: bool = True) -> str:
        m, s = mean[key]["mean"], mean[key]["std"]
        return (f"{100 * m:.1f}% ± {100 * s:.1f}" if percent else f"{m:.3f} ± {s:.3f}")

    rows = [["accuracy", pm("accuracy")], ["macro F1", pm("macro_f1")],
            ["hierarchical F1 (hF)", pm("hF")],
            ["leaf ECE, uncalibrated → calibrated",
             f"{mean['ece_uncalibrated']['mean']:.3f} → {mean['ece']['mean']:.3f}"],
            ["cells flagged unclassifiable", _percent(mean["unclassifiable"]["mean"])],
            ["accuracy of the kept cells", pm("accuracy_kept")]]
    return table(["3-fold CV on the bundled PBC sample", "mean ± std over folds"], rows)


def demo_section(doc: dict[str, Any]) -> list[str]:
    r = doc["results"]
    per_fold = [[f["fold"], f["n_images"], f.get("accuracy"), f.get("macro_f1"), f.get("ece"),
                 f.get("unclassifiable")] for f in r["folds"]]
    return [demo_table(r), "#### Per fold",
            table(["fold", "test images", "accuracy", "macro F1", "leaf ECE", "flagged"],
                  per_fold),
            f"{r['images']} images, {r['minutes']:.1f} minutes in all; recipe: "
            + ", ".join(f"`{k}={v}`" for k, v in r["recipe"].items()) + "."]


def _ci(low: float, high: float) -> str:
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def guarantees_table(r: dict[str, Any]) -> str:
    """``bench_guarantees.py``: the conformal answers' coverage on held-out PBC and on the
    Johns Hopkins cells before and after ``calibrate``, and the APL miss rate."""
    rows = []
    for name, key in (("PBC held out (same lab)", "pbc_heldout"),
                      ("Johns Hopkins, tested half, answers fitted on PBC", "jhh_before")):
        s = r[key]
        rows.append([name, s["n"], f"{_percent(s['coverage'])} {_ci(*s['coverage_ci95'])}",
                     _percent(s["leaf_share"]), f"{s['mean_depth']:.2f}",
                     _percent(s["flagged_rate"])])
    for n, s in r.get("jhh_after", {}).items():
        rows.append([f"Johns Hopkins, tested half, after `calibrate` on {n} random cells of "
                     f"the other half's patients ({len(s['draws'])} draws)", s["draws"][0]["n"],
                     f"mean {_percent(s['coverage_mean'])}, min {_percent(s['coverage_min'])}"
                     f" ({_percent(s['share_of_draws_on_target'])} of draws on target)",
                     _percent(s["leaf_share_mean"]), f"{s['mean_depth_mean']:.2f}",
                     _percent(s["flagged_rate_mean"])])
    out = table(["cells", "n", f"coverage [95% CI] (target {_percent(r['coverage'])})",
                 "leaf answers", "mean depth", "flagged"], rows)
    if "apl" in r:
        a = r["apl"]
        for m in a["repeats"]:
            out += (f"\n\nAPL vs other AML, out-of-fold patients of a 5-fold CV: "
                    f"{m['missed']} of {m['n_positive']} APL patients called negative, "
                    f"observed miss rate {_percent(m['observed_miss_rate'])} "
                    f"{_ci(*m['observed_miss_rate_ci95'])} against the stated "
                    f"{_percent(m['alpha'])} at {_percent(m['confidence'])} confidence; "
                    f"{m['referred']} of {m['n_patients']} patients referred.")
        out += (f"\n\n{a['cohort_positive_patients']} APL patients support at best a miss "
                f"rate of {_percent(a['achievable_miss_rate_cohort'])} at that confidence "
                f"(a 5-fold training part: {_percent(a['achievable_miss_rate_per_fold'])}).")
    return out


def guarantees_section(doc: dict[str, Any]) -> list[str]:
    return [guarantees_table(doc["results"])]


def _gate_cells(g: dict[str, Any]) -> list[str]:
    f = g["figures"]
    return [f"{_percent(f['audit_active'])} → {_percent(f['audit_candidate'])} "
            f"(b={f['b']}, c={f['c']}, p={f['p']:.2g})",
            f"{_percent(f['source_active'])} → {_percent(f['source_candidate'])}"]


def lab_loop_table(r: dict[str, Any]) -> str:
    """``bench_lab_loop.py``: per policy and round, the reviewed cells, the gate's figures
    and decision, and the active model's scores after the round; the poisoned round."""
    base = r["baseline"]
    rows: list[list[Any]] = [["source model", 0, "0 (0)", "", "", "",
                              f"{_percent(base['jhh_test']['accuracy'])} "
                              f"{_ci(*base['jhh_test']['accuracy_ci'])}",
                              fmt(base["jhh_test"]["ece"]),
                              _percent(base["jhh_test"]["flagged_rate"]),
                              _percent(base["pbc_test"]["accuracy"])]]
    poisoned = []
    for policy, rounds in r["policies"].items():
        for s in rounds:
            decision = (("promoted, re-calibrated" if s["calibrated"] else "promoted")
                        if s["promoted"] else "no candidate: too few audit cells"
                        if s["gate"].get("skipped") else "refused")
            t = s["jhh_test"]
            rows.append([policy, s["round"], f"{s['n_reviewed']} ({s['n_audit']})",
                         *_gate_cells(s["gate"]), decision,
                         f"{_percent(t['accuracy'])} {_ci(*t['accuracy_ci'])}", fmt(t["ece"]),
                         _percent(t["flagged_rate"]), _percent(s["pbc_test"]["accuracy"])])
            if "poisoned" in s:
                p = s["poisoned"]
                poisoned.append([policy, s["round"], _percent(p["labels_changed"]),
                                 *_gate_cells(p["gate"]),
                                 "refused" if p["refused"] else "**passed**"])
    out = table(["policy", "round", "reviewed (audit)", "audit accuracy, active → candidate",
                 "source validation, active → candidate", "gate", "test half accuracy [95% CI]",
                 "leaf ECE", "flagged", "PBC held out"], rows)
    if poisoned:
        out += "\n\nPoisoned candidate (the round's new labels shuffled):\n\n" + table(
            ["policy", "round", "labels changed", "audit accuracy, active → candidate",
             "source validation, active → candidate", "gate"], poisoned)
    return out


def lab_loop_section(doc: dict[str, Any]) -> list[str]:
    return [lab_loop_table(doc["results"])]


#: Renderers of known benchmarks; any other results file gets :func:`render_value`.
def _auroc(m: dict[str, Any] | None) -> str:
    if m is None:
        return "–"
    lo, hi = m["auroc_ci95"]
    return f"{m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]"


def patient_models_table(r: dict[str, Any]) -> str:
    """``bench_patient_models.py``: each candidate's pooled patient AUROC and accuracy under
    every protocol, and the one-standard-error choice."""
    protocols = list(r["protocols"])
    sel = r["selection"]
    rows = []
    for name in sel["order"]:
        cells: list[Any] = [f"**{name}**" if name == sel["chosen"] else name]
        for p in protocols:
            m = r["protocols"][p]["models"].get(name)
            cells += [_auroc(m), "–" if m is None else _percent(m["accuracy"])]
        rows.append(cells)
    header = ["patient model"] + [f"{p} {what}" for p in protocols
                                  for what in ("AUROC [95% CI]", "accuracy")]
    n = {p: next(iter(r["protocols"][p]["models"].values()))["patients"] for p in protocols}
    out = table(header, rows) + (
        "\n\nPatients pooled out of fold: "
        + ", ".join(f"{p} {n[p]}" + (f" ({r['protocols'][p]['folds']} folds)"
                                     if "folds" in r["protocols"][p] else "")
                    for p in protocols) + "; "
        f"positive class {r['positive']}, threshold {r['protocols'][protocols[0]]['threshold']}. "
        f"Chosen by the one-standard-error rule on the **{sel['by']}** estimate: "
        f"**{sel['chosen']}** (the best, {sel['best']}, has AUROC "
        f"{sel['means'][sel['best']]:.3f} ± {sel['standard_errors'][sel['best']]:.3f}; the "
        f"simplest within one standard error, AUROC ≥ {sel['bound']:.3f}).")
    for name, m in (r.get("baseline") or {}).items():
        out += f"\n\nReference: {name}, AUROC {_auroc(m)} over {m['patients']} patients."
    return out


def patient_models_section(doc: dict[str, Any]) -> list[str]:
    return [patient_models_table(doc["results"])]


def _separates(got: dict[str, Any]) -> str:
    """A colour check's AUROC, or an en dash when it could not be measured."""
    auroc = (got.get("separability") or {}).get("auroc")
    return "–" if auroc is None else f"{auroc:.3f}"


#: The protocols of ``bench_colour_shift.py``, and what each did to the test patients.
COLOUR_SHIFT = {"kfold": "as they are", "colour": "mean colour → training patients'",
                "colour-swap": "mean colour → other diagnosis's",
                "stain": "nuclei and plasma colours → training patients'",
                "stain-swap": "nuclei and plasma colours → other diagnosis's"}


def colour_shift_table(r: dict[str, Any]) -> str:
    """``bench_colour_shift.py``: per recipe and protocol, the pooled patient AUROC and
    accuracy of its fold models on the test patients as they are and recoloured, and how
    much the patients' probabilities moved."""
    rows = []
    for name, row in r["recipes"].items():
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items()) or "as the config"
        for protocol, what in COLOUR_SHIFT.items():
            if not row.get(protocol):
                continue
            got, change = row[protocol], row[protocol].get("p_change") or {}
            rows.append([name, options, f"`{protocol}`: {what}",
                         _auroc(got) if got.get("auroc") is not None else "–",
                         _percent(got.get("accuracy")),
                         fmt(change["mean_abs_p"]) if "mean_abs_p" in change else "–",
                         change.get("decisions_changed", "–")])
    header = ["recipe", "options", "test patients", "AUROC [95% CI]", "accuracy",
              "mean ΔP", "diagnoses changed"]
    n = next(iter(r["recipes"].values()))["kfold"]["n_patients"]
    out = table(header, rows) + (
        f"\n\n{n} patients pooled out of fold ({r['folds']}-fold; the same folds and fold "
        "models for every estimate of a recipe); `colour`: each test patient recoloured as "
        "one slide to its training patients' average colour, `-swap`: to the other "
        "diagnoses'; `stain`: the colours of its nuclei and of its plasma moved to those "
        "targets (what a per-image stain normalisation keeps); ΔP: the mean absolute change of a "
        "patient's probability.")
    for name, row in r["recipes"].items():
        if row.get("measured"):
            m = row["measured"]
            out += (f"\n\nRecipe `{name}` was measured earlier, {m.get('date')} at commit "
                    f"`{(m.get('commit') or 'unknown')[:10]}`, by `{m.get('command')}`"
                    + (" (before the stain protocols)." if not row.get("stain") else "."))
    for key, what in (("colour_only", "mean colours"),
                      ("stain_only", "colours of nuclei and plasma")):
        only = r.get(key) or {}
        if only.get("auroc") is not None:
            out += (f"\n\nThe patients' {what} alone, before any model, tell the diagnoses "
                    f"apart with AUROC {only['auroc']:.3f} (min {only['auroc_min']:.3f}, "
                    f"max {only['auroc_max']:.3f} over {only['repeats']} repeats of "
                    f"{only['folds']}-fold logistic regression, {only['n_patients']} "
                    "patients).")
    batch = r.get("batch")
    if batch:
        raw, flat = batch["none"], batch["reinhard"]
        out += ("\n\nOn the cells that do not show the disease "
                f"({batch['cell_types'].replace(',', ', ')}; {raw['n_images']} images), the "
                "colours of their plasma and nuclei alone tell the diagnoses apart with AUROC "
                f"{_separates(raw)}, and {_separates(flat)} after a per-image Reinhard "
                "normalisation (`leukotree data colour --features parts`): most likely a "
                "batch of stain, not the disease.\n\n")
        names = list(next(iter(raw["by_label"].values())))
        out += table(["images", "label", *names],
                     [[norm, label, *(f"{values[n]:.2f}" for n in names)]
                      for norm, got in (("as they are", raw), ("Reinhard", flat))
                      for label, values in got["by_label"].items()])
    return out


def colour_shift_section(doc: dict[str, Any]) -> list[str]:
    return [colour_shift_table(doc["results"])]


RENDERERS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "demo": demo_section, "guarantees": guarantees_section, "lab_loop": lab_loop_section,
    "patient_models": patient_models_section, "colour_shift": colour_shift_section}


def describe_meta(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    mach = m["machine"]
    where = ", ".join(str(v) for v in (mach.get("cpu"), f"{mach.get('cores')} cores",
                                       mach.get("gpu")) if v)
    commit = (m.get("commit") or "unknown")[:10] + (" (with local changes)" if m.get("dirty")
                                                  else "")
    note = f" Note: {m['note']}." if m.get("note") else ""
    return f"Measured {m['date']} at commit `{commit}` on {where}.{note}"


def render_markdown(doc: dict[str, Any]) -> str:
    """A results file as Markdown: when and where, the command that reproduces it, the
    tables."""
    renderer = RENDERERS.get(doc["benchmark"])
    body = (renderer(doc) if renderer else
            [p for p in render_value("", doc["results"]) if p])
    return "\n\n".join([describe_meta(doc), "```bash\n" + doc["meta"]["command"] + "\n```",
                        *body]) + "\n"


def main() -> None:
    """``python benchmarks/resultfile.py readme``: the README's results table, from
    ``benchmarks/results/demo.json``; ``python benchmarks/resultfile.py FILE``: a file
    rendered as Markdown."""
    arg = sys.argv[1] if len(sys.argv) > 1 else "readme"
    if arg == "readme":
        print(readme_table())
    else:
        print(render_markdown(read_results(Path(arg))))


def guarantee_rows(r: dict[str, Any], date: str | None = None) -> list[list[str]]:
    """The README's rows of ``bench_guarantees.py``; ``date``, when the APL recipe it
    measured was the one of that day."""
    target = _percent(r["coverage"])
    pbc, jhh = r["pbc_heldout"], r["jhh_before"]
    rows = [[f"cells whose conformal answer holds their class, PBC held out (target {target})",
             f"{_percent(pbc['coverage'])} {_ci(*pbc['coverage_ci95'])}, "
             f"{_percent(pbc['leaf_share'])} answered with a leaf"],
            ["same, Johns Hopkins cells, answers fitted on PBC (the alarm says: re-calibrate)",
             f"{_percent(jhh['coverage'])} {_ci(*jhh['coverage_ci95'])}"]]
    after = r.get("jhh_after", {})
    if after:
        rows.append([f"same, after `calibrate` on {' / '.join(after)} labelled Johns Hopkins "
                     "cells of other patients (mean over draws)",
                     " / ".join(f"{_percent(s['coverage_mean'])} (depth "
                                f"{s['mean_depth_mean']:.2f})" for s in after.values())])
    if "apl" in r:
        a, m = r["apl"], r["apl"]["repeats"][0]
        rows += [["APL patients missed, out-of-fold 5-fold CV"
                  + (f" of the recipe of {date}" if date else "") + " (stated at most "
                  f"{_percent(m['alpha'])}, {_percent(m['confidence'])} confidence)",
                  f"{m['missed']} of {m['n_positive']} "
                  f"({_percent(m['observed_miss_rate'])}), {m['referred']} of "
                  f"{m['n_patients']} patients referred"],
                 [f"smallest miss rate {a['cohort_positive_patients']} APL patients can state "
                  f"({_percent(m['confidence'])} confidence)",
                  _percent(a["achievable_miss_rate_cohort"])]]
    return rows


def patient_model_rows(r: dict[str, Any], date: str | None = None) -> list[list[str]]:
    """The README's rows of ``bench_patient_models.py``: the chosen patient model's AUROC
    and accuracy under each protocol; ``date``, when the recipe measured was that day's."""
    chosen = r["selection"]["chosen"]
    names = {"kfold": "patient-grouped {k}-fold CV (new patients, same cohort)",
             "cluster": "leave-cluster-out CV ({k} clusters of patients by colour and cell "
                        "mix, the pessimistic protocol)",
             "repeated": "repeated patient-grouped {k}-fold CV"}
    rows = []
    for protocol, part in r["protocols"].items():
        m = part["models"][chosen]
        folds = part.get("folds", "k")
        rows.append([f"APL vs other AML per patient (`{chosen}`"
                     + (f", recipe of {date}" if date else "")
                     + f"), {names.get(protocol, protocol).format(k=folds)}",
                     f"AUROC {_auroc(m)}, accuracy {_percent(m['accuracy'])}"])
    return rows


def colour_shift_rows(r: dict[str, Any]) -> list[list[str]]:
    """The README's rows of ``bench_colour_shift.py``: per recipe, the patient AUROC of its
    fold models on the test patients as they are, recoloured neutral and swapped, and
    with the other diagnosis's nuclei and plasma colours where measured."""
    rows = []
    for row in r["recipes"].values():
        options = ", ".join(f"`{k}: {v}`" for k, v in row["options"].items())
        chain = [p for p in ("kfold", "colour", "colour-swap", "stain-swap") if row.get(p)]
        said = {"kfold": "as they are", "colour": "recoloured to the training patients' "
                "average colour", "colour-swap": "to the other diagnosis's colour",
                "stain-swap": "with the other diagnosis's nuclei and plasma colours"}
        kept = str((row.get("measured") or {}).get("date") or "")[:10]
        rows.append([f"APL vs other AML per patient, {r['folds']}-fold CV of the recipe"
                     + (f" with {options}" + (f" (measured {kept})" if kept else "")
                        if options else f" as it was on {kept}" if kept else " as it is")
                     + ": AUROC of the same fold models on the test patients "
                     + " → ".join(said[p] for p in chain),
                     " → ".join(f"{row[p]['auroc']:.3f}" for p in chain)
                     + f" (accuracy {_percent(row[chain[-1]]['accuracy'])} at the last)"])
    batch = r.get("batch")
    if batch:
        rows.append([f"APL vs other AML per patient from the colours of plasma and nuclei "
                     f"alone, on cells that do not show the disease "
                     f"({batch['cell_types'].replace(',', ', ')}): as they are → after a "
                     "per-image Reinhard normalisation (most likely a batch of stain)",
                     f"AUROC {_separates(batch['none'])} → {_separates(batch['reinhard'])}"])
    return rows


#: The day ``examples/apl-aml.yaml`` last changed what it trains, and the
#: :func:`recipe_hash` of its options since then. A results file measured before that day
#: measured an earlier recipe; ``tests/test_readme.py`` fails when the recipe's options
#: change without this line.
APL_RECIPE_CHANGED = ("2026-12-07", "e0f554f33b53")


def recipe_hash(recipe: Path) -> str:
    """The first 12 hex digits of the sha256 of a recipe's options (its YAML parsed and
    written again with sorted keys: comments and layout do not count)."""
    import hashlib

    import yaml

    options = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


def recipe_date(doc: dict[str, Any], changed: str = APL_RECIPE_CHANGED[0]) -> str | None:
    """The day ``doc`` was measured, when the APL recipe changed after it (on ``changed``):
    its figures are then those of the recipe of that day."""
    measured = str(doc["meta"].get("date") or "")[:10]
    return measured if measured and measured < changed else None


def readme_table(path: Path = RESULTS / "demo.json",
                 guarantees: Path = RESULTS / "guarantees.json",
                 patients: Path = RESULTS / "patient_models.json",
                 colour: Path = RESULTS / "colour_shift.json") -> str:
    """The README's one dated results table: the demo's figures and, when committed, the
    guarantees' and the APL patient models', each file's date and command below. Rows of
    the APL recipe measured before the recipe's last change say the recipe's date."""
    doc = read_results(path)
    mean = doc["results"]["mean"]

    def pm(key: str) -> str:
        return f"{100 * mean[key]['mean']:.1f}% ± {100 * mean[key]['std']:.1f}"

    demo = "demo, 3-fold CV on the bundled PBC sample (mean ± std over folds):"
    rows = [[f"{demo} accuracy", pm("accuracy")], ["demo: macro F1", pm("macro_f1")],
            ["demo: hierarchical F1 (hF)", pm("hF")],
            ["demo: leaf ECE, uncalibrated → calibrated",
             f"{mean['ece_uncalibrated']['mean']:.3f} → {mean['ece']['mean']:.3f}"],
            ["demo: cells flagged unclassifiable", _percent(mean["unclassifiable"]["mean"])],
            ["demo: accuracy of the kept cells", pm("accuracy_kept")]]
    docs = [doc]
    if guarantees.exists():
        extra = read_results(guarantees)
        rows += guarantee_rows(extra["results"], recipe_date(extra))
        docs.append(extra)
    if patients.exists():
        extra = read_results(patients)
        rows += patient_model_rows(extra["results"], recipe_date(extra))
        docs.append(extra)
    if colour.exists():
        extra = read_results(colour)
        rows += colour_shift_rows(extra["results"])
        docs.append(extra)
    said = [f"Measured {d['meta']['date'][:10]} with `{d['meta']['command']}` "
            f"({d['meta']['machine']['cores']} CPU cores)." for d in docs]
    return table(["result", "figure"], rows) + "\n\n" + "\n".join(said)


if __name__ == "__main__":
    main()
