"""Decode and resize every image once; keep the uint8 pixels in a memory-mapped file.

On a CPU, decoding a 360x363 JPEG costs about as much as a small model's
forward pass, so it must not be repeated every epoch. The cache file's name is a
hash of the image list (path, size, modification time) and the target size, so
a changed data set never reuses a stale cache, and a resumed run reuses it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from leukotree.data.images import DEFAULT_MAX_PIXELS, decode_many


def cache_key(paths: list[Path], size: int, crop: float = 1.0, crop_mode: str = "centre",
              ) -> str:
    tag = f"v2:{size}:{crop}" + ("" if crop_mode == "centre" else f":{crop_mode}")
    h = hashlib.sha1(tag.encode())
    for p in paths:
        try:
            st = p.stat()
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:  # a missing file or broken link: decoding names it
            stamp = "missing"
        h.update(f"{p.resolve()}|{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def cached_pixels(
    paths: list[Path],
    size: int,
    cache_dir: Path | None,
    *,
    crop: float = 1.0,
    crop_mode: str = "centre",
    workers: int = 2,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Pixels of ``paths`` at ``size``, from ``cache_dir`` when already decoded.

    With ``cache_dir=None`` the pixels are kept in memory only. Unreadable images end
    in one :class:`~leukotree.errors.DataError` that lists them all.
    """
    if cache_dir is None:
        return decode_many(paths, size, crop=crop, crop_mode=crop_mode, workers=workers,
                           progress=progress, max_pixels=max_pixels).pixels
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"pixels-{size}-{cache_key(paths, size, crop, crop_mode)}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    tmp = target.with_suffix(f".tmp{os.getpid()}.npy")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                      shape=(len(paths), size, size, 3))
    try:
        decode_many(paths, size, crop=crop, crop_mode=crop_mode, workers=workers,
                    progress=progress, out=array, max_pixels=max_pixels)
        array.flush()
        del array
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return np.load(target, mmap_mode="r")
