"""Hostile requests and careless operators against ``leukotree serve`` (issue #25): one test
per kind of attack or accident, each built at test time and small. Every answer is a 4xx
JSON ``{"error": ...}`` that names the problem (503 when the store fails), nothing is
stored from a refused request, and nothing is a 500 or a traceback."""

import asyncio
import csv
import io
import sqlite3
import struct
import time
import tracemalloc
import zipfile
import zlib

import pytest
from fastapi.testclient import TestClient

from leukotree.cli import main
from leukotree.inference.options import InferenceOptions
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.auth import LoginThrottle, Sessions, bearer, token_matches
from leukotree.serve.store import Store, StoreError
from leukotree.serve.texts import csv_cell
from leukotree.serve.uploads import Limits, UploadRefused, body_allowance, expand, read_form
from leukotree.serve.worker import Models

LOCAL = "http://localhost"


@pytest.fixture(scope="module")
def models(served_run):
    return Models([served_run / "run"], InferenceOptions(engine="torch"))


def app_for(models, store_dir, **settings):
    return create_app(models, Store(store_dir), ServeSettings(**settings))


def client(models, store_dir, **settings):
    return TestClient(app_for(models, store_dir, **settings), base_url=LOCAL)


def png(served_run, k=0):
    return sorted((served_run / "data").rglob("*.png"))[k].read_bytes()


def one_cell(served_run, name="cell.png"):
    return [("files", (name, png(served_run), "image/png"))]


def wait_done(api, case_id):
    for _ in range(400):
        body = api.get(f"/api/cases/{case_id}").json()
        if body["status"] in {"done", "failed"}:
            return body
        time.sleep(0.05)
    raise AssertionError("the case never finished")


def refused(response, status, *words):
    """The response is ``status`` with a JSON error holding every one of ``words``."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    message = response.json()["error"]
    for word in words:
        assert word in message, (word, message)
    return message


def stored_cases(store_dir):
    return sorted(p.name for p in (store_dir / "images").iterdir())


# ------------------------------------------------------------------ hosts and origins
def test_only_allowed_host_names_are_answered(models, tmp_path):
    app = app_for(models, tmp_path / "s")
    for base in ("http://localhost:8000", "http://127.0.0.1:8000", "http://[::1]:8000"):
        assert TestClient(app, base_url=base).get("/api/health").status_code == 200
    rebound = TestClient(app, base_url="http://evil.example:8000")  # DNS rebinding
    refused(rebound.get("/api/cases"), 400, "evil.example", "--allowed-host evil.example")
    refused(rebound.get("/"), 400, "not served here")
    lab = app_for(models, tmp_path / "s2", allowed_hosts=("lab.example",))
    assert TestClient(lab, base_url="http://lab.example").get("/").status_code == 200
    refused(TestClient(lab, base_url="http://other.example").get("/"), 400)


def test_cross_site_writes_are_refused(models, served_run, tmp_path):
    with client(models, tmp_path / "s") as api:
        for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"},
                        {"Origin": "http://localhost:9999"}):  # another port: another origin
            refused(api.post("/api/cases", files=one_cell(served_run), headers=headers), 403,
                    "Cross-site request refused")
        refused(api.post("/api/cases", files=one_cell(served_run),
                         headers={"Sec-Fetch-Site": "cross-site"}), 403, "cross-site")
        refused(api.post("/login", data={"token": "x"}, headers={"Origin": "http://a.example"}),
                403)
        assert api.get("/api/cases").json() == []  # nothing was created
        same = api.post("/api/cases", files=one_cell(served_run),
                        headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
        assert same.status_code == 201
        # reading from another origin is not a write: allowed, and the browser's CORS
        # rules keep the answer from the other page (no Access-Control-Allow-Origin)
        read = api.get("/api/cases", headers={"Origin": "http://evil.example"})
        assert read.status_code == 200 and "access-control-allow-origin" not in read.headers


# ------------------------------------------------------------------ damaged zips
def _zip_of(members, method=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return bytearray(buffer.getvalue())


def _patch_headers(data, offset_local, offset_central, fmt, value):
    """Set one field in every local and central header of a zip."""
    for signature, offset in ((b"PK\x03\x04", offset_local), (b"PK\x01\x02", offset_central)):
        at = data.find(signature)
        while at >= 0:
            struct.pack_into(fmt, data, at + offset, value)
            at = data.find(signature, at + 4)
    return bytes(data)


def test_damaged_zips_are_4xx_with_the_reason(models, served_run, tmp_path):
    cell = png(served_run)
    bad_crc = _zip_of({"a.png": cell})
    bad_crc[bad_crc.find(cell[:16]) + 100] ^= 0xFF  # one byte of the member flipped
    encrypted = _patch_headers(_zip_of({"a.png": cell}), 6, 8, "<H", 0x1)
    deflate64 = _patch_headers(_zip_of({"a.png": cell}), 8, 10, "<H", 9)
    cases = [(bytes(bad_crc), "damaged in the archive"), (encrypted, "encrypted"),
             (deflate64, "compression the server cannot unpack")]
    with client(models, tmp_path / "s") as api:
        for data, reason in cases:
            reply = api.post("/api/cases", files=[("files", ("cells.zip", data, "x"))])
            refused(reply, 422, "cells.zip/a.png", reason)
        assert stored_cases(tmp_path / "s") == []


# ------------------------------------------------------------------ limits while streaming
def _zeros_zip(name, size, level=9):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z, \
            z.open(name, "w") as member:
        block = bytes(2**20)
        for _ in range(size // 2**20):
            member.write(block)
    return buffer.getvalue()


def test_a_zip_of_400_mb_of_zeros_is_refused_without_unpacking_it(models, tmp_path):
    bomb = _zeros_zip("cell.png", 400 * 2**20)
    assert len(bomb) < 600_000
    tracemalloc.start()
    with pytest.raises(UploadRefused) as err:
        expand([("bomb.zip", bomb)], Limits())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.status == 413 and "419,430,400 bytes" in str(err.value)
    assert peak < 20 * 2**20  # refused from its header: nothing unpacked
    with client(models, tmp_path / "s") as api:
        refused(api.post("/api/cases", files=[("files", ("bomb.zip", bomb, "x"))]), 413,
                "bomb.zip/cell.png", "per file")
    assert stored_cases(tmp_path / "s") == []


def test_a_zip_whose_header_lies_about_its_size_is_refused(served_run):
    data = bytearray(_zeros_zip("cell.png", 8 * 2**20, level=1))
    struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 24, 1000)  # says 1,000 bytes
    with pytest.raises(UploadRefused) as err:
        expand([("liar.zip", bytes(data))], Limits())
    assert err.value.status == 422 and "damaged" in str(err.value)
    # members that each fit but together unpack past the case's limit
    many = _zeros_zip("a.png", 2**20)
    limits = Limits(max_bytes=3 * 2**20, max_file_bytes=2 * 2**20)
    with pytest.raises(UploadRefused) as err:
        expand([("a.zip", many), ("b.zip", many), ("c.zip", many), ("d.zip", many)], limits)
    assert err.value.status == 413 and "3,145,728 bytes" in str(err.value)


def _chunks(n, size=2**20, seen=None):
    async def generate():
        yield (b"--B\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
               b"Content-Type: image/png\r\n\r\n")
        for _ in range(n):
            if seen is not None:
                seen.append(1)
            yield bytes(size)
    return generate()


def test_a_large_body_is_refused_while_it_streams(models, served_run, tmp_path):
    limits = Limits(max_bytes=2_000_000)
    seen = []
    with pytest.raises(UploadRefused) as err:  # 300 MB without Content-Length (chunked)
        asyncio.run(read_form(_chunks(300, seen=seen), "multipart/form-data; boundary=B",
                              None, limits))
    assert err.value.status == 413 and len(seen) <= 3  # read 2-3 MB of 300, then stopped
    seen.clear()
    with pytest.raises(UploadRefused) as err:  # a Content-Length beyond the limit: no read
        asyncio.run(read_form(_chunks(300, seen=seen), "multipart/form-data; boundary=B",
                              str(300 * 2**20), limits))
    assert err.value.status == 413 and "314,572,800 bytes" in str(err.value) and seen == []
    assert body_allowance(limits) < 2_000_000 + 5 * 2**20
    with client(models, tmp_path / "s", limits=limits) as api:
        big = [("files", ("big.png", bytes(2_100_000), "image/png"))]
        refused(api.post("/api/cases", files=big), 413, "2,000,000 bytes", "--max-bytes")
        refused(api.post("/api/cases", files=one_cell(served_run),
                         headers={"Content-Length": str(300 * 2**20)}), 413)
    assert stored_cases(tmp_path / "s") == []


def test_more_than_1000_files_are_counted_by_the_app(models, tmp_path):
    notes = [("files", (f"n{i}.txt", b"x", "text/plain")) for i in range(1500)]
    with client(models, tmp_path / "s", limits=Limits(max_files=2000)) as api:
        made = api.post("/api/cases", files=notes, data={"patient": "many"})
        assert made.status_code == 201 and made.json()["n_cells"] == 1500
    with client(models, tmp_path / "t", limits=Limits(max_files=1200)) as api:
        refused(api.post("/api/cases", files=notes), 413, "more than 1200 files",
                "--max-files")


# ------------------------------------------------------------------ sign-out and reviews
def test_sign_out_is_final_and_amendments_are_new_entries(models, served_run, tmp_path):
    with client(models, tmp_path / "s") as api:
        store = api.app.state.store
        waiting = store.create_case("P-1", "run", [])  # never submitted: stays queued
        store.set_status(waiting, "running")
        broken = store.create_case("P-2", "run", [])
        store.set_status(broken, "failed", "no readable cell")
        refused(api.post(f"/api/cases/{broken}/signout", json={"label": "AML",
                                                               "reviewer": "a"}),
                409, "failed (no readable cell)")
        refused(api.post(f"/api/cases/{waiting}/signout", json={"label": "AML",
                                                                "reviewer": "a"}),
                409, "is running")
        refused(api.post(f"/api/cases/{waiting}/cells/0/review",
                         json={"label": "AML", "reviewer": "a"}), 409, "is running")
        case = wait_done(api, api.post("/api/cases", files=one_cell(served_run)).json()["id"])
        url = f"/api/cases/{case['id']}"
        refused(api.post(f"{url}/amendments", json={"label": "ALL", "reviewer": "b",
                                                    "reason": "x"}), 409, "not signed out")
        assert api.post(f"{url}/cells/0/review", json={"label": "AML",
                                                       "reviewer": "a"}).status_code == 200
        assert api.post(f"{url}/signout", json={"label": "AML", "reviewer": "a"}).status_code \
            == 200
        refused(api.post(f"{url}/signout", json={"label": "ALL", "reviewer": "b"}), 409,
                "signed out as AML by a", "final")
        refused(api.post(f"{url}/cells/0/review", json={"label": "ALL", "reviewer": "b"}),
                409, "final")
        amended = api.post(f"{url}/amendments", json={"label": "CML", "reviewer": "b",
                                                      "reason": "flow cytometry"})
        assert amended.status_code == 201
        body = api.get(url).json()
        assert (body["final_label"], body["signed_by"], body["current_label"]) == \
            ("AML", "a", "CML")
        assert [(a["label"], a["reviewer"], a["reason"]) for a in body["amendments"]] == \
            [("CML", "b", "flow cytometry")]
        kinds = [r["kind"] for r in store.reviews(case["id"])]
        assert kinds == ["cell", "signout", "amendment"]
        page = api.get(f"/cases/{case['id']}").text
        assert "Amended to CML by b" in page and "flow cytometry" in page


def test_review_labels_must_be_leaves(models, served_run, tmp_path):
    with client(models, tmp_path / "s") as api:
        case = wait_done(api, api.post("/api/cases", files=one_cell(served_run)).json()["id"])
        url = f"/api/cases/{case['id']}"
        refused(api.post(f"{url}/cells/0/review", json={"label": "Leukemia", "reviewer": "a"}),
                422, "'Leukemia' is an inner node", "AML")
        refused(api.post(f"{url}/signout", json={"label": "Acute", "reviewer": "a"}), 422,
                "inner node")
        assert api.get(f"{url}").json()["final_label"] is None


# ------------------------------------------------------------------ the corrections file
def test_corrections_neutralise_formulas_and_patients_default_to_the_case(models, served_run,
                                                                          tmp_path):
    assert [csv_cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", "P-1", "")] \
        == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\rx", "P-1", ""]
    with client(models, tmp_path / "s") as api:
        ids = []
        for patient in ("=HYPERLINK(\"http://x\")", "", ""):
            made = api.post("/api/cases", files=one_cell(served_run), data={"patient": patient})
            ids.append(wait_done(api, made.json()["id"])["id"])
            assert api.post(f"/api/cases/{ids[-1]}/cells/0/review",
                            json={"label": "AML", "reviewer": "@x"}).status_code == 200
        text = api.get("/api/corrections.csv").text
    rows = list(csv.DictReader(io.StringIO(text)))
    by_case = {r["path"].split("/")[-2]: r["patient"] for r in rows}
    assert by_case == {ids[0]: "'=HYPERLINK(\"http://x\")", ids[1]: ids[1], ids[2]: ids[2]}


# ------------------------------------------------------------------ text in requests
def test_every_string_has_a_length_limit(models, served_run, tmp_path):
    with client(models, tmp_path / "s") as api:
        case = wait_done(api, api.post("/api/cases", files=one_cell(served_run)).json()["id"])
        review = f"/api/cases/{case['id']}/cells/0/review"
        refused(api.post(review, json={"label": "AML", "reviewer": "x" * 20 * 2**20}), 413,
                "65,536 bytes")
        refused(api.post(review, json={"label": "AML", "reviewer": "x" * 201}), 422,
                "reviewer", "201 characters", "at most 200")
        refused(api.post(review, json={"label": "A" * 300, "reviewer": "x"}), 422, "label")
        refused(api.post("/api/cases", files=one_cell(served_run), data={"patient": "p" * 201}),
                422, "patient id", "201 characters")
        refused(api.post("/api/cases", files=one_cell(served_run), data={"patient": "p" * 5000}),
                413, "'patient'", "4,096 bytes")
        long_name = "n" * 3000 + ".png"
        made = api.post("/api/cases", files=one_cell(served_run, long_name))
        shown = wait_done(api, made.json()["id"])["cells"][0]["name"]
        assert len(shown) == 500 and shown.endswith("...")
        assert api.get("/api/cases/" + "x" * 5000).status_code == 404


def test_control_and_bidi_characters_are_refused_in_ids(models, served_run, tmp_path):
    with client(models, tmp_path / "s") as api:
        for evil, code in (("a\x00b", "U+0000"), ("a\u2028b", "U+2028"),
                           ("invoice\u202egnp.exe", "U+202E"), ("a\u200bb", "U+200B"),
                           ("a\tb", "U+0009")):
            refused(api.post("/api/cases", files=one_cell(served_run), data={"patient": evil}),
                    422, "patient id", code)
        made = api.post("/api/cases", files=one_cell(served_run, "x\u202egnp.png"))
        case = wait_done(api, made.json()["id"])
        assert case["cells"][0]["name"] == "x\\u202egnp.png"  # shown, escaped
        refused(api.post(f"/api/cases/{case['id']}/cells/0/review",
                         json={"label": "AML", "reviewer": "dr\u202e x"}), 422, "U+202E")
        assert len(api.get("/api/cases").json()) == 1


# ------------------------------------------------------------------ one server per store
def test_a_second_server_on_a_store_is_refused_naming_the_first(models, served_run, tmp_path):
    import os
    import socket

    first = Store(tmp_path / "s")
    first.hold()
    with pytest.raises(StoreError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        Store(tmp_path / "s").hold()
    with pytest.raises(StoreError, match="in use by another leukotree serve"), \
            client(models, tmp_path / "s"):
        pass
    assert main(["serve", str(served_run / "run"), "--store", str(tmp_path / "s")]) == 2
    first.release()
    second = Store(tmp_path / "s")
    second.hold()  # free again once the first lets go
    second.release()


# ------------------------------------------------------------------ unusable stores
def test_an_unusable_store_is_a_clear_error_at_start(models, served_run, tmp_path, capsys,
                                                     monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="Cannot create the store folder"):
        Store(tmp_path / "file" / "store")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "leukotree.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="damaged, truncated or not a leukotree database"):
        Store(garbage)
    full = Store(tmp_path / "full")  # a real store with cases, then cut short
    for _ in range(40):
        full.create_case("p" * 150, "run", [])
    database = full.path.read_bytes()
    assert len(database) > 8192
    full.path.write_bytes(database[:4096])
    with pytest.raises(StoreError, match="cannot be used"):
        Store(tmp_path / "full")
    full.path.write_bytes(b"")  # 0 bytes beside the images of 40 cases
    with pytest.raises(StoreError, match=r"is empty \(0 bytes\).*images of 40 case"):
        Store(tmp_path / "full")
    assert main(["serve", str(served_run / "run"), "--store", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "Restore the database" in err and "Traceback" not in err

    def read_only(self, data):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(type(tmp_path), "write_bytes", read_only)
    with pytest.raises(StoreError, match=r"cannot be written \(Read-only file system"):
        Store(tmp_path / "ro")


def test_a_store_that_fails_later_is_a_503_not_a_500(models, served_run, tmp_path,
                                                     monkeypatch):
    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    with client(models, tmp_path / "s") as api:
        monkeypatch.setattr(api.app.state.store, "create_case", broken)
        refused(api.post("/api/cases", files=one_cell(served_run)), 503,
                "readonly database", "not saved")
        monkeypatch.setattr(api.app.state.store, "cases", broken)
        refused(api.get("/api/cases"), 503)


# ------------------------------------------------------------------ sessions and tokens
def test_sessions_are_random_expire_and_end_at_logout(models, tmp_path):
    with client(models, tmp_path / "s", token="s3cret") as api:
        refused(api.get("/api/health", headers={"Authorization": "s3cret"}), 401)
        refused(api.get("/api/health", headers={"Authorization": "Bearer wrong"}), 401)
        for header in ("Bearer s3cret", "bearer s3cret"):
            assert api.get("/api/health", headers={"Authorization": header}).status_code == 200
        cookies = []
        for _ in range(2):
            api.cookies.clear()
            assert api.post("/login", data={"token": "s3cret"},
                            follow_redirects=False).status_code == 303
            cookies.append(api.cookies.get("leukotree_session"))
        assert cookies[0] != cookies[1] and len(cookies[0]) >= 43  # random, 256 bits
        assert api.get("/").status_code == 200
        logout = api.post("/logout", follow_redirects=False)
        assert logout.status_code == 303
        api.cookies.set("leukotree_session", cookies[1])  # replaying the old cookie
        assert api.get("/").status_code == 401
        refused(api.get("/api/cases"), 401, "Bearer")
    now = [0.0]
    sessions = Sessions(idle=60, maximum=100, clock=lambda: now[0])
    sid = sessions.open()
    now[0] = 50
    assert sessions.valid(sid)
    now[0] = 109
    assert not sessions.valid(sid)  # past the maximum, though used 59 s ago
    sid = sessions.open()
    now[0] = 170
    assert not sessions.valid(sid)  # idle for 61 s
    assert token_matches("abc", "abc") and not token_matches("abc", "abcd")
    assert bearer("Bearer  t ") == "t" and bearer("t") is None and bearer("Basic t") is None


def test_logins_are_throttled(models, tmp_path):
    with client(models, tmp_path / "s", token="s3cret") as api:
        for _ in range(5):
            assert api.post("/login", data={"token": "guess"}).status_code == 401
        blocked = api.post("/login", data={"token": "s3cret"})
        assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
        assert "Too many wrong tokens" in blocked.text
    now = [0.0]
    throttle = LoginThrottle(max_failures=2, window=10, clock=lambda: now[0])
    throttle.failed("a")
    throttle.failed("a")
    assert throttle.retry_after("a") == 10 and throttle.retry_after("b") == 0
    now[0] = 10.5
    assert throttle.retry_after("a") == 0


# ------------------------------------------------------------------ headers, framework errors
def test_security_headers_on_every_answer(models, tmp_path):
    with client(models, tmp_path / "s") as api:
        for response in (api.get("/"), api.get("/api/cases"), api.get("/api/nope"),
                         TestClient(api.app, base_url="http://evil.example").get("/")):
            h = response.headers
            assert "frame-ancestors 'none'" in h["content-security-policy"]
            assert "script-src 'self'" in h["content-security-policy"]
            assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff"
            assert h["referrer-policy"] == "no-referrer" and h["cache-control"] == "no-store"


def test_framework_errors_are_the_apps_json(models, tmp_path):
    with client(models, tmp_path / "s") as api:
        refused(api.get("/api/nope"), 404, "Not Found")
        refused(api.post("/api/cases/abc/signout", content=b"{not json",
                         headers={"Content-Type": "application/json"}), 422, "Invalid request")
        refused(api.post("/api/cases/abc/cells/x/review", json={"reviewer": "a"}), 422, "index")
        refused(api.post("/api/cases/abc/signout", json={"label": 3}), 422, "reviewer")
        refused(api.post("/api/cases", json={"files": []}), 415, "multipart/form-data")
        refused(api.post("/api/cases", content=b"--B\r\ngarbage",
                         headers={"Content-Type": "multipart/form-data; boundary=B"}), 422,
                "No files")
        refused(api.post("/api/cases", files=[("other", ("a.png", b"x", "image/png"))]), 422,
                "No files")
        refused(api.get("/api/cases/0123456789abcdef"), 404, "No case")
        refused(api.post("/api/cases/abc/cells/99999999999999999999999/review",
                         json={"label": "AML", "reviewer": "a"}), 422, "index")


def test_file_routes_answer_json_errors_too(models, served_run, tmp_path):
    with client(models, tmp_path / "s") as api:
        refused(api.get("/cases/0123456789abcdef/cells/0/image"), 404, "No case")
        refused(api.get("/cases/0123456789abcdef/report"), 404, "No case")
        case = wait_done(api, api.post("/api/cases", files=one_cell(served_run)).json()["id"])
        refused(api.get(f"/cases/{case['id']}/cells/0/heatmap/NoSuchNode"), 422,
                "NoSuchNode")
        assert api.get(f"/cases/{case['id']}/cells/0/image").status_code == 200


# ------------------------------------------------------------------ pixels
def _png_header(width, height):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
            + chunk(b"IEND", b""))


def test_max_pixels_help_and_limit_agree_and_the_error_names_the_size(models, tmp_path,
                                                                      capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert f"default {Limits().max_pixels:,}" in " ".join(capsys.readouterr().out.split())
    with client(models, tmp_path / "s") as api:
        huge = [("files", ("huge.png", _png_header(30000, 30000), "image/png"))]
        refused(api.post("/api/cases", files=huge), 413, "30000x30000", "900,000,000 pixels",
                f"limit of {Limits().max_pixels:,}")
    with client(models, tmp_path / "t", limits=Limits(max_pixels=100)) as api:
        refused(api.post("/api/cases", files=[("files", ("s.png", _png_header(20, 10),
                                                         "image/png"))]), 413, "20x10")


def test_pages_and_api_share_helpers_without_an_import_cycle():
    import inspect

    import leukotree.serve.pages as pages

    assert "leukotree.serve.app" not in inspect.getsource(pages)


def test_a_read_only_database_is_refused_at_start(tmp_path, monkeypatch):
    Store(tmp_path / "s")
    connect = sqlite3.connect

    def read_only(path, **kwargs):  # as a database file without write permission opens
        return connect(f"file:{path}?mode=ro", uri=True, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only)
    with pytest.raises(StoreError, match=r"cannot be written \(attempt to write a readonly"):
        Store(tmp_path / "s")


def test_the_worker_decodes_with_the_served_pixel_limit(served_run, tmp_path):
    """What serve's --max-pixels lets through is decoded under the same bound."""
    strict = Models([served_run / "run"], InferenceOptions(engine="torch", max_pixels=100))
    with TestClient(create_app(strict, Store(tmp_path / "s"), ServeSettings()),
                    base_url=LOCAL) as api:
        case = wait_done(api, api.post("/api/cases", files=one_cell(served_run)).json()["id"])
    assert case["status"] == "done", case
    assert "100" in str(case["cells"][0].get("error")), case["cells"][0]


def test_the_database_itself_keeps_a_second_sign_out_out(tmp_path, monkeypatch):
    """Even when the state check above it is passed (a race, another process), the
    sign-out's own UPDATE refuses to overwrite a final diagnosis."""
    from leukotree.serve.store import CaseConflict

    store = Store(tmp_path / "s")
    case = store.create_case("P-1", "run", [])
    store.set_status(case, "done")
    store.sign_out(case, "AML", "first")
    monkeypatch.setattr(Store, "_reviewable", staticmethod(lambda db, case_id, what: None))
    with pytest.raises(CaseConflict, match="already signed out"):
        store.sign_out(case, "ALL", "second")
    assert store.case(case)["final_label"] == "AML"
    assert [r["reviewer"] for r in store.reviews(case)] == ["first"]


def test_the_report_of_a_case_still_running_is_a_409(models, tmp_path):
    with client(models, tmp_path / "s") as api:
        store = api.app.state.store
        waiting = store.create_case("P-1", "run", [])  # never submitted: stays queued
        refused(api.get(f"/cases/{waiting}/report"), 409, "still queued")
        store.set_status(waiting, "running")
        refused(api.get(f"/cases/{waiting}/report"), 409, "still running")
        assert not (store.reports / f"{waiting}.html").exists()
