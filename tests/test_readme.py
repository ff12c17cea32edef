"""The README's Python API example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    best_epoch, accuracy, shape = capsys.readouterr().out.split(maxsplit=2)
    assert int(best_epoch) in {1, 2} and 0 <= float(accuracy) <= 1
    assert shape.strip() == "(12, 7)"
    assert (tmp_path / "runs" / "api" / "eval" / "metrics.html").exists()
