"""The lab loop measured: reviewed cells make the next model, gated before it is used;
prints JSON and writes OUT/lab_loop.md and OUT/lab_loop.png.

    python benchmarks/bench_lab_loop.py --out bench-out/lab-loop \
        [--pbc ../shared/data/pbc-dev] [--jhh ../shared/data/apl-aml-discovery] \
        [--run RUN] [--rounds 8] [--per-round 40] [--policies active random] \
        [--audit-share 0.2] [--epochs 5] [--poison-round 2] [--poison-policy active] \
        [--min-audit 10] [--tolerance 0.02] [--json FILE]

1. The ``--preset`` (``cpu-fast``) model trained on the development part of PBC (the split
   of ``bench_cross_lab.py``; ``--run`` reuses a run trained on ``OUT/pbc-dev.csv``, e.g.
   ``bench-out/cross-lab/run``). It is the source run: its training images are replayed
   by every fine-tune and its validation images show what a fine-tune forgot.
2. The Johns Hopkins cells of the eight PBC types, split by patient as the cross-lab
   benchmark splits them: the **pool** (first half of the patients; written without
   labels, ``OUT/jhh-pool-unlabelled.csv``; a label is read only once its cell is
   "reviewed") and the **test half** (the other patients).
3. For each policy of ``--policies`` separately (a chain of models of its own), round
   ``k = 1..--rounds``:

   a. ``--per-round`` cells of the pool not yet reviewed are chosen with the chain's
      ACTIVE model (:func:`leukotree.lab.select.select_from_run`, ``--audit-share`` of
      them drawn uniformly at random as audit cells, seed 0), and their labels revealed;
   b. a candidate is fine-tuned from the active model on ALL reviewed non-audit cells so
      far, replaying the source run's training images, with the settings of the web
      app's training jobs (:func:`leukotree.lab.jobs.train_command`: ``--epochs``, lr
      5e-4, half an epoch of warm-up, split by image, 20% validation, last epoch kept);
      while fewer than ``--min-audit`` audit cells are reviewed no candidate could pass
      the gate, so none is trained (the web app would train one and refuse it; with the
      defaults, round 1's 8 audit cells);
   c. the gate (:func:`leukotree.lab.gate.decide`) compares it with the active model on
      ALL audit cells reviewed so far (paired sign test) and on the source run's
      validation images (forgetting); a candidate that passes is promoted and, with at
      least 20 audit cells, re-calibrated on them
      (:func:`leukotree.calibrate.run.calibrate_run`: temperatures, out-of-distribution
      threshold, conformal answers);
   d. the active model after the round is scored on the test half (accuracy with a
      patient-bootstrap 95% interval, leaf ECE, share flagged unclassifiable) and on the
      held-out PBC cells (accuracy).

   Audit cells are never in a training manifest (``ROUND/train.csv``).
4. The poisoned round (round ``--poison-round`` of ``--poison-policy``; 0: none): before
   the true candidate, a second candidate is fine-tuned on the same cells with the labels
   of that round's new non-audit cells shuffled among them (the audit labels stay true:
   they are the gate's yardstick) and gated; whether the gate refused it is recorded,
   it is never made active, and the round goes on with the true labels.

Resumable: a round whose ``OUT/POLICY/round-K/round.json`` exists is read, not redone; a
fine-tune whose run folder is finished is not repeated. Cost on 2 CPU cores with
``cpu-fast``: each fine-tune (the reviewed cells plus about as many replayed PBC images
per epoch, 5 epochs) takes minutes, and each round scores the active model on the test
half and on held-out PBC; 8 rounds x 2 policies plus the poisoned candidate is about 1-2
hours.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_cross_lab import (
    first_half,
    heldout_half,
    jhh_manifests,
    lab_arguments,
    pbc_split,
    scored,
    write_manifest,
)
from resultfile import add_json_option, lab_loop_table, write_results

from leukotree.calibrate.run import calibrate_run
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.inference.loader import load
from leukotree.inference.options import InferenceOptions
from leukotree.lab.gate import MIN_AUDIT, TOLERANCE, GateRule, decide
from leukotree.lab.jobs import LabSettings
from leukotree.lab.scoring import score, source_validation
from leukotree.lab.select import POLICIES, select_from_run
from leukotree.models.calibration import MIN_IMAGES
from leukotree.rundir import RunDir


def real(path: str | Path) -> str:
    return os.path.realpath(path)


def pool_cells(mapped: Path, pool: set[str], out: Path) -> tuple[Path, dict[str, dict]]:
    """The pool patients' cells: an unlabelled manifest (``path,patient``) for selection,
    and each cell's row (label included) by resolved path, read once it is reviewed."""
    with mapped.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["patient"] in pool]
    manifest = out / "jhh-pool-unlabelled.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["path", "patient"])
        writer.writeheader()
        writer.writerows({"path": r["path"], "patient": r["patient"]} for r in rows)
    return manifest, {real(r["path"]): r for r in rows}


def fine_tune(active: str, source: str, cells: list[dict], out: Path, epochs: int,
              manifest: Path) -> Path:
    """A candidate fine-tuned from ``active`` on ``cells`` (written to ``manifest``),
    replaying ``source``'s training images, as the web app's training job does
    (:func:`leukotree.lab.jobs.train_command`); a finished run is kept (resume)."""
    write_manifest(manifest, [{"path": c["path"], "label": c["label"],
                               "patient": c["patient"]} for c in cells])
    if RunDir(out).summary.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    lab = LabSettings()
    overrides = {"init": active, "replay": source, "epochs": epochs, "lr": lab.lr,
                 "warmup_epochs": 0.5, "patients": "none", "labels": "folder",
                 "balance": "none", "monitor": "last", "val_fraction": 0.2}
    train(manifest, out, resolve_config(config_file=RunDir(active).config,
                                        overrides=overrides), progress=False)
    return out


class Scorer:
    """Scores of the runs, each computed once per set of cells: the source validation
    accuracy, and the test-half and held-out PBC summaries of an active model."""

    def __init__(self, source: str, held: Path, test_pbc: Path) -> None:
        self.val = source_validation(source)
        self.held, self.test_pbc = held, test_pbc
        self.on_source: dict[str, float | None] = {}
        self.on_tests: dict[str, dict] = {}

    def source_accuracy(self, run: str) -> float | None:
        if run not in self.on_source:
            self.on_source[run] = score(load(run).predictor("torch"), *self.val
                                        ).figures["accuracy"]
        return self.on_source[run]

    def gate(self, active: str, candidate: str, audit: list[dict], rule: GateRule) -> dict:
        """:func:`decide` on the audit cells and the source validation images."""
        paths, labels = [Path(c["path"]) for c in audit], [c["label"] for c in audit]
        correct = [score(load(run).predictor("torch"), paths, labels).correct
                   for run in (active, candidate)]
        result = decide(correct[0], correct[1], self.source_accuracy(active),
                        self.source_accuracy(candidate), rule)
        return result.to_dict()

    def too_few(self, active: str, audit: list[dict], rule: GateRule) -> dict:
        """The gate's record of a round with fewer than ``rule.min_audit`` audit cells: no
        candidate is trained, as none could be promoted (the web app would train one and
        refuse it)."""
        paths, labels = [Path(c["path"]) for c in audit], [c["label"] for c in audit]
        correct = score(load(active).predictor("torch"), paths, labels).correct if audit else []
        source = self.source_accuracy(active)
        result = decide(correct, correct, source, source, rule).to_dict()  # only n refuses
        result["figures"] |= {"audit_candidate": None, "source_candidate": None}
        result["skipped"] = True
        return result

    def tests(self, run: str, out: Path) -> dict:
        """The test half (accuracy, CI, leaf ECE, flagged) and held-out PBC (accuracy)."""
        if run not in self.on_tests:
            options = InferenceOptions()
            jhh = scored(Path(run), self.held, out / "eval-jhh-test", options)
            pbc = scored(Path(run), self.test_pbc, out / "eval-pbc-test", options)
            self.on_tests[run] = {
                "jhh_test": {k: jhh[k] for k in ("n", "accuracy", "accuracy_ci", "macro_f1",
                                                 "ece", "flagged_rate", "domain_shift_alarm")},
                "pbc_test": {k: pbc[k] for k in ("n", "accuracy", "accuracy_ci")}}
        return self.on_tests[run]


def poisoned(cells: list[dict], new: list[dict], seed: int) -> tuple[list[dict], float]:
    """``cells`` with the labels of the ``new`` non-audit ones shuffled among them, and
    the share of those whose label changed."""
    targets = [real(c["path"]) for c in new if not c["audit"]]
    labels = [c["label"] for c in new if not c["audit"]]
    shuffled = dict(zip(targets, np.random.default_rng(seed).permutation(labels).tolist(),
                        strict=True))
    changed = sum(shuffled[t] != lab for t, lab in zip(targets, labels, strict=True))
    out = [c | {"label": shuffled.get(real(c["path"]), c["label"])} for c in cells]
    return out, changed / len(targets) if targets else 0.0


def run_round(k: int, policy: str, state: dict, ctx: dict) -> dict:
    """One round of ``policy``'s chain (module docstring, step 3); ``state`` holds the
    reviewed cells and the active run, and is updated."""
    args, folder = ctx["args"], ctx["out"] / policy / f"round-{k}"
    folder.mkdir(parents=True, exist_ok=True)
    active, reviewed = state["active"], state["reviewed"]
    n = min(args.per_round, len(ctx["truth"]) - len(reviewed))
    picks = select_from_run(active, [ctx["pool"]], n, policy=policy,
                            audit_share=args.audit_share, seed=0,
                            exclude=[c["path"] for c in reviewed], progress=False).picks
    new = []
    for pick in picks:  # the labels revealed: the cells are "reviewed"
        row = ctx["truth"][real(pick.id)]
        new.append({"path": row["path"], "label": row["label"], "patient": row["patient"],
                    "audit": pick.audit, "round": k, "reason": pick.reason})
    reviewed = reviewed + new
    train_cells = [c for c in reviewed if not c["audit"]]
    audit_cells = [c for c in reviewed if c["audit"]]
    write_manifest(folder / "audit.csv", [{x: c[x] for x in ("path", "label", "patient")}
                                          for c in audit_cells])
    rule, scorer = ctx["rule"], ctx["scorer"]
    record: dict[str, Any] = {
        "round": k, "n_new": len(new), "n_new_audit": sum(c["audit"] for c in new),
        "n_reviewed": len(reviewed), "n_audit": len(audit_cells), "n_train": len(train_cells),
        "parent": active}
    start = time.perf_counter()
    if policy == args.poison_policy and k == args.poison_round:
        bad, changed = poisoned(train_cells, new, seed=k)
        cand = fine_tune(active, ctx["source"], bad, folder / "poisoned-candidate",
                         args.epochs, folder / "poisoned-train.csv")
        gate = scorer.gate(active, str(cand), audit_cells, rule)
        record["poisoned"] = {"labels_changed": changed, "gate": gate,
                              "refused": not gate["passed"], "candidate": str(cand)}
    if len(audit_cells) < rule.min_audit:  # no candidate could pass: none is trained
        write_manifest(folder / "train.csv", [{x: c[x] for x in ("path", "label", "patient")}
                                              for c in train_cells])
        record |= {"gate": scorer.too_few(active, audit_cells, rule), "promoted": False,
                   "candidate": None, "calibrated": False}
        gate = record["gate"]
    else:
        cand = fine_tune(active, ctx["source"], train_cells, folder / "candidate",
                         args.epochs, folder / "train.csv")
        gate = scorer.gate(active, str(cand), audit_cells, rule)
        record |= {"gate": gate, "promoted": gate["passed"], "candidate": str(cand),
                   "calibrated": False}
    if gate["passed"]:
        active = str(cand)
        if len(audit_cells) >= MIN_IMAGES:
            target = folder / "calibrated"
            if not (target / "best.pt").exists():
                shutil.rmtree(target, ignore_errors=True)
                calibrate_run(cand, folder / "audit.csv", target, patients="none",
                              progress=False)
            active, record["calibrated"] = str(target), True
    record["active"] = active
    record |= scorer.tests(active, folder)
    record["minutes"] = (time.perf_counter() - start) / 60
    record["state"] = {"active": active, "reviewed": reviewed}
    (folder / "round.json").write_text(json.dumps(record, indent=2))
    return record


def chain(policy: str, ctx: dict) -> list[dict]:
    """All rounds of one policy, each read from its ``round.json`` when done."""
    state = {"active": ctx["source"], "reviewed": []}
    rounds = []
    for k in range(1, ctx["args"].rounds + 1):
        if len(state["reviewed"]) >= len(ctx["truth"]):
            break  # the pool is used up
        done = ctx["out"] / policy / f"round-{k}" / "round.json"
        record = (json.loads(done.read_text()) if done.exists()
                  else run_round(k, policy, state, ctx))
        state = record["state"]
        rounds.append({key: v for key, v in record.items() if key != "state"})
    return rounds


def goals(result: dict) -> dict:
    """The issue's goals, read off the rounds (None where they cannot be)."""
    policies = result["policies"]
    out: dict[str, Any] = {}
    if policies.get("active"):
        last = policies["active"][-1]
        out["active_final_jhh_accuracy"] = last["jhh_test"]["accuracy"]
        out["active_final_ece"] = last["jhh_test"]["ece"]
        out["active_final_flagged"] = last["jhh_test"]["flagged_rate"]
        if "random" in policies:
            pairs = list(zip(policies["active"], policies["random"], strict=False))
            out["active_ahead_of_random_every_round"] = all(
                a["jhh_test"]["accuracy"] > r["jhh_test"]["accuracy"] for a, r in pairs)
    promoted = [r["pbc_test"]["accuracy"] for rs in policies.values() for r in rs
                if r["promoted"]]
    out["min_pbc_accuracy_of_promoted"] = min(promoted) if promoted else None
    poison = [r["poisoned"] for rs in policies.values() for r in rs if "poisoned" in r]
    out["poisoned_refused"] = all(p["refused"] for p in poison) if poison else None
    return out


def plot(result: dict, path: Path) -> Path:
    """Accuracy on the test half against reviewed cells, one line per policy (95% CI
    shaded), the source model at 0."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    base = result["baseline"]["jhh_test"]
    for policy, rounds in result["policies"].items():
        x = [0] + [r["n_reviewed"] for r in rounds]
        y = [base["accuracy"]] + [r["jhh_test"]["accuracy"] for r in rounds]
        ci = [base["accuracy_ci"]] + [r["jhh_test"]["accuracy_ci"] for r in rounds]
        line, = ax.plot(x, y, marker="o", label=policy)
        ax.fill_between(x, [c[0] for c in ci], [c[1] for c in ci], alpha=0.15,
                        color=line.get_color())
    ax.set_xlabel("reviewed cells (audit cells included)")
    ax.set_ylabel("accuracy, Johns Hopkins test half")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main() -> None:
    parser = lab_arguments(__doc__)
    parser.add_argument("--run", type=Path, help="a run already trained on OUT/pbc-dev.csv")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=40)
    parser.add_argument("--policies", nargs="+", default=["active", "random"],
                        choices=list(POLICIES))
    parser.add_argument("--audit-share", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=LabSettings().epochs,
                        help="epochs of each fine-tune")
    parser.add_argument("--poison-round", type=int, default=2,
                        help="the round of --poison-policy with a poisoned candidate (0: none)")
    parser.add_argument("--poison-policy", default="active")
    parser.add_argument("--min-audit", type=int, default=MIN_AUDIT,
                        help="audit cells the gate needs (leukotree.lab.gate)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="the drop in source validation accuracy the gate allows")
    add_json_option(parser)
    args = parser.parse_args()
    if args.rounds < 1 or args.per_round < 1:
        parser.error("--rounds and --per-round must be >= 1")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    import yaml

    dev, test_pbc = pbc_split(args.pbc, 0.2, args.out)
    mapped, _ = jhh_manifests(args.jhh, args.out)
    result: dict[str, Any] = {"preset": args.preset, "rounds": args.rounds,
                              "per_round": args.per_round, "audit_share": args.audit_share,
                              "epochs": args.epochs, "policies_run": args.policies,
                              "poison": {"policy": args.poison_policy,
                                         "round": args.poison_round}}
    run = args.run
    if run is None:
        run = args.out / "run"
        overrides = {"taxonomy": "pbc", "patients": "none"}
        overrides |= {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
        if not RunDir(run).summary.is_file():
            shutil.rmtree(run, ignore_errors=True)
            start = time.perf_counter()
            train(dev, run, resolve_config(preset=args.preset, overrides=overrides),
                  progress=False)
            result["train_minutes"] = (time.perf_counter() - start) / 60
    source = str(run.resolve())
    result["run"] = source
    pool = first_half(mapped)
    held = heldout_half(mapped, pool, args.out)
    pool_manifest, truth = pool_cells(mapped, pool, args.out)
    rule = GateRule(min_audit=args.min_audit, tolerance=args.tolerance)
    scorer = Scorer(source, held, test_pbc)
    result |= {"pool_cells": len(truth), "gate_rule": rule.describe(),
               "baseline": scorer.tests(source, args.out / "baseline")}
    ctx = {"args": args, "out": args.out, "source": source, "pool": pool_manifest,
           "truth": truth, "rule": rule, "scorer": scorer}
    result["policies"] = {policy: chain(policy, ctx) for policy in args.policies}
    result["goals"] = goals(result)
    result["plot"] = str(plot(result, args.out / "lab_loop.png"))
    (args.out / "lab_loop.json").write_text(json.dumps(result, indent=2))
    (args.out / "lab_loop.md").write_text(lab_loop_table(result) + "\n")
    write_results(args, "lab_loop", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
