"""The documentation site's moving parts: every committed benchmark results file renders,
the hook puts it on its page, and the pages name what exists."""

import argparse
import ast
import importlib.util
import json
import re
from pathlib import Path

import pytest

import leukotree

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


resultfile = _load("resultfile", ROOT / "benchmarks" / "resultfile.py")
hook = _load("docs_hook", DOCS / "hooks" / "benchmarks.py")


def test_the_demo_results_are_committed():
    assert ROOT / "benchmarks" / "results" / "demo.json" in RESULTS


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.name)
def test_every_committed_results_file_renders(path):
    doc = resultfile.read_results(path)
    assert path.stem == doc["benchmark"]  # the page marker names the file
    assert re.fullmatch(r"[0-9a-f]{40}", doc["meta"]["commit"])
    text = resultfile.render_markdown(doc)
    assert doc["meta"]["command"] in text and doc["meta"]["date"] in text
    assert text.count("\n|---") >= 1  # at least one table
    pages = [p for p in DOCS.rglob("*.md") if f"<!-- results: {path.stem} -->" in
             p.read_text(encoding="utf-8")]
    assert len(pages) == 1, f"no benchmark page shows {path.name}"


def test_demo_table_states_the_figures_of_the_file():
    results = {"mean": {k: {"mean": m, "std": s} for k, m, s in [
        ("accuracy", 0.713, 0.02), ("macro_f1", 0.7, 0.01), ("hF", 0.8, 0.0),
        ("ece", 0.151, 0.01), ("ece_uncalibrated", 0.212, 0.02),
        ("unclassifiable", 0.044, 0.01), ("accuracy_kept", 0.73, 0.02)]}}
    table = resultfile.demo_table(results)
    assert "| accuracy | 71.3% ± 2.0 |" in table
    assert "| leaf ECE, uncalibrated → calibrated | 0.212 → 0.151 |" in table
    assert "| cells flagged unclassifiable | 4.4% |" in table


def test_generic_rendering_of_nested_results():
    lines = resultfile.render_value("", {"images": 16, "eager": {"end_to_end": 126.0,
                                                                  "model_only": 105.25},
                                         "rows": [{"a": 1, "b": None}, {"a": 2.5}]})
    text = "\n".join(lines)
    assert "| images | 16 |" in text
    assert "### eager" in text and "| model_only | 105.2 |" in text
    assert "| a | b |" in text and "| 1 | – |" in text and "| 2.5 | – |" in text


def _doc(tmp_path, **changes):
    doc = {"benchmark": "x", "meta": {"date": "2026-12-02 01:00 UTC", "commit": "a" * 40,
                                      "command": "python benchmarks/bench_x.py",
                                      "machine": {"cpu": "CPU", "cores": 2}},
           "results": {"n": 1}}
    doc.update(changes)
    path = tmp_path / "x.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_broken_results_files_are_named(tmp_path):
    path = _doc(tmp_path)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        resultfile.read_results(path)
    path = _doc(tmp_path, meta={"date": "today"})
    with pytest.raises(ValueError, match=r"meta\.commit, meta\.command, meta\.machine"):
        resultfile.read_results(path)


def test_hook_replaces_the_marker_or_says_the_file_is_missing(tmp_path, monkeypatch):
    _doc(tmp_path)
    renderer = hook.load_renderer()
    monkeypatch.setattr(renderer, "RESULTS", tmp_path)
    monkeypatch.setattr(hook, "load_renderer", lambda: renderer)
    page = "# X\n\n<!-- results: x -->\n\n<!-- results: absent -->\n"
    out = hook.on_page_markdown(page, page=None, config=None, files=None)
    assert "Measured 2026-12-02 01:00 UTC at commit `aaaaaaaaaa`" in out
    assert "| n | 1 |" in out and "python benchmarks/bench_x.py" in out
    assert "`benchmarks/results/absent.json` is not in this version" in out
    assert hook.on_page_markdown("no marker", page=None) == "no marker"


def test_write_results_records_the_meta_block_taken_at_the_start(tmp_path):
    parser = argparse.ArgumentParser()
    resultfile.add_json_option(parser, ["benchmarks/bench_demo.py", "--out", "a b"])
    args = parser.parse_args(["--json", str(tmp_path / "r.json")])
    started = args.json_meta
    path = resultfile.write_results(args, "demo", {"n": 1})
    doc = resultfile.read_results(path)
    assert doc["meta"] == started  # not taken again when the results are written
    assert doc["meta"]["command"] == "python benchmarks/bench_demo.py --out 'a b'"
    assert doc["meta"]["machine"]["cores"] >= 1 and doc["results"] == {"n": 1}
    assert resultfile.write_results(parser.parse_args([]), "demo", {}) is None


def test_benchmark_scripts_name_their_results_files_after_their_pages():
    names = set()
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        calls = [n for n in ast.walk(ast.parse(script.read_text(encoding="utf-8")))
                 if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "write_results"]
        assert len(calls) == 1, f"{script.name} does not write its results (--json)"
        names.add(calls[0].args[1].value)
    markers = {m for p in DOCS.rglob("*.md")
               for m in re.findall(r"<!-- results: ([\w-]+) -->", p.read_text("utf-8"))}
    assert names == markers


def test_api_reference_names_existing_modules():
    package = Path(leukotree.__file__).parent
    for page in (DOCS / "api").glob("*.md"):
        for module in re.findall(r"^::: (leukotree[\w.]*)$", page.read_text("utf-8"), re.M):
            parts = module.split(".")[1:]
            path = package.joinpath(*parts)
            assert path.with_suffix(".py").exists() or (path / "__init__.py").exists(), (
                f"{page.name} documents {module}, which does not exist")
