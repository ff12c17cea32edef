"""Safe image reading, the one decode path, and the one uint8-to-tensor conversion.

- :func:`open_image` / :func:`load_rgb_array`: one file; every failure becomes an
  :class:`ImageReadError` naming the file.
- :func:`decode_many` / :func:`iter_decoded`: many files in threads, with an explicit
  error policy: ``on_error="raise"`` ends in one :class:`DataError` listing every
  unreadable image; ``"report"`` keeps going and returns the error of each row.
- :func:`to_tensor`: uint8 ``(N, H, W, 3)`` pixels to the float ``(N, 3, H, W)`` batch
  every model takes (values stay in 0-255; normalisation is inside the model).
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from leukotree.errors import ImageReadError, UnreadableImagesError
from leukotree.progress import track

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
R = TypeVar("R")

#: Error policies of :func:`decode_many`.
ON_ERROR = ("raise", "report")

#: File suffixes treated as images when a folder is scanned (case-insensitive).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
#: Formats PIL may report for those files (MPO is a multi-picture JPEG).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF"})
#: Default decompression-bomb guard: images above this many pixels are refused.
DEFAULT_MAX_PIXELS = 60_000_000

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def open_image(
    path: str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode ``path`` fully and return it as an 8-bit RGB image.

    - RGBA, LA and palette images with transparency are composited on white;
      16-bit and float images are rescaled to 8 bits; CMYK, grey and palette
      images are converted to RGB.
    - ``draft_size`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 while keeping
      both sides at least ``draft_size`` pixels, which is several times faster
      than a full decode followed by a resize.
    - Empty, truncated, corrupt, unsupported and oversized (more than
      ``max_pixels`` pixels, a decompression-bomb guard) files raise
      :class:`ImageReadError`; nothing is replaced or skipped silently.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageReadError(path, "the file does not exist") from None
    except OSError as err:
        raise ImageReadError(path, f"cannot access the file ({err.strerror})") from None
    if size == 0:
        raise ImageReadError(path, "the file is empty (0 bytes)")
    with warnings.catch_warnings():
        # Our own pixel limit replaces PIL's global one (which we never modify).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as err:
            raise ImageReadError(path, f"refused as a decompression bomb ({err})") from None
        except UnidentifiedImageError:
            raise ImageReadError(
                path, "not a recognised image file (expected JPEG, PNG, BMP or TIFF)"
            ) from None
        except _DECODE_ERRORS as err:
            raise ImageReadError(path, f"the header cannot be parsed ({err})") from None
    with img:
        if img.format not in SUPPORTED_FORMATS:
            raise ImageReadError(
                path,
                f"format {img.format} is not supported; convert it to PNG, JPEG, BMP or TIFF",
            )
        width, height = img.size
        if width == 0 or height == 0:
            raise ImageReadError(path, f"the image has zero size ({width}x{height})")
        if width * height > max_pixels:
            raise ImageReadError(
                path,
                f"{width}x{height} = {width * height:,} pixels exceeds the limit of "
                f"{max_pixels:,} (decompression-bomb guard); if the image is genuine, "
                "raise --max-pixels",
            )
        if draft_size and img.format in {"JPEG", "MPO"}:
            img.draft("RGB", (draft_size, draft_size))
        try:
            img.load()
        except _DECODE_ERRORS as err:
            raise ImageReadError(path, f"the file is truncated or corrupt ({err})") from None
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img.copy()
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        # Fixed scaling by the format's range (never per image, which would change
        # brightness between images): 16-bit and 32-bit integers by 65535, floats by 1.
        arr = np.asarray(img, dtype=np.float64)
        full = 1.0 if img.mode == "F" else 65535.0
        img = Image.fromarray((np.clip(arr / full, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L")
    if img.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


#: How the square that ``crop`` applies to is placed: ``centre`` (the image's central
#: square), ``cell`` (a square sized and centred by the cell's nucleus: data.cells) or
#: ``auto`` (the centre, unless the cell's frame is more than AUTO_RATIO times the image:
#: a tight crop, whose centre crop would cut the cell).
CROP_MODES = ("centre", "cell", "auto")
AUTO_RATIO = 1.8
#: Per-image stain normalisations a model can carry (``ModelConfig.stain_norm``; the
#: layers are in :mod:`leukotree.models.stain`). Named here, beside the crop modes, so
#: the command line offers both without importing torch.
STAIN_NORMS = ("none", "white", "reinhard")


def load_rgb_array(
    path: str | Path,
    size: int | None = None,
    *,
    crop: float = 1.0,
    crop_mode: str = "centre",
    window: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode ``path`` to a ``(size, size, 3)`` uint8 array.

    ``centre``: the central square of side ``crop * min(width, height)`` is kept (cells
    sit in the centre of single-cell images), or of side ``window`` pixels when given
    (a physical field of view at this image's pixel size, see
    :meth:`~leukotree.models.ModelConfig.decode_options`); ``cell``: the central
    ``crop`` of the cell's frame (:func:`~leukotree.data.cells.cell_frame`); ``auto``:
    ``cell`` for an image whose cell frame exceeds :data:`AUTO_RATIO` times its side (a
    tight crop), else ``centre``. A square reaching beyond the image is filled with the
    colour of its border. Each is resized bilinearly to ``size``.
    """
    if not 0 < crop <= 1:
        raise ValueError(f"crop must be in (0, 1], got {crop}")
    if crop_mode not in CROP_MODES:
        raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    if window is not None and not window > 0:
        raise ValueError(f"window must be positive, got {window}")
    draft = (None if size is None or crop_mode != "centre" or window is not None
             else int(np.ceil(size / crop)))
    img = open_image(path, max_pixels=max_pixels, draft_size=draft)
    if size is None:
        return np.asarray(img, dtype=np.uint8)
    if crop_mode != "centre":
        from leukotree.data.cells import cell_frame

        frame = cell_frame(img)
        if crop_mode == "cell" or (frame.found and frame.side > AUTO_RATIO * min(img.size)):
            return np.asarray(_square_crop(img, frame.box(crop), size), dtype=np.uint8)
    if window is not None:
        cx, cy, half = img.width / 2, img.height / 2, window / 2
        return np.asarray(_square_crop(img, (cx - half, cy - half, cx + half, cy + half),
                                       size), dtype=np.uint8)
    side = crop * min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    if (side, left, top) != (img.width, 0, 0) or img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR,
                         box=(left, top, left + side, top + side))
    return np.asarray(img, dtype=np.uint8)


def median_side(paths: Sequence[Path], limit: int = 500) -> float:
    """Median ``min(width, height)`` of (an even sample of at most ``limit`` of) ``paths``,
    read from the file headers."""
    step = max(1, -(-len(paths) // limit))  # ceil: at most ``limit`` files read
    sides = []
    for path in list(paths)[::step]:
        try:
            with Image.open(path) as img:
                sides.append(min(img.size))
        except (*_DECODE_ERRORS, UnidentifiedImageError) as err:
            raise ImageReadError(path, f"cannot read its size ({err})") from err
    if not sides:
        raise ValueError("median_side needs at least one image")
    return float(np.median(sides))


def _square_crop(img: Image.Image, box: tuple[float, float, float, float], size: int,
                 ) -> Image.Image:
    """``box`` ``(left, top, right, bottom)`` resized to ``size``; outside the image, the
    median colour of its border."""
    left, top, right, bottom = box
    inside = (max(left, 0.0), max(top, 0.0), min(right, img.width), min(bottom, img.height))
    if inside == (left, top, right, bottom):
        return img.resize((size, size), Image.Resampling.BILINEAR, box=inside)
    # Only the part inside the image is resampled; the rest is the border's colour.
    pixels = np.asarray(img)
    border = np.concatenate([pixels[[0, -1]].reshape(-1, 3), pixels[:, [0, -1]].reshape(-1, 3)])
    out = Image.new("RGB", (size, size), tuple(int(v) for v in np.median(border, axis=0)))
    scale = size / (right - left)
    x0, y0 = round((inside[0] - left) * scale), round((inside[1] - top) * scale)
    x1, y1 = round((inside[2] - left) * scale), round((inside[3] - top) * scale)
    if x1 > x0 and y1 > y0:
        out.paste(img.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=inside),
                  (x0, y0))
    return out


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, workers: int = 2,
                 progress: bool = False, description: str = "") -> Iterator[R]:
    """``fn`` over ``items`` in threads (PIL releases the GIL while decoding), in order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from track(pool.map(fn, items), total=len(items), description=description,
                         enabled=progress)


@dataclass
class Decoded:
    """Pixels of several images; the rows of unreadable images are zero, with an error."""

    pixels: np.ndarray  # (N, size, size, 3) uint8
    errors: list[str | None]

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def raise_for_errors(errors: Iterable[str | None], what: str = "image(s)") -> None:
    """One :class:`DataError` listing every error (nothing is replaced silently)."""
    bad = sorted(e for e in errors if e is not None)
    if bad:
        shown = "\n  - ".join(bad)
        raise UnreadableImagesError(
            f"{len(bad)} {what} cannot be read; fix or remove them (nothing is replaced "
            f"silently), or train with --skip-unreadable to leave them out:\n  - {shown}", bad)


def _check_policy(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}; got {on_error!r}")


def decode_many(
    paths: Sequence[Path],
    size: int,
    *,
    crop: float = 1.0,
    crop_mode: str = "centre",
    window: float | None = None,
    workers: int = 2,
    on_error: str = "raise",
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    out: np.ndarray | None = None,
) -> Decoded:
    """Decode ``paths`` to ``(N, size, size, 3)`` uint8 (into ``out`` when given)."""
    _check_policy(on_error)
    pixels = out if out is not None else np.zeros((len(paths), size, size, 3), np.uint8)
    errors: list[str | None] = [None] * len(paths)

    def work(i: int) -> None:
        try:
            pixels[i] = load_rgb_array(paths[i], size, crop=crop, crop_mode=crop_mode,
                                       window=window, max_pixels=max_pixels)
        except ImageReadError as err:
            errors[i] = str(err)
            pixels[i] = 0

    for _ in parallel_map(work, range(len(paths)), workers=workers, progress=progress,
                          description=f"Decoding images to {size}px"):
        pass
    if on_error == "raise":
        raise_for_errors(errors)
    return Decoded(pixels, errors)


def iter_decoded(paths: Sequence[Path], size: int, *, chunk: int, crop: float = 1.0,
                 crop_mode: str = "centre", window: float | None = None,
                 workers: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
                 ) -> Iterator[tuple[np.ndarray, Decoded]]:
    """``(indices, decoded)`` chunk by chunk (errors reported per row), decoding the next
    chunk in the background while the caller works on the current one."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive; got {chunk}")
    starts = list(range(0, len(paths), chunk))
    with ThreadPoolExecutor(max_workers=1) as ahead:

        def decode(start: int) -> tuple[np.ndarray, Decoded]:
            idx = np.arange(start, min(start + chunk, len(paths)))
            return idx, decode_many([paths[i] for i in idx], size, crop=crop,
                                    crop_mode=crop_mode, window=window, workers=workers,
                                    on_error="report",
                                    max_pixels=max_pixels)

        pending = ahead.submit(decode, starts[0]) if starts else None
        for n in range(len(starts)):
            current = pending.result()
            pending = ahead.submit(decode, starts[n + 1]) if n + 1 < len(starts) else None
            yield current


def to_tensor(pixels: np.ndarray, device: torch.device | str = "cpu", *,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` (or one ``(H, W, 3)`` image) -> float ``(N, 3, H, W)``."""
    import torch

    array = np.ascontiguousarray(pixels)
    if not array.flags.writeable:  # e.g. a slice of the memory-mapped cache
        array = array.copy()
    if array.ndim == 3:
        array = array[None]
    x = torch.from_numpy(array).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()
