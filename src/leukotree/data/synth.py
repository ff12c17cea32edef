"""Synthetic smear-like cell images for any taxonomy.

Each leaf gets a *morphology*: cell size, nucleus-to-cytoplasm ratio, nuclear
lobes and shape, chromatin texture, nucleoli, cytoplasm colour, granules, Auer
rods and vacuoles. Leaves of ``leukemia7`` use hand-set profiles modelled on the
textbook cells (lymphoblast, myeloblast with Auer rods, hypergranular
promyelocyte, small mature lymphocyte...). Any other taxonomy derives its
profiles from the tree: a node's morphology is its parent's plus a deterministic
offset that shrinks with depth, so siblings look alike and classes under the
same parent are harder to tell apart than classes far apart in the tree.

Every cell jitters around its class profile, and every patient has its own
stain (channel gains, hue of the nucleus), illumination gradient, blur, noise
and a small shift of the morphology. Classes are therefore learnable but not
trivially, and a model can overfit patients, which is what grouped splits guard
against. Output is deterministic for a seed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from leukotree.errors import LeukotreeError
from leukotree.progress import track
from leukotree.taxonomy import Taxonomy


@dataclass(frozen=True)
class Morphology:
    """Class profile; every value is in [0, 1] except ``lobes`` (1 to 4)."""

    cell_radius: float = 0.55  # -> 24%..42% of the image side
    nc_ratio: float = 0.6  # nucleus radius / cell radius -> 0.45..0.92
    lobes: float = 1.0
    eccentricity: float = 0.2
    chromatin: float = 0.5  # 0 fine, open; 1 coarse, clumped
    nucleus_darkness: float = 0.5
    nucleoli: float = 0.0
    cytoplasm_blue: float = 0.5  # 0 pink, 1 deep blue
    granules: float = 0.0
    granule_red: float = 0.3  # 0 dark purple, 1 orange-red
    auer: float = 0.0  # probability of an Auer rod
    vacuoles: float = 0.0

    def jitter(self, rng: np.random.Generator, scale: float) -> Morphology:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "lobes":
                out[f.name] = float(np.clip(v + rng.normal(0, 0.35 * scale * 4), 1, 4))
            else:
                out[f.name] = float(np.clip(v + rng.normal(0, scale), 0, 1))
        return Morphology(**out)


#: Hand-set profiles for the leaves of ``leukemia7``.
LEUKEMIA7_PROFILES: dict[str, Morphology] = {
    "Normal": Morphology(0.5, 0.45, 3.2, 0.2, 0.8, 0.6, 0.0, 0.15, 0.35, 0.55, 0.0, 0.0),
    "Reactive": Morphology(0.8, 0.45, 1.0, 0.35, 0.55, 0.5, 0.1, 0.9, 0.0, 0.3, 0.0, 0.15),
    "ALL": Morphology(0.3, 0.88, 1.0, 0.1, 0.15, 0.55, 0.5, 0.75, 0.0, 0.3, 0.0, 0.1),
    "AML": Morphology(0.55, 0.78, 1.0, 0.2, 0.2, 0.45, 0.8, 0.6, 0.15, 0.3, 0.55, 0.0),
    "APML": Morphology(0.7, 0.62, 2.0, 0.3, 0.3, 0.5, 0.3, 0.45, 0.9, 0.1, 0.65, 0.0),
    "CLL": Morphology(0.15, 0.86, 1.0, 0.1, 0.95, 0.75, 0.0, 0.7, 0.0, 0.3, 0.0, 0.0),
    "CML": Morphology(0.6, 0.6, 1.6, 0.4, 0.6, 0.55, 0.1, 0.25, 0.6, 0.45, 0.0, 0.0),
}


def _name_rng(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(name.encode()), seed])


def class_profiles(taxonomy: Taxonomy, seed: int = 0) -> dict[str, Morphology]:
    """A morphology for every node; hand-set for ``leukemia7`` leaves, tree-derived otherwise."""
    profiles: dict[str, Morphology] = {taxonomy.root: Morphology()}
    for node in taxonomy.nodes:
        parent = profiles[taxonomy.parent(node) or taxonomy.root]
        rng = _name_rng(node, seed)
        step = 0.45 * 0.7 ** (taxonomy.depth(node) - 1)
        values = {}
        for f in fields(parent):
            v = getattr(parent, f.name)
            if f.name == "lobes":
                values[f.name] = float(np.clip(v + rng.uniform(-1.5, 1.5) * step * 2, 1, 4))
            else:
                values[f.name] = float(np.clip(v + rng.uniform(-1, 1) * step, 0, 1))
        profiles[node] = Morphology(**values)
    if set(LEUKEMIA7_PROFILES) <= set(taxonomy.leaves):
        profiles.update(LEUKEMIA7_PROFILES)
    return profiles


@dataclass(frozen=True)
class Stain:
    """Per-patient acquisition: stain gains, nucleus hue, light, blur and noise."""

    gains: tuple[float, float, float]
    nucleus_hue: float
    background: tuple[float, float, float]
    gradient: tuple[float, float]
    blur: float
    noise: float
    size_shift: float

    @classmethod
    def random(cls, rng: np.random.Generator) -> Stain:
        return cls(
            gains=tuple(rng.uniform(0.9, 1.1, 3).tolist()),
            nucleus_hue=float(rng.uniform(-0.1, 0.1)),
            background=tuple((np.array([0.94, 0.89, 0.9]) + rng.uniform(-0.04, 0.04, 3)).tolist()),
            gradient=tuple(rng.uniform(-0.12, 0.12, 2).tolist()),
            blur=float(rng.uniform(0.0, 1.0)),
            noise=float(rng.uniform(0.005, 0.03)),
            size_shift=float(rng.normal(0, 0.06)),
        )


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field_ = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return field_ / (field_.std() + 1e-8)


@dataclass(frozen=True)
class _Frame:
    """Pixel coordinates of the image and of the cell (rotated frame ``u``, ``v``)."""

    xx: np.ndarray
    yy: np.ndarray
    u: np.ndarray
    v: np.ndarray
    cx: float
    cy: float
    radius: float


def render_cell(
    morph: Morphology, stain: Stain, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of a cell on a red-cell background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    img[:] = stain.background
    img = _red_cells(img, xx, yy, stain, rng)
    img, frame = _cytoplasm(img, xx, yy, morph, stain, rng)
    img = _nucleus(img, frame, morph, stain, rng)
    img = _inclusions(img, frame, morph, rng)
    return _acquisition(img, frame, stain, rng)


def _red_cells(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, stain: Stain,
               rng: np.random.Generator) -> np.ndarray:
    """Red blood cells (with central pallor) around the leukocyte."""
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(-0.1, 1.1, 2)
        r = rng.uniform(0.11, 0.16)
        d = np.hypot(xx - cx, yy - cy) / r
        cell = np.clip((1 - d) * 8, 0, 1)
        pallor = np.clip((0.45 - d) * 6, 0, 1)
        colour = np.array([0.86, 0.58, 0.6]) + rng.uniform(-0.03, 0.03, 3)
        rbc = colour * (1 - 0.35 * pallor[..., None]) + 0.35 * pallor[..., None] * stain.background
        img = img * (1 - cell[..., None]) + rbc * cell[..., None]
    return img


def _cytoplasm(img: np.ndarray, xx: np.ndarray, yy: np.ndarray, morph: Morphology,
               stain: Stain, rng: np.random.Generator) -> tuple[np.ndarray, _Frame]:
    """A slightly elongated, textured cytoplasm; returns the cell's frame."""
    size = img.shape[0]
    radius = (0.24 + 0.18 * morph.cell_radius) * (1 + stain.size_shift)
    cx, cy = 0.5 + rng.normal(0, 0.02, 2)
    angle = rng.uniform(0, np.pi)
    stretch = 1 + 0.15 * rng.uniform(-1, 1)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    edge = _smooth_noise(rng, size, size / 12) * 0.03
    dc = np.hypot(u * stretch, v / stretch) / radius + edge
    cyto_mask = np.clip((1 - dc) * size * 0.08, 0, 1)
    pink, blue = np.array([0.9, 0.76, 0.82]), np.array([0.62, 0.68, 0.88])
    cyto = pink + (blue - pink) * morph.cytoplasm_blue
    cyto_tex = 1 + 0.04 * _smooth_noise(rng, size, 1.5)[..., None]
    img = img * (1 - cyto_mask[..., None]) + (cyto * cyto_tex) * cyto_mask[..., None]
    return img, _Frame(xx, yy, u, v, float(cx), float(cy), radius)


def _nucleus(img: np.ndarray, f: _Frame, morph: Morphology, stain: Stain,
             rng: np.random.Generator) -> np.ndarray:
    """One ellipse or a chain of lobes, with chromatin texture and nucleoli."""
    size = img.shape[0]
    u, v, radius = f.u, f.v, f.radius
    n_r = radius * (0.45 + 0.47 * morph.nc_ratio)
    n_lobes = max(1, round(morph.lobes))
    nuc_field = np.full((size, size), np.inf, np.float32)
    if n_lobes == 1:
        ecc = 1 + morph.eccentricity
        ox, oy = rng.normal(0, 0.15 * (radius - n_r) + 1e-4, 2)
        dn = np.hypot((u - ox) * ecc, (v - oy) / ecc) / n_r
        nuc_field = np.minimum(nuc_field, dn)
    else:
        lobe_r = n_r * (0.75 / np.sqrt(n_lobes) + 0.2)
        arc = rng.uniform(0.6, 1.4)
        for k in range(n_lobes):
            t = (k - (n_lobes - 1) / 2) / max(1, n_lobes - 1)
            lx = t * (n_r * 1.5)
            ly = arc * n_r * 0.5 * (t * t * 4 - 1) * 0.5
            dn = np.hypot(u - lx, v - ly) / lobe_r
            nuc_field = np.minimum(nuc_field, dn)
    nuc_field = nuc_field + _smooth_noise(rng, size, size / 20) * 0.04
    nuc_mask = np.clip((1 - nuc_field) * size * 0.1, 0, 1)
    darkness = 0.35 + 0.4 * morph.nucleus_darkness
    base = np.array([0.42 + stain.nucleus_hue, 0.25, 0.55 - stain.nucleus_hue])
    nucleus = base * (1.2 - darkness)
    coarse = 0.8 + 3.0 * morph.chromatin
    chromatin = _smooth_noise(rng, size, coarse * size / 96)
    texture = 1 + (0.1 + 0.3 * morph.chromatin) * np.tanh(chromatin)[..., None]
    nucleus_img = np.clip(nucleus * texture, 0, 1)
    for _ in range(round(morph.nucleoli * 3 * rng.uniform(0.5, 1.2))):
        px, py = rng.normal(0, n_r * 0.35, 2)
        spot = np.clip(1 - np.hypot(u - px, v - py) / (n_r * 0.18), 0, 1)
        nucleus_img = nucleus_img + 0.25 * spot[..., None] * (1 - nucleus_img)
    return img * (1 - nuc_mask[..., None]) + nucleus_img * nuc_mask[..., None]


def _inclusions(img: np.ndarray, f: _Frame, morph: Morphology,
                rng: np.random.Generator) -> np.ndarray:
    """Granules, vacuoles and Auer rods in the cytoplasm."""
    size = img.shape[0]
    xx, yy, cx, cy, radius = f.xx, f.yy, f.cx, f.cy, f.radius
    n_granules = int(morph.granules * 90 * rng.uniform(0.6, 1.4))
    g_colour = np.array([0.35, 0.15, 0.4]) + (
        np.array([0.85, 0.4, 0.25]) - np.array([0.35, 0.15, 0.4])) * morph.granule_red
    g_r = (0.008 + 0.012 * morph.granules) * rng.uniform(0.8, 1.2)
    for _ in range(n_granules):
        rr, th = radius * np.sqrt(rng.uniform(0, 0.95)), rng.uniform(0, 2 * np.pi)
        gx, gy = cx + rr * np.cos(th), cy + rr * np.sin(th)
        spot = np.clip(1 - np.hypot(xx - gx, yy - gy) / g_r, 0, 1)
        img = img * (1 - 0.8 * spot[..., None]) + 0.8 * spot[..., None] * g_colour
    for _ in range(int(morph.vacuoles * 6 * rng.uniform(0.3, 1.2))):
        rr, th = radius * rng.uniform(0.6, 0.9), rng.uniform(0, 2 * np.pi)
        gx, gy = cx + rr * np.cos(th), cy + rr * np.sin(th)
        spot = np.clip((1 - np.hypot(xx - gx, yy - gy) / (radius * 0.12)) * 4, 0, 1)
        img = img * (1 - 0.6 * spot[..., None]) + 0.6 * spot[..., None] * np.array([0.95] * 3)
    if rng.uniform() < morph.auer:
        th = rng.uniform(0, np.pi)
        rr, ph = radius * 0.75, rng.uniform(0, 2 * np.pi)
        ax, ay = cx + rr * np.cos(ph), cy + rr * np.sin(ph)
        length = radius * rng.uniform(0.3, 0.5)
        du, dv = xx - ax, yy - ay
        along = du * np.cos(th) + dv * np.sin(th)
        across = -du * np.sin(th) + dv * np.cos(th)
        rod = (np.abs(along) < length / 2) & (np.abs(across) < max(0.006, 1.2 / size))
        img[rod] = img[rod] * 0.3 + 0.7 * np.array([0.55, 0.12, 0.25])
    return img


def _acquisition(img: np.ndarray, f: _Frame, stain: Stain,
                 rng: np.random.Generator) -> np.ndarray:
    """The patient's stain gains, illumination gradient, blur and noise; to uint8."""
    size = img.shape[0]
    img = img * np.array(stain.gains, np.float32)
    img = img * (1 + stain.gradient[0] * (f.xx - 0.5) + stain.gradient[1] * (f.yy - 0.5))[..., None]
    if stain.blur > 0.05:
        img = ndimage.gaussian_filter(img, sigma=(stain.blur * size / 128, stain.blur * size / 128,
                                                  0))
    img = img + rng.normal(0, stain.noise, img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate(
    out: str | Path,
    taxonomy: Taxonomy,
    *,
    patients_per_class: int = 6,
    cells_per_patient: int = 20,
    size: int = 96,
    seed: int = 0,
    inner_fraction: float = 0.0,
    image_format: str = "png",
    progress: bool = True,
) -> int:
    """Write ``OUT/<label>/<patient>/<image>`` for every leaf; returns the number of images.

    ``inner_fraction`` of the cells are labelled at their leaf's parent instead (an
    "Acute" cell of unknown subtype), to exercise inner-node labels.
    """
    for name, value, low in (("patients_per_class", patients_per_class, 1),
                             ("cells_per_patient", cells_per_patient, 1), ("size", size, 16)):
        if not isinstance(value, int) or value < low:
            raise LeukotreeError(f"The '{name}' parameter must be an integer >= {low}; "
                                 f"got {value!r}.")
    if not 0 <= inner_fraction <= 1:
        raise LeukotreeError(f"The 'inner_fraction' parameter must be in [0, 1]; "
                             f"got {inner_fraction!r}.")
    if image_format not in {"png", "jpg", "bmp"}:
        raise LeukotreeError(f"The 'image_format' parameter must be png, jpg or bmp; "
                             f"got {image_format!r}.")
    out = Path(out)
    profiles = class_profiles(taxonomy, seed)
    jobs = [(leaf, p) for leaf in taxonomy.leaves for p in range(patients_per_class)]
    count = 0
    for leaf, p in track(jobs, total=len(jobs), description="Synthesising patients",
                         enabled=progress):
        rng = _name_rng(f"{leaf}/{p}", seed)
        stain = Stain.random(rng)
        patient_morph = profiles[leaf].jitter(rng, 0.04)
        patient = f"{leaf}-p{p:03d}"
        parent = taxonomy.parent(leaf)
        for c in range(cells_per_patient):
            morph = patient_morph.jitter(rng, 0.09)
            pixels = render_cell(morph, stain, size, rng)
            label = leaf
            if parent != taxonomy.root and rng.uniform() < inner_fraction:
                label = parent
            folder = out / label / patient
            folder.mkdir(parents=True, exist_ok=True)
            options = {"quality": 92} if image_format == "jpg" else {}
            Image.fromarray(pixels).save(folder / f"{patient}_{c:04d}.{image_format}", **options)
            count += 1
    return count
