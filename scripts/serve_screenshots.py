"""Screenshots of the web app's case and review pages for the README.

    .venv/bin/python scripts/serve_screenshots.py [RUN] [CELLS] [--out docs/img]

Serves RUN (default: the fold-0 model that ``make demo`` trains) on a free local port
with a temporary store, uploads the images under CELLS (default: 12 cells of the
bundled PBC sample, one patient) in Debian's chromium driven by Playwright, and writes
``serve-case.png`` (the diagnosis and the gallery) and ``serve-review.png`` (a cell's
Grad-CAM maps, one reclassified with the keyboard, the case signed out).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from leukotree.data.images import is_image_file
from leukotree.demo import bundled_data
from leukotree.serve.app import ServeSettings, create_app
from leukotree.serve.store import Store
from leukotree.serve.worker import Models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, default=Path("demo-out/cv/fold_0"))
    parser.add_argument("cells", nargs="?", type=Path)
    parser.add_argument("--n", type=int, default=12, help="cells to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    if not args.run.exists():
        raise SystemExit(f"{args.run} does not exist: run `make demo` first, or name a run.")
    with bundled_data() as sample:
        folder = args.cells or sample
        cells = sorted(p for p in folder.rglob("*") if is_image_file(p))
        step = max(1, len(cells) // args.n)
        files = [str(p) for p in cells[::step][:args.n]]
        shoot(args.run, files, args.out)


def shoot(run: Path, files: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = Path(tempfile.mkdtemp(prefix="leukotree-shots-"))
    app = create_app(Models([run]), Store(store), ServeSettings())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update"])
            # bypass_csp: the waits below are eval'd predicates, which the app's CSP forbids
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
            page.goto(f"http://127.0.0.1:{port}/cases/new")
            page.fill("#patient", "demo-patient-1")
            page.set_input_files("#files", files)
            page.click("#submit")
            page.wait_for_selector("#diagnosis, #differential-count", timeout=300_000)
            page.screenshot(path=str(out / "serve-case.png"))
            page.fill("#reviewer", "J. Smith")
            page.locator(".cellcard").nth(1).click()
            maps_loaded = ("document.querySelector('#heatmaps img') && [...document."
                           "querySelectorAll('#heatmaps img')].every(i => i.naturalWidth)")
            page.wait_for_function(maps_loaded, timeout=120_000)
            page.evaluate("document.activeElement.blur()")
            page.keyboard.press("2")
            page.wait_for_function(
                "document.querySelector('#review-msg').textContent === 'saved'")
            page.wait_for_function(maps_loaded, timeout=120_000)  # the next cell's maps
            page.evaluate("window.scrollTo(0, document.querySelector('#panel').offsetTop - 60)")
            page.screenshot(path=str(out / "serve-review.png"))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        shutil.rmtree(store, ignore_errors=True)
    print(f"wrote {out / 'serve-case.png'} and {out / 'serve-review.png'}")


if __name__ == "__main__":
    main()
