"""The case page of a cell-type model (taxonomy kind ``cells``, e.g. pbc) shows a
differential count and the cells grouped by class, never a majority "diagnosis"; a model
of diagnoses (leukemia7) keeps its diagnosis."""

import pytest
from fastapi.testclient import TestClient
from test_api import cells, client, wait_done

from conftest import html_tags
from leukotree.data.synth import generate
from leukotree.engine.config import resolve_config
from leukotree.engine.trainer import train
from leukotree.inference.options import InferenceOptions
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.store import Store
from leukotree.serve.worker import Models
from leukotree.taxonomy import load_taxonomy


@pytest.fixture(scope="module")
def cells_run(tmp_path_factory):
    """A tiny pbc (cell types) run and its data."""
    root = tmp_path_factory.mktemp("pbc-served")
    generate(root / "data", load_taxonomy("pbc"), patients_per_class=2, cells_per_patient=3,
             size=32, seed=5, progress=False)
    train(root / "data", root / "run", resolve_config(preset="tiny-test", overrides={
        "taxonomy": "pbc", "epochs": 1, "threads": 1, "val_fraction": 0.34}),
        progress=False)
    return root


def _client(run, store):
    models = Models([run / "run"], InferenceOptions(engine="torch"))
    return TestClient(create_app(models, Store(store), ServeSettings()),
                      base_url="http://localhost")


def test_a_cell_type_case_is_a_differential_count(cells_run, tmp_path):
    files = [*cells(cells_run, 8), ("files", ("broken.png", b"\x89PNG no", "image/png"))]
    with _client(cells_run, tmp_path / "s") as api:
        made = api.post("/api/cases", files=files, data={"patient": "P-1"})
        case = wait_done(api, made.json()["id"])
        assert case["kind"] == "cells" and case["diagnosis"]["label"] is None
        count = case["differential_count"]
        leaves = list(load_taxonomy("pbc").leaves)
        assert [r["leaf"] for r in count["rows"]] == leaves
        good = [c for c in case["cells"] if not c["error"]]
        flagged = sum(bool(c.get("unclassifiable")) for c in good)
        assert count["n_unreadable"] == 1 and count["n_unclassifiable"] == flagged
        assert count["n_classified"] == len(good) - flagged == sum(
            r["count"] for r in count["rows"])
        expected = {leaf: sum(c["label"] == leaf and not c.get("unclassifiable")
                              for c in good) for leaf in leaves}
        assert {r["leaf"]: r["count"] for r in count["rows"]} == expected
        assert sum(r["percent"] for r in count["rows"]) == pytest.approx(100, abs=0.5)
        # a reviewer's label replaces the model's in the count
        cell = next(c for c in good if not c.get("unclassifiable"))
        other = next(leaf for leaf in leaves if leaf != cell["label"])
        api.post(f"/api/cases/{case['id']}/cells/{cell['index']}/review",
                 json={"label": other, "reviewer": "tech"})
        again = {r["leaf"]: r["count"]
                 for r in api.get(f"/api/cases/{case['id']}").json()["differential_count"]["rows"]}
        assert again[other] == expected[other] + 1
        assert again[cell["label"]] == expected[cell["label"]] - 1
        page = api.get(f"/cases/{case['id']}").text
        ids = {a.get("id") for _, a in html_tags(page)}
        assert {"differential-count", "differential", "counted-apart"} <= ids
        assert "diagnosis" not in ids and "Final diagnosis" not in page
        options = [a.get("value") for t, a in html_tags(page) if t == "option"]
        assert options[:1] == ["class"]  # the cells grouped by predicted class first
        assert "differential count" in api.get("/").text
        # signed out as its differential, not as one of its cell types
        bad = api.post(f"/api/cases/{case['id']}/signout",
                       json={"label": leaves[0], "reviewer": "tech"})
        assert bad.status_code == 422 and "differential" in bad.json()["error"]
        ok = api.post(f"/api/cases/{case['id']}/signout",
                      json={"label": "differential", "reviewer": "tech"})
        assert ok.status_code == 200


def test_a_diagnosis_case_keeps_its_diagnosis(served_run, tmp_path):
    with client(served_run, tmp_path / "s") as api:
        made = api.post("/api/cases", files=cells(served_run, 4), data={"patient": "P-2"})
        case = wait_done(api, made.json()["id"])
        assert case["kind"] == "diagnosis" and "differential_count" not in case
        assert case["diagnosis"]["label"] in load_taxonomy("leukemia7").leaves
        page = api.get(f"/cases/{case['id']}").text
        ids = {a.get("id") for _, a in html_tags(page)}
        assert "diagnosis" in ids and "differential-count" not in ids
        assert "Final diagnosis" in page
