"""Folds that simulate a later cohort: patients clustered by what their slides look like.

Patient-grouped k-fold CV (:func:`~leukotree.data.splits.assign_folds`) draws its test
patients at random, so every fold's test patients resemble its training patients as a
whole. A later cohort does not: its slides were stained, imaged and sampled another
week. Leave-cluster-out CV holds out patients who resemble *each other*:

1. per patient, statistics computed from its images before any training
   (:func:`patient_statistics`): the mean and the standard deviation of each CIE L*a*b*
   channel over its cells (each image read small, ``size`` pixels a side, and averaged
   over the patient's images), and when cell types are known, the cell-mix fractions
   ``n(type) / n(cells)``;
2. the features standardised, ``z = (x - mean) / std`` per column (a constant column
   becomes 0), each block of columns (colour, cell mix) divided by the square root of its
   number of columns so that the two blocks weigh alike in the distance, and clustered
   by k-means (scikit-learn, seeded, ``k`` = the folds);
3. each cluster is one fold (:func:`cluster_patients`). A cluster smaller than
   ``max(2, n // (2k))`` patients (an outlier patient alone estimates nothing) receives,
   one at a time, the patient nearest its centre from a cluster above that size; then a
   fold whose training part (the other clusters) would lack a class gives up its patient
   of that class nearest to another cluster's centre, until every training part has
   every class. Each move is said in the notes.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from leukotree.data.discover import Sample
from leukotree.data.images import decode_many
from leukotree.errors import LeukotreeError

#: Side (pixels) at which each image is read for its colour statistics.
STAT_SIZE = 32
COLOUR_FEATURES = ("mean_L", "mean_a", "mean_b", "std_L", "std_a", "std_b")


@dataclass
class PatientStats:
    """One row of features per group (patient), in ``groups`` order."""

    groups: list[str]
    features: np.ndarray  # (n_groups, n_features)
    names: list[str]
    labels: list[set[str]]  # the labels of each group's images

    @property
    def blocks(self) -> list[int]:
        """Per feature: 0 for a colour statistic, 1 for a cell-mix fraction."""
        return [int(name.startswith("cells_")) for name in self.names]


def lab_statistics(pixels: np.ndarray) -> np.ndarray:
    """``(mean_L, mean_a, mean_b, std_L, std_a, std_b)`` of one ``(H, W, 3)`` uint8 RGB image
    in CIE L*a*b* (D65)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(pixels.astype(np.float64) / 255.0).reshape(-1, 3)
    return np.concatenate([lab.mean(0), lab.std(0)])


def patient_statistics(samples: Sequence[Sample], *, size: int = STAT_SIZE, workers: int = 2,
                       max_pixels: int | None = None) -> PatientStats:
    """Per group: the mean over its images of :func:`lab_statistics` (each image read at
    ``size`` pixels a side), then, when any image has a cell type, the share of the
    group's images of each cell type (``cells_<type>``, types sorted)."""
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    decoded = decode_many([s.path for s in samples], size, workers=workers, on_error="raise",
                          **kwargs)
    rows: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        rows[s.group].append(i)
    groups = sorted(rows)
    colour = np.array([np.mean([lab_statistics(decoded.pixels[i]) for i in rows[g]], axis=0)
                       for g in groups]).reshape(len(groups), len(COLOUR_FEATURES))
    types = sorted({s.cell_label for s in samples if s.cell_label is not None})
    mix = np.array([[Counter(samples[i].cell_label for i in rows[g])[t] / len(rows[g])
                     for t in types] for g in groups]).reshape(len(groups), len(types))
    labels = [{samples[i].label for i in rows[g]} for g in groups]
    return PatientStats(groups, np.hstack([colour, mix]),
                        [*COLOUR_FEATURES, *(f"cells_{t}" for t in types)], labels)


def standardise(features: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per column (population std); a constant column becomes 0."""
    x = np.asarray(features, dtype=np.float64)
    std = x.std(0)
    return np.where(std > 0, (x - x.mean(0)) / np.where(std > 0, std, 1.0), 0.0)


def weigh_blocks(z: np.ndarray, blocks: Sequence[int] | None) -> np.ndarray:
    """``z`` with each block's columns divided by ``sqrt(columns in the block)``."""
    if blocks is None:
        return z
    ids = np.asarray(blocks)
    sizes = {b: int((ids == b).sum()) for b in set(ids.tolist())}
    return z / np.sqrt(np.array([sizes[b] for b in ids.tolist()], dtype=float))


def cluster_patients(features: np.ndarray, labels: Sequence[set[str]], k: int, seed: int = 0,
                     blocks: Sequence[int] | None = None, names: Sequence[str] | None = None,
                     ) -> tuple[np.ndarray, list[str]]:
    """A cluster (fold) ``0..k-1`` per patient, and notes of the patients moved.

    k-means on the standardised features (``n_init`` 10, ``random_state`` ``seed``; with
    ``blocks``, a block id per column, each block weighed alike: :func:`weigh_blocks`);
    then a cluster below ``max(2, n // (2k))`` patients takes the patients nearest its
    centre from larger ones; then, while a cluster holds every patient of some class (its
    training part would lack the class), its patient of that class nearest to another
    cluster's centre moves there. ``names`` name the patients in the notes (else
    ``#<row>``).
    """
    from sklearn.cluster import KMeans

    n = len(labels)
    if not isinstance(k, int) or k < 2 or k > n:
        raise LeukotreeError(f"The 'folds' parameter must be an integer in 2..{n} (the number "
                             f"of patients) for leave-cluster-out CV; got {k!r}.")
    classes = Counter(c for group in labels for c in group)
    single = sorted(c for c, count in classes.items() if count < 2)
    if single:
        raise LeukotreeError(
            f"Leave-cluster-out CV needs at least two patients of every class, so that each "
            f"fold's training part has one; {', '.join(single)} has only one. Add patients "
            "or use --protocol kfold.")
    z = weigh_blocks(standardise(features), blocks)
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z)
    clusters = km.labels_.astype(np.int64)
    dist = ((z[:, None, :] - km.cluster_centers_[None, :, :]) ** 2).sum(-1)
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    notes = _fill_small(dist, clusters, min(max(2, n // (2 * k)), n // k), names)
    return clusters, notes + _rebalance(dist, clusters, labels, names)


def _fill_small(dist: np.ndarray, clusters: np.ndarray, least: int, names: list[str],
                ) -> list[str]:
    """Move patients (in place) into clusters below ``least`` patients: each time the
    patient nearest the small cluster's centre among clusters above ``least``."""
    notes: list[str] = []
    k = dist.shape[1]
    while True:
        sizes = np.bincount(clusters, minlength=k)
        small = [c for c in range(k) if sizes[c] < least]
        if not small:
            return notes
        c = small[0]
        donors = np.flatnonzero(sizes[clusters] > least)
        i = int(donors[np.argmin(dist[donors, c])])
        notes.append(f"cluster {c} had {sizes[c]} patient(s), fewer than {least}: "
                     f"{names[i]} moved into it from cluster {clusters[i]} (the nearest)")
        clusters[i] = c


def _rebalance(dist: np.ndarray, clusters: np.ndarray, labels: Sequence[set[str]],
               names: list[str]) -> list[str]:
    """Move patients (in place) until no cluster holds all patients of a class
    (``dist``: squared distance of each patient to each cluster centre)."""
    notes: list[str] = []
    classes = sorted({c for group in labels for c in group})
    k = dist.shape[1]
    for _ in range(len(labels)):
        trapped = [(c, cls) for c in range(k) for cls in classes
                   if all(clusters[i] == c for i, g in enumerate(labels) if cls in g)]
        if not trapped:
            return notes
        c, cls = trapped[0]
        members = [i for i, g in enumerate(labels) if cls in g]
        other = dist[np.ix_(members, [j for j in range(k) if j != c])]
        row, col = np.unravel_index(int(np.argmin(other)), other.shape)
        target = [j for j in range(k) if j != c][int(col)]
        clusters[members[int(row)]] = target
        notes.append(f"cluster {c} held every patient of class '{cls}': {names[members[row]]} "
                     f"moved to cluster {target} (the nearest other centre)")
    raise RuntimeError("internal error: the clusters could not be rebalanced")


def cluster_folds(samples: Sequence[Sample], k: int, seed: int = 0, *, workers: int = 2,
                  ) -> tuple[dict[str, int], PatientStats, list[str]]:
    """The leave-cluster-out fold of every patient group of ``samples`` (see the module
    docstring), the statistics it was clustered on and notes."""
    if not any(s.patient for s in samples):
        raise LeukotreeError("Leave-cluster-out CV (--protocol cluster) clusters patients: give "
                             "patient ids (--patients or a manifest 'patient' column).")
    stats = patient_statistics(samples, workers=workers)
    clusters, notes = cluster_patients(stats.features, stats.labels, k, seed, stats.blocks,
                                       stats.groups)
    return dict(zip(stats.groups, clusters.tolist(), strict=True)), stats, notes
