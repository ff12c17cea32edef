"""Decode and resize every image once; keep the uint8 pixels in a memory-mapped file.

On a CPU, decoding a 360x363 JPEG costs about as much as a small model's
forward pass, so it must not be repeated every epoch. The cache file's name is a
hash of the image list (path, size, modification time) and the target size, so
a changed data set never reuses a stale cache, and a resumed run reuses it.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from leukotree.errors import DataError, ImageReadError
from leukotree.images import DEFAULT_MAX_PIXELS, load_rgb_array
from leukotree.progress import track


def cache_key(paths: list[Path], size: int, crop: float = 1.0) -> str:
    h = hashlib.sha1(f"v2:{size}:{crop}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def decode_all(
    paths: list[Path],
    size: int,
    *,
    crop: float = 1.0,
    workers: int = 2,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``(N, size, size, 3)`` uint8; raises one :class:`DataError` listing every bad image."""
    array = out if out is not None else np.empty((len(paths), size, size, 3), np.uint8)
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            array[i] = load_rgb_array(paths[i], size, crop=crop, max_pixels=max_pixels)
        except ImageReadError as err:
            errors.append(str(err))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in track(pool.map(work, range(len(paths))), total=len(paths),
                       description=f"Decoding images to {size}px", enabled=progress):
            pass
    if errors:
        shown = "\n  - ".join(sorted(errors)[:10])
        raise DataError(
            f"{len(errors)} image(s) cannot be read; fix or remove them (nothing is replaced "
            f"silently):\n  - {shown}"
        )
    return array


def cached_pixels(
    paths: list[Path],
    size: int,
    cache_dir: Path | None,
    *,
    crop: float = 1.0,
    workers: int = 2,
    progress: bool = True,
) -> np.ndarray:
    """Pixels of ``paths`` at ``size``, from ``cache_dir`` when already decoded.

    With ``cache_dir=None`` the pixels are kept in memory only.
    """
    if cache_dir is None:
        return decode_all(paths, size, crop=crop, workers=workers, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"pixels-{size}-{cache_key(paths, size, crop)}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                      shape=(len(paths), size, size, 3))
    try:
        decode_all(paths, size, crop=crop, workers=workers, progress=progress, out=array)
        array.flush()
        del array
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r")
