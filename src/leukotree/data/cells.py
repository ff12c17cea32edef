"""Find the white cell in a single-cell image, so that a crop can follow the cell instead
of the camera (``crop_mode: cell``).

Labs crop cells differently: a 360 px frame around a small cell, a 300 px frame around a
large one, or a tight 120 px box. A centre crop of a fixed fraction then shows the cell
at a different size and place in every lab. :func:`find_cell` locates the nucleus, the
part of a white cell that haematoxylin stains dark: the haematoxylin channel of the
colour deconvolution (scikit-image's ``rgb2hed``, on a copy at most :data:`WORK_SIDE`
pixels wide), an Otsu threshold, a morphological closing that joins the lobes of a
segmented nucleus, and the connected region with the most area weighted towards the
image centre. :func:`cell_frame` turns it into the square that a crop fraction applies
to: side ``FRAME_PER_NUCLEUS`` times the nucleus's equivalent diameter, centred on its
centroid (the factor makes a typical PBC cell's frame about its 360 px image). Images
where no nucleus is found keep the whole image as their frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Side of the working copy that detection runs on.
WORK_SIDE = 128
#: Frame side over the nucleus's equivalent diameter (PBC: ~95 px nuclei in 360 px images).
FRAME_PER_NUCLEUS = 3.8
#: Smallest and largest nucleus, as fractions of the working copy's area (outside:
#: no nucleus found, e.g. a blank or out-of-focus image thresholded as one blob).
MIN_AREA = 0.002
MAX_AREA = 0.45


@dataclass(frozen=True)
class CellFrame:
    """A square in image pixels: centre and side (may reach beyond the image)."""

    cx: float
    cy: float
    side: float
    found: bool

    def box(self, fraction: float) -> tuple[float, float, float, float]:
        """The central ``fraction`` of the frame as ``(left, top, right, bottom)``."""
        half = fraction * self.side / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


def find_cell(img: Image.Image) -> tuple[float, float, float] | None:
    """``(cx, cy, diameter)`` of the nucleus in image pixels, or None when none is found."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    scale = WORK_SIDE / max(img.size)
    small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                       Image.Resampling.BILINEAR) if scale < 1 else img
    scale = small.width / img.width
    rgb = np.asarray(small.convert("RGB"), dtype=np.float64) / 255.0
    h = rgb2hed(rgb)[..., 0]
    if np.ptp(h) < 1e-6:
        return None
    mask = ndimage.binary_closing(h > threshold_otsu(h), structure=np.ones((5, 5)))
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    idx = np.arange(1, n + 1)
    areas = ndimage.sum_labels(mask, labels, idx)
    centres = np.array(ndimage.center_of_mass(mask, labels, idx)).reshape(-1, 2)
    size = np.array(mask.shape, dtype=np.float64)
    dist = np.linalg.norm((centres - size / 2) / size, axis=1)  # 0 at the centre
    score = areas * np.exp(-(dist / 0.25) ** 2)
    best = int(np.argmax(score))
    if not MIN_AREA * mask.size <= areas[best] <= MAX_AREA * mask.size:
        return None
    cy, cx = centres[best]
    diameter = float(np.sqrt(4 * areas[best] / np.pi))
    return (cx + 0.5) / scale, (cy + 0.5) / scale, diameter / scale


def cell_frame(img: Image.Image) -> CellFrame:
    """The frame of the cell in ``img`` (the whole image when no nucleus is found)."""
    found = find_cell(img)
    if found is None:
        return CellFrame(img.width / 2, img.height / 2, float(min(img.size)), False)
    cx, cy, diameter = found
    return CellFrame(cx, cy, FRAME_PER_NUCLEUS * diameter, True)
