"""Start-up stays light: building the parser, every command's ``--help`` and ``taxonomy``
import none of the heavy libraries (each costs seconds on a loaded machine)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import leukotree
from leukotree.cli import build_parser

HEAVY = ("torch", "sklearn", "timm", "matplotlib", "onnxruntime", "fastapi")

#: Runs each command line in one fresh interpreter; after each, the heavy modules loaded
#: so far (the first command that lists one is the one that imported it).
SCRIPT = """
import contextlib, io, json, sys
from leukotree.cli import main
HEAVY = {heavy!r}
out = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()) as text, \\
            contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    out.append({{"argv": argv, "code": code, "printed": len(text.getvalue()),
                "heavy": sorted(m for m in HEAVY if m in sys.modules)}})
print(json.dumps(out))
"""


def _help_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                   ) -> list[list[str]]:
    """``[*prefix, '--help']`` for the parser and every sub-command, depth first."""
    out = [[*prefix, "--help"]]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _help_commands(sub, (*prefix, name))
    return out


def _run(commands: list[list[str]]) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(leukotree.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY),
                           json.dumps(commands)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_help_of_every_command_is_listed():
    commands = {" ".join(c) for c in _help_commands(build_parser())}
    assert {"--help", "train --help", "predict --help", "serve --help", "data --help",
            "data check --help", "taxonomy --help"} <= commands


def test_help_and_taxonomy_import_no_heavy_library():
    commands = [*_help_commands(build_parser()), ["taxonomy"], ["taxonomy", "pbc"],
                ["taxonomy", "leukemia7", "--yaml"], ["--version"]]
    results = _run(commands)
    assert len(results) == len(commands)
    first = next((r for r in results if r["heavy"]), None)
    assert first is None, f"'leukotree {' '.join(first['argv'])}' imported {first['heavy']}"
    for r in results:  # each command did its job: help and the tree were printed
        assert r["code"] in (0, None) and r["printed"] > 0, r


def test_a_command_that_needs_torch_is_seen_importing_it(tmp_path):
    """The check can fail: ``train`` imports torch (and then refuses the taxonomy)."""
    results = _run([["--help"], ["train", str(tmp_path / "data"), "--out",
                                 str(tmp_path / "run"), "-t", "no-such-taxonomy"]])
    assert results[0]["heavy"] == []
    assert "torch" in results[1]["heavy"] and results[1]["code"] == 2
    assert not (tmp_path / "run").exists()
