"""A real browser (Debian's chromium, driven by Playwright) on a running server: upload ten
cells, wait for the diagnosis, open a heat map, reclassify a cell with the keyboard,
download the corrections, sign out, and keep a screenshot that is not blank."""

import csv
import io
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from conftest import served_in_a_thread
from leukotree.inference.options import InferenceOptions
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.store import Store
from leukotree.serve.worker import Models

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def server(served_run, tmp_path):
    app = create_app(Models([served_run / "run"], InferenceOptions(engine="torch")),
                     Store(tmp_path / "store"),
                     ServeSettings())
    with served_in_a_thread(app, 10) as url:
        yield url


def test_upload_review_and_sign_out_in_a_browser(server, served_run, tmp_path):
    files = [str(p) for p in sorted((served_run / "data").rglob("*.png"))[:10]]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        blocked = []  # the app runs under its own Content-Security-Policy
        page.on("console", lambda m: blocked.append(m.text)
                if "Content Security Policy" in m.text else None)
        page.goto(f"{server}/cases/new")
        page.fill("#patient", "patient-42")
        page.set_input_files("#files", files)
        page.click("#submit")
        page.wait_for_url("**/cases/*", timeout=60_000)
        page.wait_for_selector("#diagnosis", timeout=60_000)
        assert page.locator(".cellcard").count() == 10
        page.fill("#reviewer", "dr who")
        page.locator(".cellcard").first.click()
        heat = page.locator("#heatmaps img").first
        heat.wait_for(timeout=30_000)
        for _ in range(600):  # polled from here: the CSP forbids eval'd predicates
            if heat.evaluate("img => img.complete && img.naturalWidth > 0"):
                break
            time.sleep(0.05)
        assert heat.evaluate("img => img.naturalWidth") > 0
        page.evaluate("document.activeElement.blur()")  # keys go to the review, not a field
        page.keyboard.press("4")  # the 4th leaf of leukemia7: AML
        expect(page.locator("#review-msg")).to_have_text("saved")
        corrections = page.request.get(f"{server}/api/corrections.csv").text()
        rows = list(csv.DictReader(io.StringIO(corrections)))
        assert [(r["label"], r["patient"]) for r in rows] == [("AML", "patient-42")]
        page.select_option("#final-label", "AML")
        page.click("#signout")
        expect(page.locator("#signout-msg")).to_have_text(re.compile("^Signed out"))
        shot = tmp_path / "case.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert blocked == []
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[0] > 500 and pixels.std() > 10  # a page, not a blank sheet
