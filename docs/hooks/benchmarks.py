"""MkDocs hook: a benchmark page's ``<!-- results: NAME -->`` becomes the tables of
``benchmarks/results/NAME.json`` (rendered by ``benchmarks/resultfile.py``).

A missing results file is said on the page with the command that writes it; a broken one
stops the build (``mkdocs build --strict`` in ``make test``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!--\s*results:\s*([\w-]+)\s*-->")


def load_renderer() -> ModuleType:
    """``benchmarks/resultfile.py`` as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("leukotree_bench_resultfile",
                                                  ROOT / "benchmarks" / "resultfile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(name: str, renderer: ModuleType) -> str:
    path = renderer.RESULTS / f"{name}.json"
    if not path.exists():
        return (f"!!! note \"No results committed\"\n    `benchmarks/results/{name}.json` "
                "is not in this version: run the command above with `--json "
                f"benchmarks/results/{name}.json` to measure it.\n")
    return renderer.render_markdown(renderer.read_results(path))


def on_page_markdown(markdown: str, **_: Any) -> str:
    if not MARKER.search(markdown):
        return markdown
    renderer = load_renderer()
    return MARKER.sub(lambda m: render(m.group(1), renderer), markdown)
