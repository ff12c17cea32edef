"""The review queue of ``leukotree serve``: cells of open cases not reviewed yet, chosen
by the library's policy, with an audit flag decided once per cell and kept in the store."""

import sqlite3

from test_api import cells, client, wait_done

from conftest import html_tags
from leukotree.lab.select import audit_flag
from leukotree.serve.store import Store


def _cases(api, served_run, k=2, n=6):
    """``k`` cases of ``n`` different cells each."""
    files = cells(served_run, k * n)
    out = []
    for i in range(k):
        made = api.post("/api/cases", files=files[i * n:(i + 1) * n],
                        data={"patient": f"P{i}"})
        out.append(wait_done(api, made.json()["id"]))
    return out


def test_the_queue_offers_unreviewed_cells_of_open_cases(served_run, tmp_path):
    with client(served_run, tmp_path / "s") as api:
        first, second = _cases(api, served_run)
        queue = api.get("/api/review-queue", params={"n": 5}).json()
        assert queue["n_candidates"] == 12 and len(queue["cells"]) == 5
        keys = [(c["case"], c["index"]) for c in queue["cells"]]
        assert len(set(keys)) == 5 and {c["case"] for c in queue["cells"]} <= {
            first["id"], second["id"]}
        audit = Store(tmp_path / "s").audit_cells()
        assert all(c["audit"] == ((c["case"], c["index"]) in audit) for c in queue["cells"])
        assert all(c["reason"] for c in queue["cells"])
        assert sum(c["audit"] for c in queue["cells"]) == min(1, len(audit))  # 20% of 5
        # the same queue again; a reviewed cell leaves it, the others stay
        assert api.get("/api/review-queue", params={"n": 5}).json() == queue
        done = queue["cells"][0]
        api.post(f"/api/cases/{done['case']}/cells/{done['index']}/review",
                 json={"label": done["label"], "reviewer": "tech"})
        after = api.get("/api/review-queue", params={"n": 50}).json()
        assert after["n_candidates"] == 11 and len(after["cells"]) == 11  # all that are left
        assert (done["case"], done["index"]) not in {(c["case"], c["index"])
                                                     for c in after["cells"]}
        # a signed-out case is closed: none of its cells is offered
        api.post(f"/api/cases/{first['id']}/signout", json={"label": "ALL", "reviewer": "x"})
        closed = api.get("/api/review-queue", params={"n": 50}).json()
        assert {c["case"] for c in closed["cells"]} == {second["id"]}


def test_bad_queue_requests_are_clear_4xx(served_run, tmp_path):
    with client(served_run, tmp_path / "s") as api:
        assert api.get("/api/review-queue").json()["cells"] == []
        _cases(api, served_run, k=1, n=3)
        zero = api.get("/api/review-queue", params={"n": 0})
        assert zero.status_code == 422 and "n" in zero.json()["error"]
        policy = api.get("/api/review-queue", params={"policy": "smart"})
        assert policy.status_code == 422 and "Did you mean" not in policy.json()["error"] \
            and "active" in policy.json()["error"]
        model = api.get("/api/review-queue", params={"model": "nope"})
        assert model.status_code == 422 and "No model 'nope'" in model.json()["error"]
        assert len(api.get("/api/review-queue", params={"policy": "random"}).json()[
            "cells"]) == 3
        # a cell uploaded twice (the same bytes) is offered once
        api.post("/api/cases", files=cells(served_run, 1), data={"patient": "again"})
        wait_done(api, api.get("/api/cases").json()[0]["id"])
        twice = api.get("/api/review-queue", params={"n": 10}).json()
        assert twice["n_candidates"] == 4 and len(twice["cells"]) == 3


def test_audit_flags_are_decided_once_and_kept(served_run, tmp_path):
    with client(served_run, tmp_path / "s", audit_share=0.5) as api:
        (case,) = _cases(api, served_run, k=1, n=8)
    store = Store(tmp_path / "s")
    expected = {(case["id"], i) for i in range(8) if audit_flag(f"{case['id']}:{i}", 0.5)}
    assert store.audit_cells() == expected
    # a cell stored before flags existed is decided when the server starts, then kept
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE cells SET audit = NULL WHERE idx = 0")
    with client(served_run, tmp_path / "s", audit_share=0.0):
        pass
    again = {k for k in store.audit_cells() if k[1] != 0}
    assert again == {k for k in expected if k[1] != 0}  # decided flags never change
    assert (case["id"], 0) not in store.audit_cells()  # decided at share 0


def test_the_review_queue_page_lists_cells_with_a_review_form(served_run, tmp_path):
    with client(served_run, tmp_path / "s") as api:
        _cases(api, served_run, k=1, n=4)
        queue = api.get("/api/review-queue", params={"n": 3}).json()
        page = api.get("/review-queue", params={"n": 3})
        assert page.status_code == 200
        tags = html_tags(page.text)
        images = [a["src"] for t, a in tags if t == "img"]
        assert images == [f"/cases/{c['case']}/cells/{c['index']}/image"
                          for c in queue["cells"]]
        assert sum(t == "button" and "queue-save" in (a.get("class") or "")
                   for t, a in tags) == 3
        for c in queue["cells"]:
            assert c["reason"] in page.text
        nav = [a.get("href") for t, a in html_tags(api.get("/").text) if t == "a"]
        assert "/review-queue" in nav
