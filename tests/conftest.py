"""Shared fixtures: a small synthetic leukemia7 folder and writers for test images.

Nothing here reads outside the repository: the only real data used by the suite
lives in ``tests/fixtures`` (see its README for the attribution).
"""

from __future__ import annotations

import contextlib
import os

# pytest -n 2 runs two workers on a 2-core machine: one thread each (and in the
# processes they start), or the two compete and run many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukotree.data.synth import generate
from leukotree.taxonomy import Taxonomy, load_taxonomy

FIXTURES = Path(__file__).parent / "fixtures"

#: Parameters of the session-wide synthetic folder (7 leaves x 3 patients x 4 cells).
SYNTH_PATIENTS_PER_CLASS = 3
SYNTH_CELLS_PER_PATIENT = 4
SYNTH_SIZE = 32

#: The leaves of ``leukemia7`` in taxonomy order (the columns of leaf probabilities).
LEUKEMIA7_LEAVES = ("Normal", "Reactive", "ALL", "AML", "APML", "CLL", "CML")


def leaf_row(**probs: float) -> list[float]:
    """A leukemia7 leaf-probability row from keyword probabilities (others 0)."""
    out = [probs.get(leaf, 0.0) for leaf in LEUKEMIA7_LEAVES]
    assert abs(sum(out) - 1.0) < 1e-9, out
    return out


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def html_tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    """Every start tag of an HTML page with its attributes (parsed, not pattern-matched)."""
    parser = _Tags()
    parser.feed(page)
    return parser.tags


IMAGE_KINDS = (
    "jpeg", "png", "rgba", "palette", "palette_transparent", "gray", "gray16", "la", "bmp",
    "tiff", "gif",
)


def pixels(size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """A smooth random RGB picture ``(height, width, 3)``: blobs, not white noise.

    Smooth content keeps JPEG artefacts and perceptual hashes well behaved.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    out = np.zeros((height, width, 3))
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        out += blob[..., None] * rng.uniform(-1, 1, 3)
    out -= out.min()
    out /= out.max() or 1.0
    return (out * 255).astype(np.uint8)


def write_image(
    path: str | Path, kind: str = "png", size: tuple[int, int] = (32, 32), seed: int = 0
) -> Path:
    """Write a ``size = (width, height)`` image of ``kind`` (see ``IMAGE_KINDS``) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(pixels(size, seed))
    if kind == "jpeg":
        rgb.save(path, format="JPEG", quality=90)
    elif kind == "png":
        rgb.save(path, format="PNG")
    elif kind == "rgba":
        rgba = rgb.convert("RGBA")
        rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
        rgba.save(path, format="PNG")
    elif kind == "palette":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, format="PNG")
    elif kind == "palette_transparent":
        pal = Image.new("P", size, 1)
        pal.putpalette([0, 0, 0, 200, 30, 40] + [0] * (254 * 3))
        pal.putpixel((0, 0), 0)  # index 0 is the transparent one
        pal.save(path, format="PNG", transparency=0)
    elif kind == "gray":
        rgb.convert("L").save(path, format="PNG")
    elif kind == "gray16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path, format="PNG")
    elif kind == "la":
        rgb.convert("LA").save(path, format="PNG")
    elif kind == "bmp":
        rgb.save(path, format="BMP")
    elif kind == "tiff":
        rgb.save(path, format="TIFF")
    elif kind == "gif":
        rgb.save(path, format="GIF")
    else:
        raise ValueError(f"unknown image kind {kind!r}")
    return path


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to the first ``keep`` fraction of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.fixture(scope="session")
def leukemia7() -> Taxonomy:
    return load_taxonomy("leukemia7")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory, leukemia7: Taxonomy) -> Path:
    """``DATA/<label>/<patient>/<image>``: 7 leaves x 3 patients x 4 cells, 32 px. Read only."""
    out = tmp_path_factory.mktemp("synth-leukemia7")
    n = generate(
        out, leukemia7, patients_per_class=SYNTH_PATIENTS_PER_CLASS,
        cells_per_patient=SYNTH_CELLS_PER_PATIENT, size=SYNTH_SIZE, seed=0, progress=False,
    )
    assert n == 7 * SYNTH_PATIENTS_PER_CLASS * SYNTH_CELLS_PER_PATIENT
    return out


@pytest.fixture
def make_image() -> Callable[..., Path]:
    """``make_image(path, kind="png", size=(w, h), seed=0) -> path``."""
    return write_image


@pytest.fixture(scope="session")
def served_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny multi-head run on synthetic leukemia7 cells (``run/``) and its ``data/``."""
    from leukotree.engine.config import resolve_config
    from leukotree.engine.trainer import train

    root = tmp_path_factory.mktemp("served")
    generate(root / "data", load_taxonomy("leukemia7"), patients_per_class=3,
             cells_per_patient=4, size=40, seed=3, progress=False)
    train(root / "data", root / "run", resolve_config(preset="tiny-test", overrides={
        "epochs": 1, "threads": 1, "val_fraction": 0.34, "img_size": 32}), progress=False)
    return root


@contextlib.contextmanager
def served_in_a_thread(app, join_timeout: float = 30):
    """Serve the ASGI ``app`` with uvicorn on a free local port in a daemon thread; yields
    its base URL and stops it afterwards (the browser tests' server)."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=join_timeout)
