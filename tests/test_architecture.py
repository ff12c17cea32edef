"""Fitness checks of the package's structure (see the documentation's architecture page,
docs/architecture.md): the import direction between layers, no import cycle, no head-name
switches outside models/, run-folder names only in rundir, short functions."""

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


# ----------------------------------------------------------------- the import graph
#: The package's layers, lowest first: a module may import from its own layer or a lower
#: one, never from a higher one. A key is a subpackage or a top-level module
#: (``leukotree`` is the package's ``__init__``).
LAYERS: list[set[str]] = [
    {"errors", "progress", "optional", "options"},
    {"rundir"},
    {"taxonomy"},
    {"tree", "leukotree"},
    {"metrics"},
    {"data"},
    {"models"},
    {"patients"},
    {"inference"},
    {"calibrate"},
    {"report"},
    {"engine"},
    {"evaluation"},
    {"lab"},
    {"serve"},
    {"demo", "cli", "__main__"},
]
LAYER = {key: n for n, keys in enumerate(LAYERS) for key in keys}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SOURCES}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import of a module in ``known`` anywhere in
    ``tree`` (module level and inside functions: a lazy import is still a dependency),
    except in ``if TYPE_CHECKING:`` blocks. ``from a import b`` names ``a.b`` when that is
    a module, else ``a``; a relative import counts from ``package``."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_node(other)
            else:
                visit_node(child)

    def visit_node(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                name = f"{base}.{alias.name}"
                target = name if name in known else base
                if target in known and (node.lineno, target) not in found:
                    found.append((node.lineno, target))
        visit(node)

    visit(tree)
    return found


def _graph() -> dict[str, list[tuple[int, str]]]:
    known = set(MODULES)
    graph = {}
    for module, path in MODULES.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        graph[module] = [(line, t) for line, t in _imports(_tree(path), package, known)
                         if t != module]
    return graph


def _layer_key(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(PACKAGE.parents[1])}:{line}"


def test_import_scanner_sees_lazy_imports_and_skips_type_checking_blocks():
    source = ("from typing import TYPE_CHECKING\n"
              "import leukotree.tree\n"
              "from leukotree.data import images\n"
              "if TYPE_CHECKING:\n"
              "    from leukotree.engine.trainer import Trainer\n"
              "else:\n"
              "    from leukotree import metrics\n"
              "def f():\n"
              "    from leukotree.models.heads import ModelConfig\n"
              "    from leukotree.data import DEFAULT_MAX_PIXELS\n"
              "    from . import images, tree\n"
              "    from ..models.heads import TreeClassifier\n")
    known = {"leukotree", "leukotree.tree", "leukotree.data", "leukotree.data.images",
             "leukotree.engine.trainer", "leukotree.metrics", "leukotree.models.heads"}
    assert _imports(ast.parse(source), "leukotree.data", known) == [
        (2, "leukotree.tree"), (3, "leukotree.data.images"), (7, "leukotree.metrics"),
        (9, "leukotree.models.heads"), (10, "leukotree.data"), (11, "leukotree.data.images"),
        (11, "leukotree.data"), (12, "leukotree.models.heads")]


def test_every_subpackage_and_top_level_module_has_a_layer():
    keys = {_layer_key(m) for m in MODULES}
    assert keys - set(LAYER) == set(), "add the new subpackage or module to LAYERS"
    assert set(LAYER) - keys == set(), "LAYERS names a subpackage or module that is gone"


def test_imports_point_down_the_layers():
    upward = []
    for module, imports in sorted(_graph().items()):
        source = _layer_key(module)
        for line, target in imports:
            dest = _layer_key(target)
            if LAYER[dest] > LAYER[source]:
                upward.append(f"{_where(module, line)} -> {target} ({source!r}, layer "
                              f"{LAYER[source]}, imports {dest!r}, layer {LAYER[dest]})")
    assert upward == [], "imports against the layer order:\n" + "\n".join(upward)


def _cycles(graph: dict[str, list[tuple[int, str]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for _, w in graph.get(v, []):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def test_cycle_finder_on_a_hand_made_graph():
    graph = {"a": [(1, "b")], "b": [(1, "c")], "c": [(1, "a"), (2, "d")], "d": [],
             "e": [(1, "f")], "f": [(1, "e")], "g": [(1, "g")]}
    assert _cycles(graph) == [["a", "b", "c"], ["e", "f"]]


def test_no_import_cycle_between_modules():
    graph = _graph()
    report = []
    for component in _cycles(graph):
        inside = set(component)
        report.append("cycle " + " <-> ".join(component) + ":\n" + "\n".join(
            f"  {_where(m, line)} -> {t}" for m in component for line, t in graph[m]
            if t in inside))
    assert report == [], "\n".join(report)


def test_the_source_points_at_documentation_pages_that_exist():
    """Comments and messages send readers to docs/ pages (the README is short and names
    no sections): every page named exists."""
    import re

    root = PACKAGE.parent.parent
    named, readme = [], []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        named += [(path.name, page) for page in re.findall(r"docs/[\w/.-]+?\.md", text)]
        readme += [path.name for _ in re.findall(r"README(?:\.md|'s)", text)]
    assert ("cli.py", "docs/guide/bad-input.md") in named
    assert [(name, page) for name, page in named if not (root / page).is_file()] == []
    assert readme == []
