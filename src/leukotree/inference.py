"""Batched prediction from image files, streaming (never all images in memory)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from leukotree.errors import DataError, ImageReadError
from leukotree.images import load_rgb_array
from leukotree.progress import make_progress


@dataclass
class Predictions:
    """Leaf probabilities per image; rows of unreadable images are NaN with an error."""

    paths: list[Path]
    leaf_probs: np.ndarray
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def _decode_chunks(paths: Sequence[Path], size: int, chunk: int, workers: int, crop: float,
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str | None]]]:
    """Yield ``(indices, pixels, errors)`` chunk by chunk, decoding the next in the background."""

    def load(i: int) -> tuple[np.ndarray | None, str | None]:
        try:
            return load_rgb_array(paths[i], size, crop=crop), None
        except ImageReadError as err:
            return None, str(err)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        starts = list(range(0, len(paths), chunk))
        pending = None
        for n, start in enumerate(starts):
            idx = np.arange(start, min(start + chunk, len(paths)))
            if pending is None:
                pending = list(pool.map(load, idx))
            current = pending
            if n + 1 < len(starts):
                nxt = np.arange(starts[n + 1], min(starts[n + 1] + chunk, len(paths)))
                future = pool.submit(lambda ids: list(map(load, ids)), nxt)
            pixels = np.zeros((len(idx), size, size, 3), np.uint8)
            errors: list[str | None] = []
            for j, (arr, err) in enumerate(current):
                if arr is not None:
                    pixels[j] = arr
                errors.append(err)
            yield idx, pixels, errors
            pending = future.result() if n + 1 < len(starts) else None


def dihedral_mean(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Leaf probabilities averaged over the 8 symmetries of the square."""
    total = None
    for flip in (False, True):
        base = x.flip(3) if flip else x
        for k in range(4):
            p = model(torch.rot90(base, k, dims=(2, 3)).contiguous())["leaf_logp"].float().exp()
            total = p if total is None else total + p
    return total / 8


@torch.no_grad()
def predict_paths(
    model: torch.nn.Module,
    paths: Sequence[Path],
    img_size: int,
    *,
    batch_size: int = 64,
    workers: int = 2,
    progress: bool = True,
    on_error: str = "report",
    device: torch.device | None = None,
    tta: bool = False,
) -> Predictions:
    """Leaf probabilities of every image; decoding overlaps with the model's work.

    ``on_error="raise"`` raises one :class:`DataError` listing every unreadable
    image; ``"report"`` keeps going and records the error in its row. ``tta``
    averages the leaf probabilities over the 8 flips and 90-degree rotations
    (smears have no orientation), at 8 times the cost.
    """
    device = device or torch.device("cpu")
    paths = [Path(p) for p in paths]
    model.eval().to(device)
    n_leaves = len(model.taxonomy.leaves)
    probs = np.full((len(paths), n_leaves), np.nan, np.float32)
    errors: list[str | None] = [None] * len(paths)
    with make_progress(enabled=progress) as bar:
        task = bar.add_task("Predicting", total=len(paths), rate="")
        crop = float(model.config.crop_fraction)
        for idx, pixels, errs in _decode_chunks(paths, img_size, batch_size, workers, crop):
            good = [j for j, e in enumerate(errs) if e is None]
            for j, e in enumerate(errs):
                errors[idx[j]] = e
            if good:
                x = torch.from_numpy(pixels[good]).to(device).permute(0, 3, 1, 2).float()
                out = dihedral_mean(model, x) if tta else model(x)["leaf_logp"].float().exp()
                out = out.cpu().numpy()
                probs[idx[good]] = out
            bar.update(task, advance=len(idx))
    bad = [e for e in errors if e is not None]
    if bad and on_error == "raise":
        shown = "\n  - ".join(bad[:10])
        raise DataError(f"{len(bad)} image(s) cannot be read:\n  - {shown}")
    return Predictions(paths, probs, errors)
