"""Start-up time of the command line: wall time and imported modules per command; prints JSON.

    python benchmarks/bench_startup.py [--runs 7] [--json benchmarks/results/startup.json]

Each command (``leukotree --help``, ``taxonomy``, ``taxonomy pbc`` and every sub-command's
``--help``) runs ``--runs`` times as ``python -m leukotree ...`` in a fresh interpreter;
the median wall time is reported with the fastest and slowest run, and the median CPU
time (user + system), which a busy machine inflates far less than the wall time. One more fresh
interpreter runs it through ``leukotree.cli.main`` and counts the modules it imported and
lists the heavy ones (torch, scikit-learn, timm, matplotlib, onnxruntime, fastapi: none is
expected). Two reference lines give the floor (``python -c pass``) and what every command
paid before start-up was made light (``import torch, sklearn``). Goals: ``--help`` <= 0.5 s,
``taxonomy`` <= 1 s on a quiet 2-core machine; the load average at the start and end
says how quiet it was.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from resultfile import add_json_option, write_results

from leukotree.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "timm", "matplotlib", "onnxruntime", "fastapi")
GOALS_S = {"--help": 0.5, "taxonomy": 1.0, "taxonomy pbc": 1.0}

COUNT = """
import contextlib, io, json, sys
from leukotree.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        main(json.loads(sys.argv[1]))
    except SystemExit:
        pass
print(json.dumps([len(sys.modules), sorted(m for m in {heavy!r} if m in sys.modules)]))
"""


def commands() -> list[list[str]]:
    """``--help``, ``taxonomy``, ``taxonomy pbc``, then ``<command> --help`` for each
    sub-command of the parser."""
    out = [["--help"], ["taxonomy"], ["taxonomy", "pbc"]]
    todo: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = [((), build_parser())]
    while todo:
        prefix, parser = todo.pop(0)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append([*prefix, name, "--help"])
                    todo.append(((*prefix, name), sub))
    return out


def _env() -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else "")}


def timings(argv: list[str], runs: int) -> tuple[list[float], list[float]]:
    """Wall seconds and CPU seconds (user + system) of ``runs`` fresh ``python ARGV``
    processes (output discarded). CPU time barely depends on what else the machine runs."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=_env(), check=False)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return walls, cpus


def imported(argv: list[str]) -> tuple[int, list[str]]:
    """Modules loaded by ``leukotree ARGV`` in a fresh interpreter, and the heavy ones."""
    done = subprocess.run([sys.executable, "-c", COUNT.format(heavy=HEAVY), json.dumps(argv)],
                          capture_output=True, text=True, env=_env(), check=True)
    n, heavy = json.loads(done.stdout)
    return n, heavy


def _row(name: str, times: tuple[list[float], list[float]], **extra: Any) -> dict[str, Any]:
    walls, cpus = times
    return {"command": name, "median_s": round(statistics.median(walls), 3),
            "min_s": round(min(walls), 3), "max_s": round(max(walls), 3),
            "cpu_median_s": round(statistics.median(cpus), 3), **extra}


def measure(selected: list[list[str]], runs: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    rows = []
    for argv in selected:
        key = " ".join(argv)
        n, heavy = imported(argv)
        row = _row(f"leukotree {key}", timings(["-m", "leukotree", *argv], runs),
                   modules=n, heavy=", ".join(heavy) or "none")
        if key in GOALS_S:
            row["goal_s"] = GOALS_S[key]
            row["meets_goal"] = row["median_s"] <= GOALS_S[key]
        rows.append(row)
    reference = [_row("python -c pass", timings(["-c", "pass"], runs)),
                 _row("python -c 'import torch, sklearn'",
                      timings(["-c", "import torch, sklearn"], runs))]
    return {"runs_per_command": runs, "commands": rows, "reference": reference,
            "load_average_1min": {"start": round(load_before[0], 2),
                                  "end": round(os.getloadavg()[0], 2)}}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command")
    parser.add_argument("--only", action="append", metavar="COMMAND",
                        help="measure only this command line (repeatable), e.g. "
                             "--only=--help --only='taxonomy pbc'")
    add_json_option(parser)
    args = parser.parse_args()
    selected = ([c.split() for c in args.only] if args.only else commands())
    results = measure(selected, args.runs)
    print(json.dumps(results, indent=2))
    write_results(args, "startup", results)


if __name__ == "__main__":
    main()
