"""The lab loop end to end in a real browser (Debian's chromium, driven by Playwright):
review a case's cells with the keyboard, train a candidate from the models page, see its
audit figures, promote it, and a new case is classified by the new version."""

import shutil

import pytest
from playwright.sync_api import expect, sync_playwright

from conftest import served_in_a_thread
from leukotree.inference.options import InferenceOptions
from leukotree.lab.gate import GateRule
from leukotree.lab.jobs import LabSettings
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.store import Store
from leukotree.serve.worker import Models

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
N_CELLS = 16


@pytest.fixture
def lab_server(served_run, tmp_path):
    # a gate any candidate passes: this test is about the pages, the gate has its own
    lab = LabSettings(epochs=1, min_reviews=6, threads=1,
                      gate=GateRule(alpha=1e-12, tolerance=1.0, min_audit=1))
    app = create_app(Models([served_run / "run"], InferenceOptions(engine="torch")),
                     Store(tmp_path / "store"), ServeSettings(lab=lab))
    with served_in_a_thread(app, 30) as url:
        yield url


def upload(page, server, files, patient):
    page.goto(f"{server}/cases/new")
    page.fill("#patient", patient)
    page.set_input_files("#files", files)
    page.click("#submit")
    page.wait_for_url("**/cases/*", timeout=60_000)
    page.wait_for_selector("#diagnosis", timeout=60_000)


def test_review_train_promote_and_use_the_new_version_in_a_browser(lab_server, served_run):
    paths = sorted((served_run / "data").rglob("*.png"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 1400})
        blocked = []  # the app runs under its own Content-Security-Policy
        page.on("console", lambda m: blocked.append(m.text)
                if "Content Security Policy" in m.text else None)
        upload(page, lab_server, [str(p) for p in paths[:N_CELLS]], "patient-1")
        expect(page.locator("#case-version")).to_have_text("version 1")
        page.fill("#reviewer", "tech")
        page.locator(".cellcard").first.click()
        page.evaluate("document.activeElement.blur()")  # keys go to the review
        for k in range(N_CELLS):  # accept each cell's label, one after the other
            page.keyboard.press("a")
            expect(page.locator(".cellcard.reviewed")).to_have_count(k + 1)

        page.goto(f"{lab_server}/models")
        expect(page.locator("tr.state-active")).to_have_count(1)
        page.click("#train")
        # the page reloads when the job is done, showing the candidate beside version 1
        candidate = page.locator('tr[data-version="2"]')
        candidate.wait_for(timeout=120_000)
        expect(candidate).to_have_class("state-candidate")
        expect(page.locator("#job-status")).to_have_text("done")
        audit = candidate.locator("td").nth(4).inner_text()
        assert int(audit) >= 1  # its figures on the audit cells are shown
        assert "%" in candidate.locator("td").nth(5).inner_text()
        candidate.locator("button.promote").first.click()  # not forced: through the gate
        expect(page.locator('tr[data-version="2"]')).to_have_class("state-active",
                                                                 timeout=60_000)
        expect(page.locator('tr[data-version="1"]')).to_have_class("state-retired")

        upload(page, lab_server, [str(p) for p in paths[N_CELLS:N_CELLS + 4]], "patient-2")
        expect(page.locator("#case-version")).to_have_text("version 2")
        browser.close()
    assert blocked == []
