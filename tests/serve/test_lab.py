"""The lab loop in ``leukotree serve`` (TestClient): versions, a training job in a separate
process (on the reviewed cells not flagged audit in the store), its status, the gate's
refusal and a promotion, a forced promotion, re-runs and restarts."""

import csv
import io
import time
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from conftest import html_tags
from leukotree.errors import LeukotreeError
from leukotree.inference.options import InferenceOptions
from leukotree.lab.gate import GateRule
from leukotree.lab.jobs import LabSettings
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.store import Store
from leukotree.serve.worker import Models

FAST = LabSettings(epochs=1, min_reviews=8, threads=1)


def client(served_run, store_dir, lab=FAST):
    models = Models([served_run / "run"], InferenceOptions(engine="torch"))
    return TestClient(create_app(models, Store(store_dir), ServeSettings(lab=lab)),
                      base_url="http://localhost")


def upload(api, served_run, patient):
    """All synthetic cells as one case; returns the case and each cell's true label."""
    paths = sorted((served_run / "data").rglob("*.png"))
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]
    case_id = api.post("/api/cases", files=files, data={"patient": patient}).json()["id"]
    return wait(api, f"/api/cases/{case_id}", {"done", "failed"}), \
        [p.parent.parent.name for p in paths]


def wait(api, url, states, seconds=120):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        body = api.get(url).json()
        if body["status"] in states:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{url} never reached {states}: {body}")


def test_the_lab_loop_trains_gates_promotes_and_survives_a_restart(served_run, tmp_path):
    store = tmp_path / "store"
    with client(served_run, store) as api:
        models = api.get("/api/models").json()["models"]
        assert [(m["id"], m["state"], m["parent"]) for m in models] == [(1, "active", None)]
        first, labels = upload(api, served_run, "P1")
        assert first["model_version"] == 1

        few = api.post("/api/models/train")
        assert few.status_code == 422 and "at least 8 reviewed cells" in few.json()["error"]
        second, _ = upload(api, served_run, "P2")
        for case in (first, second):
            for cell, label in zip(case["cells"], labels, strict=True):
                url = f"/api/cases/{case['id']}/cells/{cell['index']}/review"
                assert api.post(url, json={"label": label, "reviewer": "tech"}).status_code == 200
        audit = api.app.state.store.audit_cells()  # the flags decided when stored
        assert {k for k, _ in audit} <= {first["id"], second["id"]}
        n_audit = len(audit)
        n_train = 2 * len(labels) - n_audit
        assert 20 <= n_audit < n_train  # about a fifth; enough to calibrate on

        made = api.post("/api/models/train")
        assert made.status_code == 202
        job = made.json()["job"]
        busy = api.post("/api/models/train")
        assert busy.status_code == 409 and job in busy.json()["error"]
        wait(api, f"/api/jobs/{job}", {"running"})
    # the server stops while the job trains (its training process is ended): nothing is
    # lost, the next start runs the job again
    assert Store(store).jobs.get(job)["status"] == "running"
    with client(served_run, store) as api:
        done = wait(api, f"/api/jobs/{job}", {"done", "failed"})
        assert done["status"] == "done", done["error"]
        assert done["model"] == 2 and done["progress"] == {"epochs_done": 1, "epochs": 1}
        assert done["attempts"] == 2
        assert done["n_cells"] == n_train
        # the job trained on the reviewed cells whose stored flag is not audit, and
        # the corrections manifest marks the audit cells
        audit_paths = {str(api.app.state.store.image_path(case, k).resolve())
                       for case, k in audit}
        with (store / "lab" / "jobs" / job / "cells.csv").open(newline="") as handle:
            trained = {row["path"] for row in csv.DictReader(handle)}
        assert len(trained) == n_train and not trained & audit_paths
        corrections = list(csv.DictReader(io.StringIO(api.get("/api/corrections.csv").text)))
        assert {r["path"] for r in corrections if r["audit"] == "True"} == audit_paths
        assert {r["path"] for r in corrections if r["audit"] == "False"} == trained

        versions = {m["id"]: m for m in api.get("/api/models").json()["models"]}
        candidate = versions[2]
        assert (candidate["state"], candidate["parent"]) == ("candidate", 1)
        assert candidate["reviews"]["n"] == n_train and candidate["audit"]["n"] == n_audit
        assert versions[1]["audit"]["n"] == n_audit
        assert 0 <= candidate["audit"]["accuracy"] <= 1
        low, high = candidate["audit"]["ci"]
        assert low <= candidate["audit"]["accuracy"] <= high
        assert candidate["source"]["n"] > 0 and "gate" in candidate
        page = html_tags(api.get("/models").text)
        rows = {a["data-version"]: a["class"] for t, a in page if t == "tr" and "class" in a}
        assert rows == {"1": "state-active", "2": "state-candidate"}
        buttons = [a for t, a in page if t == "button" and "promote" in (a.get("class") or "")]
        assert {b["data-version"] for b in buttons} == {"2"} and len(buttons) == 2
        assert ("p", {"id": "job", "data-job": job, "data-status": "done"}) in page

        # a gate that asks for more audit cells than the lab has refuses, with its numbers
        lab = api.app.state.lab
        lab.settings = replace(FAST, gate=GateRule(min_audit=1000))
        refused = api.post("/api/models/2/promote")
        assert refused.status_code == 409
        assert f"only {n_audit} reviewed audit cells" in refused.json()["error"]
        assert "sign test" in refused.json()["error"]  # the rule is stated
        # a lenient gate (any difference allowed) lets it through, re-calibrated
        lab.settings = replace(FAST, gate=GateRule(alpha=1e-12, tolerance=1.0, min_audit=1))
        promoted = api.post("/api/models/2/promote")
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["state"] == "active" and promoted.json()["forced_by"] is None
        assert promoted.json()["calibration"]["done"] is True
        states = {m["id"]: m["state"] for m in api.get("/api/models").json()["models"]}
        assert states == {1: "retired", 2: "active"}
        served = api.get("/api/models").json()["served"][0]
        assert served["version"] == 2 and served["source"].endswith("calibrated")
        assert api.post("/api/models/2/promote").status_code == 409  # not a candidate

        third, _ = upload(api, served_run, "P3")
        assert third["model_version"] == 2  # a new case uses the new version
        page = html_tags(api.get(f"/cases/{third['id']}").text)
        assert ("a", {"href": "/models", "id": "case-version"}) in page
        assert ("button", {"type": "button", "id": "rerun"}) in page
        assert api.post(f"/api/cases/{first['id']}/rerun").status_code == 202
        rerun = wait(api, f"/api/cases/{first['id']}", {"done", "failed"})
        assert rerun["model_version"] == 2
        assert all(c["reviewed_label"] for c in rerun["cells"])  # reviews kept

    with client(served_run, store) as api:  # a restart keeps the versions and the model
        states = {m["id"]: m["state"] for m in api.get("/api/models").json()["models"]}
        assert states == {1: "retired", 2: "active"}
        assert api.get("/api/models").json()["served"][0]["version"] == 2
        fourth, _ = upload(api, served_run, "P4")
        assert fourth["model_version"] == 2


def test_a_forced_promotion_records_who_forced_it(served_run, tmp_path):
    store = Store(tmp_path / "store")
    with client(served_run, tmp_path / "store") as api:
        # a candidate nobody can vouch for: no audit cell is reviewed, the gate refuses
        store.versions.add_candidate(1, served_run / "run", [])
        refused = api.post("/api/models/2/promote")
        assert refused.status_code == 409 and "only 0 reviewed audit cells" in refused.text
        anonymous = api.post("/api/models/2/promote?force=true")
        assert anonymous.status_code == 422 and "reviewer" in anonymous.json()["error"]
        forced = api.post("/api/models/2/promote?force=true", json={"reviewer": "dr x"})
        assert forced.status_code == 200 and forced.json()["state"] == "active"
        assert forced.json()["forced_by"] == "dr x"
        assert "calibration needs 20" in forced.json()["calibration"]["reason"]
        assert api.post("/api/models/9/promote").status_code == 404
        assert api.get("/api/jobs/nope").status_code == 404
    assert store.versions.get(2).forced_by == "dr x"


def test_a_store_started_with_another_model_refuses_a_different_first_model(served_run,
                                                                             tmp_path):
    Store(tmp_path / "s").versions.ensure_initial(tmp_path / "elsewhere")
    models = Models([served_run / "run"], InferenceOptions(engine="torch"))
    app = create_app(models, Store(tmp_path / "s"), ServeSettings(lab=FAST))
    with pytest.raises(LeukotreeError, match="model versions start from"), \
            TestClient(app, base_url="http://localhost"):
        pass


def test_serve_takes_the_lab_options(served_run, tmp_path, monkeypatch):
    import uvicorn

    from leukotree.cli import main

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    assert main(["serve", str(served_run / "run"), "--store", str(tmp_path / "s"),
                 "--engine", "torch", "--auto-promote", "--train-epochs", "2",
                 "--min-reviews", "30", "--gate-tolerance", "0.05"]) == 0
    settings = apps[0].state.lab.settings
    assert settings.auto_promote and (settings.epochs, settings.min_reviews) == (2, 30)
    assert settings.gate.tolerance == 0.05 and settings.gate.alpha == 0.05
    apps[0].state.store.release()
