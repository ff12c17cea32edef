"""A cohort whose colours say nothing of the diagnosis: each CV fold's test patients
recoloured, then scored again by the same fold model (``cv --protocol kfold,colour``).

Patient-grouped CV draws its test patients from the weeks its training patients came
from. When the slides of one class were stained or imaged alike (a batch of stain, a
period of the study), a model can learn that colour instead of the cells, and CV rewards
it: the test patients share the colour of their class. A later cohort does not. This
protocol takes the colour away at test time only, with the fold's model unchanged:

1. per image, the mean ``m`` and standard deviation ``s`` of each CIE L*a*b* channel
   over its pixels (:func:`~leukotree.evaluation.confound.colour_features` ``stats``;
   the D65 formulas of the models' :func:`~leukotree.models.stain.rgb_to_lab`), kept in
   the CV folder for every colour protocol; per patient ``p``, ``m_p`` and ``s_p``,
   their means over its images;
2. a target per test patient, from the fold's **training** patients only:
   ``colour`` (neutral), the mean of ``m`` and ``s`` over all of them;
   ``colour-swap``, the mean over those whose label differs from the patient's (an
   APL patient takes the other AMLs' colour), the worst case of a colour cue;
3. every pixel of each of the patient's images moved as one slide (Reinhard et al.
   2001, per patient rather than per image, so its cells keep their differences):

       lab' = (lab - m_p) / max(s_p, 1) * s_target + m_target

   then back to sRGB (out-of-gamut colours clipped), written losslessly (PNG);
4. the fold model evaluated on the recoloured images
   (:func:`~leukotree.evaluation.evaluate.evaluate`, same options), and the out-of-fold
   patients pooled as plain CV pools them.

A model that reads the cells scores alike on both; the drop is what it owed to colour.
A patient's mean colour also moves with its cell mix (granular promyelocytes are
redder), so the neutral recolouring takes away a little real signal too: the estimate
leans pessimistic.

A model that normalises each image's colour (``stain_norm: reinhard``) undoes that
recolouring by construction, yet the balance between the two stains, the colour of the
nucleus against that of the plasma, survives a per-image affine normalisation of each
channel (``leukotree data colour --features parts``). ``stain`` / ``stain-swap`` move
that balance instead: per image the colours of its brightest and darkest
:data:`~leukotree.evaluation.confound.PART_FRACTION` of pixels by L*
(:func:`~leukotree.evaluation.confound.colour_features` ``parts``: ``b`` and ``d``, three
numbers each), per patient their means ``b_p`` and ``d_p``, targets ``b_t``, ``d_t`` as
above, and every pixel shifted by an amount that slides with its lightness from the dark
part's shift to the bright part's (:func:`restain`):

    w = clip((L - L(d_p)) / max(L(b_p) - L(d_p), 1), 0, 1)
    lab' = lab + (1 - w) (d_t - d_p) + w (b_t - b_p)

so the patient's nuclei take the target's nuclear colour and its plasma the target's
plasma colour (on average: a pixel of the dark tenth lighter than its mean takes a little
of the plasma's shift, and colours pushed out of gamut are clipped), a change no
per-image shift-and-scale of the channels undoes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leukotree.data.images import DEFAULT_MAX_PIXELS, load_rgb_array
from leukotree.errors import LeukotreeError
from leukotree.evaluation.confound import FEATURES, colour_features, patient_means, row_group
from leukotree.rundir import read_csv, write_csv

#: The recolouring protocols: name -> (the colour features moved, the target; see the
#: module docstring).
COLOUR_PROTOCOLS = {"colour": ("stats", "neutral"), "colour-swap": ("stats", "swap"),
                    "stain": ("parts", "neutral"), "stain-swap": ("parts", "swap")}
#: The targets of the recolouring protocols.
COLOUR_TARGETS = ("neutral", "swap")
#: The colour features each move takes (:func:`move_colours`), by the name of their numbers.
COLOUR_MOVES = {"stats": "colour statistics", "parts": "stain parts"}
#: CIE76 delta E from its moved colour beyond which a pixel counts as clipped to the sRGB
#: gamut (8-bit rounding moves an sRGB colour by less than 1: at worst about 0.97).
CLIP_DELTA_E = 2.0
#: Share of an image's pixels clipped beyond which the image is said not to have taken
#: its target colours fully (:func:`clipped_note`).
CLIP_SHARE = 0.01
#: Floor of a patient's L*a*b* standard deviation (a flat image is not blown up).
MIN_STD = 1.0


def move_colours(pixels: np.ndarray, source: Sequence[float], target: Sequence[float],
                 features: str = "stats") -> tuple[np.ndarray, float]:
    """An ``(H, W, 3)`` uint8 sRGB image's colour ``features`` moved from ``source`` to
    ``target`` (:func:`recolour` for ``stats``, :func:`restain` for ``parts``): the moved
    image (uint8 sRGB, rounded, clipped) and the share of its pixels clipped, those whose
    colour lies more than :data:`CLIP_DELTA_E` (CIE76) from the L*a*b* they were moved to:
    outside the sRGB gamut."""
    from leukotree.models.stain import lab_to_rgb, rgb_to_lab

    src, tgt = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    if features not in COLOUR_MOVES:
        raise ValueError(f"features must be one of {', '.join(COLOUR_MOVES)}; got "
                         f"{features!r}: give the name of the colour features source and "
                         "target hold")
    if src.shape != (6,) or tgt.shape != (6,):
        raise ValueError(f"{COLOUR_MOVES[features]} need 6 values each "
                         f"({', '.join(FEATURES[features])}); got shapes {src.shape} and "
                         f"{tgt.shape}: give one row of colour_features(..., {features!r})")
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)[None]
    lab = rgb_to_lab(x).double()
    if features == "stats":
        m_s, s_s = (torch.from_numpy(v).view(1, 3, 1, 1) for v in (src[:3], src[3:]))
        m_t, s_t = (torch.from_numpy(v).view(1, 3, 1, 1) for v in (tgt[:3], tgt[3:]))
        moved = (lab - m_s) / s_s.clamp(min=MIN_STD) * s_t + m_t
    else:
        span = max(src[0] - src[3], 1.0)
        w = ((lab[:, :1] - src[3]) / span).clamp(0.0, 1.0)
        dark, bright = (torch.from_numpy(v).view(1, 3, 1, 1)
                        for v in (tgt[3:] - src[3:], tgt[:3] - src[:3]))
        moved = lab + (1 - w) * dark + w * bright
    rgb = (lab_to_rgb(moved.float()) + 0.5).clamp(0, 255).to(torch.uint8)
    missed = (rgb_to_lab(rgb).double() - moved).norm(dim=1)  # CIE76 delta E per pixel
    return rgb[0].permute(1, 2, 0).numpy(), float((missed > CLIP_DELTA_E).double().mean())


def recolour(pixels: np.ndarray, source: Sequence[float], target: Sequence[float],
             ) -> np.ndarray:
    """``lab' = (lab - m_source) / max(s_source, MIN_STD) * s_target + m_target`` per
    channel of an ``(H, W, 3)`` uint8 sRGB image; ``source`` and ``target`` are
    ``(m_L, m_a, m_b, s_L, s_a, s_b)``. Returns uint8 sRGB (rounded, clipped)."""
    return move_colours(pixels, source, target, "stats")[0]


def restain(pixels: np.ndarray, source: Sequence[float], target: Sequence[float],
            ) -> np.ndarray:
    """Move an ``(H, W, 3)`` uint8 sRGB image's bright and dark parts from ``source`` to
    ``target`` (each ``(b_L, b_a, b_b, d_L, d_a, d_b)``): every pixel shifted in L*a*b* by
    ``(1 - w) (d_t - d_s) + w (b_t - b_s)``, ``w = clip((L - d_L) / max(b_L - d_L, 1), 0,
    1)`` of the source (module docstring). Returns uint8 sRGB (rounded, clipped)."""
    return move_colours(pixels, source, target, "parts")[0]


def colour_statistics(paths: Sequence[str], cache: Path, *,
                      max_pixels: int = DEFAULT_MAX_PIXELS,
                      features: str = "stats") -> dict[str, np.ndarray]:
    """Each path's six colour numbers of ``features`` (full size,
    :func:`~leukotree.evaluation.confound.colour_features`). Read from ``cache`` (a CSV,
    ``path`` and the features' columns) when there, the new ones appended to it."""
    columns = FEATURES[features]
    known: dict[str, np.ndarray] = {}
    if cache.exists():
        for row in read_csv(cache, "Colour statistics", ("path", *columns)):
            known[row["path"]] = np.array([float(row[c]) for c in columns])
    missing = [p for p in dict.fromkeys(paths) if p not in known]
    for path in missing:
        pixels = load_rgb_array(path, None, max_pixels=max_pixels)
        known[path] = colour_features(pixels[None], features)[0]
    if missing:
        write_csv(cache, [{"path": p, **dict(zip(columns, map(float, v), strict=True))}
                          for p, v in known.items()], ("path", *columns))
    return {p: known[p] for p in paths}


def colour_targets(test: Sequence[dict[str, str]], train: Sequence[dict[str, str]],
                   stats: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The target statistics of each test patient (see the module docstring): ``neutral``,
    the mean over the training patients; ``swap``, over the training patients whose label
    differs from the test patient's (each patient weighs alike)."""
    if mode not in COLOUR_TARGETS:
        raise LeukotreeError(f"The colour target must be one of "
                             f"{', '.join(COLOUR_TARGETS)}; got {mode!r}.")
    train_means = patient_means(train, stats)
    train_labels = {row_group(r): r["label"] for r in train}
    test_labels = {row_group(r): r["label"] for r in test}
    targets = {}
    for group, label in test_labels.items():
        donors = [g for g in train_means if mode == "neutral" or train_labels[g] != label]
        if not donors:
            raise LeukotreeError(f"No training patient of another label than '{label}' to "
                                 f"take the colour of (test patient {group}); colour-swap "
                                 "needs at least two labels among the training patients.")
        targets[group] = np.mean([train_means[g] for g in donors], axis=0)
    return targets


def write_recoloured(test: Sequence[dict[str, str]], train: Sequence[dict[str, str]],
                     stats: dict[str, np.ndarray], mode: str, folder: Path, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, features: str = "stats") -> Path:
    """Recolour the ``test`` images (split rows) towards :func:`colour_targets` into
    ``folder/images/`` (:func:`move_colours` of the ``features`` that ``stats`` hold) and
    write ``folder/manifest.csv`` (the rows' ``path,label,patient,slide`` and ``cell_type``
    when present, the path the recoloured copy's, and ``clipped``: the share of the copy's
    pixels clipped to the sRGB gamut). Images already written (a resumed CV) are kept, with
    the ``clipped`` of the manifest that listed them, or measured again when it has none
    (an interrupted run, a CV of an earlier version)."""
    sources = patient_means(test, stats)
    targets = colour_targets(test, train, stats, mode)
    columns = ["path", "label", "patient", "slide"] + (
        ["cell_type"] if any("cell_type" in row for row in test) else []) + ["clipped"]
    manifest = recoloured_manifest(folder)
    earlier = ({_copy_key(Path(row["path"])): row.get("clipped", "")
                for row in read_csv(manifest, "Recoloured manifest", ("path",))}
               if manifest.exists() else {})
    out_rows = []
    for i, row in enumerate(test):
        group = row_group(row)
        dest = folder / "images" / _safe(group) / f"{i:06d}_{_safe(Path(row['path']).stem)}.png"
        clipped = earlier.get(_copy_key(dest), "") if dest.exists() else ""
        if not clipped:
            moved, share = move_colours(load_rgb_array(row["path"], None,
                                                       max_pixels=max_pixels),
                                        sources[group], targets[group], features)
            clipped = f"{share:.6f}"
            if not dest.exists():
                from PIL import Image

                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f".{dest.name}.tmp")
                Image.fromarray(moved).save(tmp, format="PNG")
                tmp.replace(dest)
        out_rows.append({c: row.get(c, "") for c in columns}
                        | {"path": str(dest.resolve()), "clipped": clipped})
    return write_csv(manifest, out_rows, columns)


def _copy_key(path: Path) -> str:
    """A recoloured copy's name inside its folder (``<patient>/<file>``), wherever the
    folder lies."""
    return f"{path.parent.name}/{path.name}"


def clipped_note(clipped: dict[str, Any]) -> str:
    """One line on :func:`clipped_summary`'s images with more than :data:`CLIP_SHARE` of
    their pixels clipped."""
    return (f"{clipped['images_over']} of {clipped['n_images']} recoloured images have "
            f"more than {CLIP_SHARE:.0%} of their pixels clipped to the sRGB gamut: those did "
            "not take the target's colours fully (summary.json 'clipped').")


def recoloured_manifest(folder: Path) -> Path:
    """The manifest :func:`write_recoloured` writes in ``folder``."""
    return folder / "manifest.csv"


def clipped_summary(manifests: Sequence[Path]) -> dict[str, Any]:
    """Over the recoloured images of ``manifests`` (:func:`write_recoloured`; a missing
    one is counted as ``manifests_missing``): ``n_images`` whose ``clipped`` share is
    known, ``mean_share`` (the mean share of their pixels clipped to the sRGB gamut),
    ``images_over`` (images with more than :data:`CLIP_SHARE` clipped) and ``n_unknown``
    (images listed without a share). A large share means the recolouring could not give
    those images the target's colours."""
    shares: list[float] = []
    unknown = missing = 0
    for m in manifests:
        if not m.exists():
            missing += 1
            continue
        for row in read_csv(m, "Recoloured manifest", ("path",)):
            if row.get("clipped"):
                shares.append(float(row["clipped"]))
            else:
                unknown += 1
    return {"n_images": len(shares), "mean_share": float(np.mean(shares)) if shares else None,
            "images_over": sum(s > CLIP_SHARE for s in shares), "n_unknown": unknown,
            "manifests_missing": missing}


def _safe(name: str) -> str:
    """A file-name-safe version of ``name``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "_"
