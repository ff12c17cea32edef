"""The JSON API of ``leukotree serve`` (FastAPI's TestClient): cases, results with one
entry per uploaded file, reviews, corrections, sign-out, limits, tokens, restarts and
escaping."""

import csv
import io
import time
import zipfile

import pytest
from fastapi.testclient import TestClient

from conftest import html_tags
from leukotree.errors import LeukotreeError
from leukotree.inference.options import InferenceOptions
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.queue import candidate_pool
from leukotree.serve.store import Store
from leukotree.serve.uploads import Limits
from leukotree.serve.worker import Models


def client(served_run, store_dir, **settings):
    models = Models([served_run / "run"], InferenceOptions(engine="torch"))
    return TestClient(create_app(models, Store(store_dir), ServeSettings(**settings)),
                      base_url="http://localhost")


def cells(served_run, n=6):
    return [("files", (p.name, p.read_bytes(), "image/png"))
            for p in sorted((served_run / "data").rglob("*.png"))[:n]]


def wait_done(api, case_id, headers=None):
    for _ in range(200):
        body = api.get(f"/api/cases/{case_id}", headers=headers).json()
        if body["status"] in {"done", "failed"}:
            return body
        time.sleep(0.05)
    raise AssertionError("the case never finished")


def test_a_case_from_upload_to_corrections(served_run, tmp_path):
    with client(served_run, tmp_path / "store") as api:
        assert api.get("/api/health").json()["status"] == "ok"
        files = [*cells(served_run), ("files", ("broken.png", b"\x89PNG nope", "image/png")),
                 ("files", ("notes.txt", b"hello", "text/plain"))]
        made = api.post("/api/cases", files=files, data={"patient": "P-17"})
        assert made.status_code == 201 and made.json()["n_cells"] == 8
        case = wait_done(api, made.json()["id"])
        assert case["status"] == "done" and len(case["cells"]) == 8
        errors = {c["name"]: c["error"] for c in case["cells"] if c["error"]}
        assert set(errors) == {"broken.png", "notes.txt"}  # named, never dropped
        leaves = api.get("/api/models").json()["served"][0]["leaves"]
        good = [c for c in case["cells"] if not c["error"]]
        assert all(c["label"] in leaves for c in good)
        assert abs(sum(good[0]["probabilities"][leaf] for leaf in leaves) - 1) < 1e-3
        assert case["diagnosis"]["label"] in leaves and "referred" in case["diagnosis"]
        url = f"/api/cases/{case['id']}/cells/{good[0]['index']}/review"
        assert api.post(url, json={"label": "AML", "reviewer": "dr x"}).status_code == 200
        bad = api.post(url, json={"label": "AMl", "reviewer": "dr x"})
        assert bad.status_code == 422 and "Did you mean 'AML'" in bad.json()["error"]
        assert api.post(url, json={"label": "AML", "reviewer": " "}).status_code == 422
        assert api.post("/api/cases/nope/cells/0/review",
                        json={"label": "AML", "reviewer": "x"}).status_code == 404
        rows = list(csv.DictReader(io.StringIO(api.get("/api/corrections.csv").text)))
        assert [(r["label"], r["patient"]) for r in rows] == [("AML", "P-17")]
        signed = api.post(f"/api/cases/{case['id']}/signout",
                          json={"label": "ALL", "reviewer": "dr x"})
        assert signed.status_code == 200
        assert api.get(f"/api/cases/{case['id']}").json()["signed_by"] == "dr x"
        assert api.get(f"/cases/{case['id']}/report").status_code == 200
        png = api.get(f"/cases/{case['id']}/cells/{good[0]['index']}/heatmap/Leukemia")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"


def test_limits_are_clear_4xx_errors(served_run, tmp_path):
    from PIL import Image

    with client(served_run, tmp_path / "s", limits=Limits(max_files=3, max_pixels=10_000)) as api:
        too_many = api.post("/api/cases", files=cells(served_run, 4), data={"patient": "p"})
        assert too_many.status_code == 413 and "more than 3 files" in too_many.json()["error"]
        big = io.BytesIO()
        Image.new("RGB", (200, 200)).save(big, format="PNG")
        huge = api.post("/api/cases", files=[("files", ("big.png", big.getvalue(), "image/png"))],
                        data={"patient": "p"})
        assert huge.status_code == 413 and "big.png" in huge.json()["error"]
        bad_id = api.post("/api/cases", files=cells(served_run, 1), data={"patient": "a\nb"})
        assert bad_id.status_code == 422
        assert api.get("/api/cases").json() == []  # nothing was stored


def test_zip_archives_become_cells(served_run, tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for _, (name, data, _) in cells(served_run, 3):
            z.writestr(f"p1/{name}", data)
        z.writestr("__MACOSX/._x.png", b"meta")
    with client(served_run, tmp_path / "s") as api:
        made = api.post("/api/cases", files=[("files", ("cells.zip", archive.getvalue(),
                                                        "application/zip"))])
        case = wait_done(api, made.json()["id"])
        assert len(case["cells"]) == 4 and sum(bool(c["error"]) for c in case["cells"]) == 1


def test_a_token_guards_pages_and_api(served_run, tmp_path):
    with client(served_run, tmp_path / "s", token="s3cret") as api:
        assert api.get("/api/health").status_code == 401
        assert api.get("/").status_code == 401
        ok = api.get("/api/health", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert api.post("/login", data={"token": "wrong"}).status_code == 401
        logged = api.post("/login", data={"token": "s3cret"}, follow_redirects=False)
        assert logged.status_code == 303 and "s3cret" not in logged.headers["set-cookie"]
        assert api.get("/").status_code == 200  # the session cookie now travels


def test_cases_survive_a_restart_and_interrupted_ones_run_again(served_run, tmp_path):
    store = Store(tmp_path / "s")
    from leukotree.serve.uploads import check_file

    uploads = [check_file(name, data, Limits()) for _, (name, data, _) in cells(served_run, 2)]
    case_id = store.create_case("P-9", "run", uploads)
    store.set_status(case_id, "running")  # the server stopped while classifying it
    with client(served_run, tmp_path / "s") as api:
        case = wait_done(api, case_id)
    assert case["status"] == "done" and len(case["cells"]) == 2


def test_user_text_is_escaped_in_every_page(served_run, tmp_path):
    evil = "<script>alert(1)</script>"
    with client(served_run, tmp_path / "s") as api:
        data = cells(served_run, 1)[0][1][1]
        made = api.post("/api/cases", files=[("files", (f"{evil}.png", data, "image/png"))],
                        data={"patient": evil})
        case_id = made.json()["id"]
        wait_done(api, case_id)
        for page in ("/", f"/cases/{case_id}"):
            text = api.get(page).text
            scripts = [a for t, a in html_tags(text) if t == "script"]
            assert all(a.get("src") == "/static/app.js" or a.get("type") == "application/json"
                       for a in scripts)
            assert "alert(1)</script>" not in text.replace("\\u003c", "<").split(
                'type="application/json"')[0]
            assert "&lt;script&gt;" in text


def test_heat_maps_come_from_the_checkpoint_when_onnx_runtime_predicts(served_run, tmp_path):
    import threading

    models = Models([served_run / "run"], InferenceOptions(engine="onnx"))
    assert models.predictors["run"].engine == "onnxruntime"
    with TestClient(create_app(models, Store(tmp_path / "store"), ServeSettings()),
                    base_url="http://localhost") as api:
        case = wait_done(api, api.post("/api/cases", files=cells(served_run, 2)).json()["id"])
        assert case["status"] == "done"
        got = {}

        def fetch(node):  # the levels of one cell, requested at once as the page does
            got[node] = api.get(f"/cases/{case['id']}/cells/0/heatmap/{node}")

        threads = [threading.Thread(target=fetch, args=(n,)) for n in ("Leukemia", "Acute")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for node, response in got.items():
            assert response.status_code == 200, (node, response.text)
            assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert api.get("/models").status_code == 200


def test_the_served_models_can_decode_another_lab_with_another_crop_mode(served_run,
                                                                         tmp_path):
    models = Models([served_run / "run"], InferenceOptions(engine="torch", crop_mode="auto"))
    assert models.views["run"].crop_mode == "auto"  # the worker and heat maps decode alike
    assert models.predictors["run"].model_config.crop_mode == "centre"  # its own: kept
    with TestClient(create_app(models, Store(tmp_path / "store"), ServeSettings()),
                    base_url="http://localhost") as api:
        case = wait_done(api, api.post("/api/cases", files=cells(served_run, 3)).json()["id"])
        assert case["status"] == "done" and all(c["label"] for c in case["cells"])
        assert api.get(f"/cases/{case['id']}/cells/0/heatmap/Leukemia").status_code == 200


def test_serving_another_magnification_crops_the_models_physical_field(served_run, tmp_path):
    from leukotree.engine.config import resolve_config
    from leukotree.engine.trainer import train

    with pytest.raises(LeukotreeError, match="trained without one"):
        Models([served_run / "run"], InferenceOptions(engine="torch", pixel_size=0.2))
    run = tmp_path / "scaled"
    train(served_run / "data", run, resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "img_size": 32, "pixel_size": 0.4}), progress=False)
    # twice the magnification
    models = Models([run], InferenceOptions(engine="torch", pixel_size=0.2))
    window = 40 * 0.4 / 0.2  # synthetic 40 px images, crop 1: a 16 um field
    # the worker, heat maps and reports decode alike
    assert models.views["scaled"].decode_options()["window"] == window
    assert (models.options.crop_mode, models.options.pixel_size) == (None, 0.2)
    # the case report's options: the served ones with the app's, the served left as given
    report = models.options_with(aggregate="mean", confidence="0.9")
    assert (report.pixel_size, report.aggregate, report.confidence) == (0.2, "mean", "0.9")
    assert (models.options.aggregate, models.options.confidence) == ("majority", None)
    # the case report shows the cells decoded at the served pixel size (no OOD flag, so
    # that the padded view is classified and shown)
    from leukotree.data.images import load_rgb_array
    from leukotree.models.checkpoint import update_checkpoint
    from leukotree.report.html import png_data_uri

    update_checkpoint(run / "best.pt", ood=None)
    models = Models([run], InferenceOptions(engine="torch", pixel_size=0.2))
    upload = cells(served_run, 1)
    with TestClient(create_app(models, Store(tmp_path / "s"), ServeSettings()),
                    base_url="http://localhost") as api:
        case = wait_done(api, api.post("/api/cases", files=upload).json()["id"])
        page = api.get(f"/cases/{case['id']}/report").text
    shown = sorted((served_run / "data").rglob("*.png"))[0]
    assert png_data_uri(load_rgb_array(shown, 32, window=window)) in page


def test_the_case_report_is_the_workers_own_results_by_its_engine(served_run, tmp_path,
                                                                  monkeypatch):
    from leukotree.inference.export import export_onnx

    onnx = export_onnx(served_run / "run", tmp_path / "m.onnx")
    store = Store(tmp_path / "store")
    models = Models([onnx], InferenceOptions(engine="auto"))  # no PyTorch model at all
    with TestClient(create_app(models, store, ServeSettings(confidence="0.99")),
                    base_url="http://localhost") as api:
        case = wait_done(api, api.post("/api/cases", files=cells(served_run, 4),
                                       data={"patient": "P-3"}).json()["id"])
        assert case["status"] == "done"
        written = store.reports / f"{case['id']}.html"
        assert written.is_file()  # by the worker, from the predictions it stored
        # the route serves that file: nothing is predicted again
        import leukotree.report.patient as report

        monkeypatch.setattr(report, "predict_paths", None)
        page = api.get(f"/cases/{case['id']}/report")
        assert page.status_code == 200 and page.text == written.read_text()
    diagnosis = case["diagnosis"]
    assert "Patient P-3" in page.text and str(onnx) in page.text
    assert f"{diagnosis['n_cells']} cells analysed" in page.text
    headline = diagnosis["label"] if not diagnosis["referred"] else "referral advised"
    assert headline in page.text  # the case page's diagnosis, at the served --confidence


@pytest.fixture(scope="module")
def promising_run(tmp_path_factory):
    """A tiny aml-apl run with conformal answers and a promised patient miss rate."""
    from leukotree.cli import main
    from leukotree.data.synth import generate
    from leukotree.taxonomy import load_taxonomy

    root = tmp_path_factory.mktemp("promise")
    generate(root / "data", load_taxonomy("aml-apl"), patients_per_class=6,
             cells_per_patient=6, size=32, seed=0, progress=False)
    assert main(["train", str(root / "data"), "--out", str(root / "run"), "-t", "aml-apl",
                 "--preset", "tiny-test", "--epochs", "1", "--monitor", "last",
                 "--threads", "1", "--no-progress", "--val-fraction", "0.34",
                 "--coverage", "0.5", "--patient-model", "mean", "--positive", "APL",
                 "--patient-miss-rate", "0.5", "--confidence", "0.5"]) == 0
    return root


def test_a_case_shows_each_cells_answer_and_the_stated_miss_rate(promising_run, tmp_path):
    models = Models([promising_run / "run"], InferenceOptions(engine="torch"))
    with TestClient(create_app(models, Store(tmp_path / "store"), ServeSettings()),
                    base_url="http://localhost") as api:
        files = [("files", (p.name, p.read_bytes(), "image/png"))
                 for p in sorted((promising_run / "data" / "APL").rglob("*.png"))[:6]]
        made = api.post("/api/cases", files=files, data={"patient": "P-1"})
        case = wait_done(api, made.json()["id"])
        assert case["status"] == "done"
        for cell in case["cells"]:
            # two leaves under the root: the answer is a leaf, or the root with both leaves
            assert cell["answer_node"] in {"APL", "AML", "acute-myeloid"}
            assert set(cell["answer_leaves"]) <= {"APL", "AML"}
            assert cell["answer"].startswith(cell["answer_node"])
            if len(cell["answer_leaves"]) == 2:
                assert "APL " in cell["answer"] or "AML " in cell["answer"]
        d = case["diagnosis"]
        assert d["call"] in {"positive", "negative", "referred"}
        assert d["miss_rate"]["statement"].startswith(
            "Stated miss rate: at most 50% of APL patients are called negative, with 50% "
            "confidence")
        page = api.get(f"/cases/{case['id']}").text
        assert 'id="miss-rate"' in page and "Stated miss rate" in page
        assert 'value="answer"' in page  # the cells can be sorted by answer size
        # the review queue weighs the stored answers as `leukotree select` does
        _, pool, rows = candidate_pool(api.app.state.store, api.app.state.models)
        by_index = {c["index"]: c for c in case["cells"]}
        assert pool.answer_nodes == [by_index[r["idx"]]["answer_node"] for r in rows]
        assert pool.answer_sizes.tolist() == [len(by_index[r["idx"]]["answer_leaves"])
                                              for r in rows]
        queue = api.get("/api/review-queue", params={"n": 6, "policy": "uncertainty"}).json()
        assert len(queue["cells"]) == 6
        for cell in queue["cells"]:
            leaves = by_index[cell["index"]]["answer_leaves"]
            said = f"answer {by_index[cell['index']]['answer_node']} (2 classes)"
            assert (said in cell["reason"]) == (len(leaves) == 2 and not cell["audit"])
