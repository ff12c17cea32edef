"""Do the slides' colours alone tell the labels apart? (``leukotree data colour``)

When the slides of one class were stained or imaged alike (a batch of stain, a period of
a study), a model can learn that colour instead of the cells, and patient-grouped
cross-validation rewards it: its test patients share the colour of their class, a later
cohort does not. This check asks it of the data before any model, per patient:

1. each image (read at ``size`` pixels a side, optionally normalised first by the
   models' own per-image stain normalisation, :mod:`leukotree.models.stain`, fitted on
   these images) gives six colour numbers in CIE L*a*b*
   (:func:`~leukotree.models.stain.rgb_to_lab`), by ``features``:

   * ``stats``: the means and standard deviations of L*, a*, b* over its pixels (what a
     per-image Reinhard normalisation sets to the same values for every image);
   * ``parts``: the mean L*a*b* of its brightest :data:`PART_FRACTION` of pixels by L*
     (the plasma between the cells) and of its darkest :data:`PART_FRACTION` (the
     nucleus): the balance between the two stains, which a per-image affine
     normalisation of each channel does not take away;

2. a patient's features are the means over its images, optionally only the images of
   chosen cell types (``cell_types``: cells that carry no sign of the disease, such as
   lymphocytes and neutrophils, show a batch rather than the disease);
3. an L2 logistic regression on them, scored out of fold over the patients
   (:func:`colour_separability`: repeated stratified k-fold,
   the mean AUROC and its range over the repeats).

An AUROC near 0.5: the colours say nothing of the labels. Far above: a model can read the
label from the stain; train with a stain normalisation and measure what the model owes
to colour with ``leukotree cv --protocol kfold,colour,colour-swap``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from leukotree.data.discover import Sample
from leukotree.data.images import DEFAULT_MAX_PIXELS, STAIN_NORMS, decode_many
from leukotree.errors import LeukotreeError
from leukotree.taxonomy import Taxonomy

#: The feature sets (module docstring) and the names of their six numbers.
FEATURES: dict[str, tuple[str, ...]] = {
    "stats": ("mean_L", "mean_a", "mean_b", "std_L", "std_a", "std_b"),
    "parts": ("bright_L", "bright_a", "bright_b", "dark_L", "dark_a", "dark_b"),
}
#: Share of an image's pixels (by L*) that make its bright and its dark part.
PART_FRACTION = 0.1
#: AUROC from which the colours are said to tell the labels apart, and below which they
#: are said to say little of them.
CONFOUNDED_AUROC = 0.7
UNINFORMATIVE_AUROC = 0.6


def colour_features(pixels: np.ndarray, features: str = "stats", chunk: int = 256,
                    ) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 sRGB -> ``(N, 6)``: the ``features`` of each image (module
    docstring; :data:`FEATURES` names the columns). ``stats`` are
    :func:`leukotree.data.cohorts.lab_statistics` (the patients' clusters use the same),
    one image at a time; ``parts`` are computed ``chunk`` images at a time."""
    from leukotree.data.cohorts import lab_statistics
    from leukotree.models.stain import rgb_to_lab

    if features not in FEATURES:
        raise LeukotreeError(f"--features must be one of {', '.join(FEATURES)}; got "
                             f"{features!r}.")
    if features == "stats":
        return np.array([lab_statistics(p) for p in pixels]).reshape(len(pixels), 6)
    out = []
    for i in range(0, len(pixels), chunk):
        x = torch.from_numpy(np.array(pixels[i:i + chunk])).permute(0, 3, 1, 2)
        lab = rgb_to_lab(x).double().flatten(2)  # (B, 3, P)
        k = max(1, round(PART_FRACTION * lab.shape[2]))
        order = lab[:, 0].argsort(dim=1)  # by L*, darkest first
        dark = lab.gather(2, order[:, None, :k].expand(-1, 3, -1)).mean(2)
        bright = lab.gather(2, order[:, None, -k:].expand(-1, 3, -1)).mean(2)
        out.append(torch.cat([bright, dark], dim=1))
    return torch.cat(out).numpy() if out else np.zeros((0, 6))


def normalise_stain(pixels: np.ndarray, stain_norm: str, chunk: int = 256) -> np.ndarray:
    """The images normalised per image as a model with ``stain_norm`` does (the target
    fitted on these images, :func:`~leukotree.models.stain.fit_stain_target`), on the
    whole image rather than the model's crop; ``none`` returns them as they are."""
    from leukotree.models.stain import fit_stain_target, stain_module

    if stain_norm not in STAIN_NORMS:
        raise LeukotreeError(f"--stain-norm must be one of {', '.join(STAIN_NORMS)}; got "
                             f"{stain_norm!r}.")
    if stain_norm == "none" or len(pixels) == 0:
        return pixels
    try:
        module = stain_module(stain_norm, fit_stain_target(stain_norm, pixels))
    except ValueError as err:
        raise LeukotreeError(f"--stain-norm {stain_norm}: {err}.") from None
    out = np.empty_like(pixels)
    with torch.no_grad():
        for i in range(0, len(pixels), chunk):
            x = torch.from_numpy(np.array(pixels[i:i + chunk])).permute(0, 3, 1, 2)
            y = module(x.float()).round().clamp(0, 255).to(torch.uint8)
            out[i:i + chunk] = y.permute(0, 2, 3, 1).numpy()
    return out


@dataclass
class ColourConfound:
    """What :func:`colour_confound` found (see the module docstring)."""

    features: str
    stain_norm: str
    cell_types: list[str] | None
    n_images: int
    n_patients: int
    separability: dict[str, Any]  # colour_separability's figures
    by_label: dict[str, dict[str, float]]  # label -> feature -> mean over its patients
    unreadable: list[str] = field(default_factory=list)
    other_cell_types: int = 0  # images left out as of other cell types than cell_types
    no_cell_type: int = 0  # images left out as without a cell type (with cell_types)

    @property
    def informative(self) -> bool:
        """Whether the colours say something of the labels (AUROC from
        :data:`UNINFORMATIVE_AUROC`)."""
        return (self.separability.get("auroc") or 0.0) >= UNINFORMATIVE_AUROC

    @property
    def verdict(self) -> str:
        """One sentence: what the AUROC says, and what to do about it."""
        auroc = self.separability.get("auroc")
        if auroc is None:
            return f"Not measured: {self.separability.get('note')}."
        said = f"AUROC {auroc:.3f} from the patients' colours alone"
        # the mean colour is what a per-image normalisation takes away; the colours of
        # nucleus and plasma, or colours left after one, are not
        stain = self.features == "parts" or self.stain_norm != "none"
        check = ("`leukotree cv --protocol kfold,stain,stain-swap`" if stain else
                 "`leukotree cv --protocol kfold,colour,colour-swap`")
        if auroc >= CONFOUNDED_AUROC:
            advice = ("A per-image normalisation does not take these colours away: measure "
                      f"what a model owes to them with {check}." if stain else
                      "Train with a stain normalisation (stain_norm: reinhard) and measure "
                      f"what a model owes to colour with {check}.")
            return (f"The colours alone tell the labels apart ({said}): a model can learn the "
                    f"stain instead of the cells. {advice}")
        if auroc < UNINFORMATIVE_AUROC:
            return f"The colours say little of the labels ({said})."
        return (f"The colours say something of the labels ({said}); check what a model "
                f"owes to them with {check}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"verdict": self.verdict}


def select_cell_types(samples: Sequence[Sample], cell_taxonomy: Taxonomy,
                      cell_types: str) -> tuple[list[Sample], tuple[str, ...]]:
    """The samples whose cell label lies under one of the comma-listed nodes
    ``cell_types`` of ``cell_taxonomy`` (aliases resolved), and those nodes."""
    from leukotree.patients.models import focus_types, in_focus

    nodes = focus_types(cell_taxonomy, cell_types, "--cell-types")
    if not any(s.cell_label is not None for s in samples):
        raise LeukotreeError("--cell-types needs each image's cell type: give --cell-labels "
                             "(e.g. column:cell_type) and --cell-taxonomy.")
    return [s for s in samples if s.cell_label is not None
            and in_focus(cell_taxonomy, nodes, s.cell_label)], nodes


def colour_confound(samples: Sequence[Sample], *, features: str = "stats",
                    stain_norm: str = "none", cell_taxonomy: Taxonomy | None = None,
                    cell_types: str | None = None, size: int = 96, workers: int = 2,
                    folds: int = 5, repeats: int = 10, seed: int = 0, progress: bool = False,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> ColourConfound:
    """How well the patients' colours alone tell their labels apart (module docstring).
    Unreadable images are left out and named in ``unreadable``."""
    if features not in FEATURES:
        raise LeukotreeError(f"--features must be one of {', '.join(FEATURES)}; got "
                             f"{features!r}.")
    if features == "stats" and stain_norm == "reinhard":
        raise LeukotreeError(
            "--features stats with --stain-norm reinhard: a Reinhard normalisation sets "
            "every image's L*a*b* means and deviations to one target, so these features are "
            "nearly the same for every image (gamut clipping aside) and tell nothing apart. "
            "Use --features parts (the colours of nuclei and plasma, which it keeps), or "
            "--stain-norm none or white.")
    chosen, nodes, untyped = list(samples), None, 0
    if cell_types is not None:
        if cell_taxonomy is None:
            raise LeukotreeError("--cell-types needs --cell-taxonomy (and --cell-labels).")
        chosen, nodes = select_cell_types(samples, cell_taxonomy, cell_types)
        untyped = sum(s.cell_label is None for s in samples)
    if not chosen:
        raise LeukotreeError("No image to measure" + (
            f": none is of the cell types {', '.join(nodes)}." if nodes else "."))
    decoded = decode_many([s.path for s in chosen], size, workers=workers, on_error="report",
                          progress=progress, max_pixels=max_pixels)
    ok = decoded.ok
    kept = [s for s, good in zip(chosen, ok, strict=True) if good]
    values = colour_features(normalise_stain(decoded.pixels[ok], stain_norm), features)
    stats = {str(s.path): v for s, v in zip(kept, values, strict=True)}
    rows = [{"path": str(s.path), "label": s.label, "group": s.group} for s in kept]
    label_of: dict[str, str] = {}
    for s in kept:
        if label_of.setdefault(s.group, s.label) != s.label:
            raise LeukotreeError(
                f"Patient '{s.group}' has images of two labels ({label_of[s.group]!r} and "
                f"{s.label!r}, e.g. {s.path}); the colour check compares patients, each of "
                "one label. Give each patient one label, or check the --patients option.")
    means = patient_means(rows, stats)
    by_label: dict[str, list[np.ndarray]] = defaultdict(list)
    for group, mean in means.items():
        by_label[label_of[group]].append(mean)
    return ColourConfound(
        features=features, stain_norm=stain_norm,
        cell_types=list(nodes) if nodes else None, n_images=len(kept),
        n_patients=len(means),
        separability=colour_separability(rows, stats, folds=folds, repeats=repeats, seed=seed),
        by_label={label: dict(zip(FEATURES[features], map(float, np.mean(v, axis=0)),
                                  strict=True)) for label, v in sorted(by_label.items())},
        unreadable=[e for e in decoded.errors if e is not None],
        other_cell_types=len(samples) - len(chosen) - untyped, no_cell_type=untyped)


def row_group(row: dict[str, str]) -> str:
    """The patient a split row belongs to: its ``group``, else ``patient``, else itself."""
    return row.get("group") or row.get("patient") or row["path"]


def patient_means(rows: Sequence[dict[str, str]], stats: dict[str, np.ndarray],
                  ) -> dict[str, np.ndarray]:
    """Per patient (``group``, else ``patient``, column of split rows), the mean of its
    images' statistics."""
    by: dict[str, list[np.ndarray]] = defaultdict(list)
    for row in rows:
        by[row_group(row)].append(stats[row["path"]])
    return {g: np.mean(v, axis=0) for g, v in by.items()}


def colour_separability(rows: Sequence[dict[str, str]], stats: dict[str, np.ndarray], *,
                        folds: int = 5, repeats: int = 10, seed: int = 0,
                        ) -> dict[str, float | int | str]:
    """How well the patients' mean colours alone (:func:`patient_means`, six numbers,
    standardised) tell their labels apart, before any model: an L2 logistic regression
    (scikit-learn, ``C`` = 1) scored out of fold by ``repeats`` x stratified ``folds``-fold
    CV over the patients (``folds`` lowered to the smallest class's count); per repeat the
    AUROC (macro one-vs-rest for more than two labels). Returns its mean, minimum and
    maximum over the repeats and the number of patients. Near 0.5: the colours say
    nothing of the labels; far above: a model can learn the colour instead of the cells."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    means = patient_means(rows, stats)
    labels = {row_group(r): r["label"] for r in rows}
    groups = sorted(means)
    x = np.array([means[g] for g in groups])
    y = np.array([labels[g] for g in groups])
    classes, counts = np.unique(y, return_counts=True)
    k = min(folds, int(counts.min())) if len(classes) else 0
    if len(classes) < 2 or k < 2:
        return {"n_patients": len(groups),
                "note": "needs two labels with at least two patients each"}
    aurocs = []
    for r in range(repeats):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        proba = cross_val_predict(model, x, y, method="predict_proba", cv=StratifiedKFold(
            k, shuffle=True, random_state=seed + r))
        aurocs.append(roc_auc_score(y == classes[1], proba[:, 1]) if len(classes) == 2
                      else roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    return {"n_patients": len(groups), "folds": k, "repeats": repeats,
            "auroc": float(np.mean(aurocs)), "auroc_min": float(np.min(aurocs)),
            "auroc_max": float(np.max(aurocs))}
