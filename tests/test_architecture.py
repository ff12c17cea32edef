"""Fitness checks of the package's structure (see the documentation's architecture page,
docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

import leukotree
from leukotree.models import HEADS
from leukotree.rundir import CVDir, DemoDir, EvalDir, RunDir

PACKAGE = Path(leukotree.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _constants(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)]


def test_no_module_outside_models_branches_on_a_head_name():
    names = set(HEADS)
    offenders = []
    for path in SOURCES:
        if path.parent.name == "models":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Compare) and names & set(_constants(node)):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == [], f"compare with head names outside models/: {offenders}"


def test_run_folder_file_names_are_spelled_only_in_rundir():
    names = {v for cls in (RunDir, EvalDir, CVDir, DemoDir) for k, v in vars(cls).items()
             if k.isupper() and isinstance(v, str) and "." in v}
    offenders = []
    for path in SOURCES:
        if path.name == "rundir.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Constant) and node.value in names:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value}")
    assert offenders == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_stay_short(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(_tree(path))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def test_library_code_never_switches_matplotlib_backends_or_uses_pyplot():
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        assert "matplotlib.use(" not in text and "pyplot" not in text.replace(
            "never ``pyplot``", ""), path
