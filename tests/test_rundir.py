"""Run, evaluation and CV folders: names in one place, readers that name the file."""

import pytest

from leukotree.errors import LeukotreeError
from leukotree.rundir import (
    CVDir,
    RunDir,
    read_csv,
    read_json,
    read_text,
    read_yaml,
    write_csv,
    write_json,
)


def test_paths_of_a_run_and_a_cv(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.best == tmp_path / "r" / "best.pt" and run.last.name == "last.pt"
    assert run.eval_dir.metrics == tmp_path / "r" / "eval" / "metrics.json"
    cv = CVDir(tmp_path / "cv")
    assert cv.fold(2).path == tmp_path / "cv" / "fold_2"
    assert cv.fold(2).eval_dir.predictions.name == "predictions.csv"
    (tmp_path / "r").mkdir()
    run.best.write_bytes(b"x")
    assert RunDir.of(run.best).path == run.path == RunDir.of(run.path).path
    assert RunDir.checkpoint_of(run.path) == run.best


@pytest.mark.parametrize("content,reader,match", [
    (b"\xff\xfe not utf-8", read_text, "is not UTF-8 text"),
    (b"{broken", read_json, "is not valid JSON"),
    (b"a: [1, 2", read_yaml, "is not valid YAML"),
    (b"x,y\n1,2\n", lambda p, w: read_csv(p, w, ("path",)), r"lacks the column\(s\) \['path'\]"),
])
def test_readers_name_the_file_and_the_fault(tmp_path, content, reader, match):
    path = tmp_path / "file"
    path.write_bytes(content)
    with pytest.raises(LeukotreeError, match=match) as err:
        reader(path, "Some file")
    assert str(path) in str(err.value)


def test_missing_files_and_folders_that_are_not_runs(tmp_path):
    with pytest.raises(LeukotreeError, match="does not exist"):
        read_json(tmp_path / "nope.json", "Metrics file")
    with pytest.raises(LeukotreeError, match="not a run folder"):
        RunDir(tmp_path).read_split("val")
    with pytest.raises(LeukotreeError, match="written by 'leukotree cv'"):
        CVDir(tmp_path).read_summary()


def test_writers_are_atomic_and_round_trip(tmp_path):
    import numpy as np

    path = write_json(tmp_path / "a" / "m.json", {"x": np.float32(0.5), "y": np.arange(2)})
    assert read_json(path, "m") == {"x": 0.5, "y": [0, 1]}
    rows = [{"path": "a,b.png", "label": "ALL"}, {"path": "c.png", "label": "AML"}]
    write_csv(tmp_path / "m.csv", rows, ["path", "label"])
    assert read_csv(tmp_path / "m.csv", "m", ("path",)) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.csv"]  # no temporaries left
    (tmp_path / "bom.txt").write_bytes("\ufeffpath\n".encode())
    assert read_text(tmp_path / "bom.txt", "t") == "path\n"


def test_the_validation_manifest_of_a_run(tmp_path):
    run = RunDir(tmp_path)
    run.split.write_text("path,label,patient,slide,group,split\n/a.png,ALL,p1,,patient:p1,train\n"
                         "/b.png,AML,p2,s,patient:p2,val\n")
    rows = read_csv(run.write_val_manifest(), "manifest", ("path", "label"))
    assert rows == [{"path": "/b.png", "label": "AML", "patient": "p2", "slide": "s"}]
