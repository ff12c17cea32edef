"""Patient-grouped, stratified splits and the seed paper's data filters.

Every split here is built on scikit-learn's :class:`~sklearn.model_selection.StratifiedGroupKFold`:
all images of a group (patient, else slide, else the image itself) land in the same
fold, and class proportions are kept as close as the groups allow.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from leukotree.data.check import ImageInfo, hamming_pairs
from leukotree.data.discover import Sample
from leukotree.errors import DataError, LeukotreeError

SPLIT_NAMES = ("train", "val", "test")


def _check_n_splits(n_splits: object, n_groups: int, name: str = "folds") -> int:
    if not isinstance(n_splits, int | np.integer) or isinstance(n_splits, bool) or n_splits < 2:
        raise LeukotreeError(
            f"The '{name}' parameter must be an integer of at least 2; got {n_splits!r}."
        )
    if n_splits > n_groups:
        raise LeukotreeError(
            f"The '{name}' parameter ({n_splits}) exceeds the number of patient groups "
            f"({n_groups}); a fold needs at least one group. Use --{name} {max(2, n_groups)} "
            "or fewer."
        )
    return int(n_splits)


def assign_folds(
    labels: Sequence[str], groups: Sequence[str], n_splits: int = 5, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Fold number (``0 .. n_splits-1``) of each image, and notes worth showing.

    Groups never straddle folds. Stratification is on the label as given (a leaf or
    an inner node).
    """
    labels_arr = np.asarray(labels)
    groups_arr = np.asarray(groups)
    n = len(labels_arr)
    if n != len(groups_arr):
        raise LeukotreeError(f"{n} labels but {len(groups_arr)} groups; they must match.")
    n_splits = _check_n_splits(n_splits, len(set(groups_arr.tolist())))
    notes: list[str] = []
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    folds = np.full(n, -1, dtype=np.int64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            for k, (_, test) in enumerate(splitter.split(np.zeros(n), labels_arr, groups_arr)):
                folds[test] = k
        except ValueError as err:
            raise LeukotreeError(
                f"Cannot make {n_splits} stratified folds: {err} Use fewer --folds (each "
                "class needs at least as many images as there are folds)."
            ) from None
    notes.extend(str(w.message) for w in caught)
    _fill_empty_folds(folds, groups_arr, n_splits, notes)
    groups_per_label: dict[str, set[str]] = defaultdict(set)
    for lab, grp in zip(labels_arr.tolist(), groups_arr.tolist(), strict=True):
        groups_per_label[lab].add(grp)
    for lab, grps in sorted(groups_per_label.items()):
        if len(grps) < n_splits:
            notes.append(
                f"class '{lab}' has only {len(grps)} patient group(s) for {n_splits} folds: "
                "some validation folds will not contain it"
            )
    _verify_disjoint(folds, groups_arr)
    return folds, notes


def _fill_empty_folds(folds: np.ndarray, groups: np.ndarray, n_splits: int,
                      notes: list[str]) -> None:
    """Move whole groups into folds the greedy splitter left empty (in place).

    The donor is the fold with the most groups; its smallest group moves.
    """
    for empty in range(n_splits):
        if (folds == empty).any():
            continue
        members = {k: sorted(set(groups[folds == k].tolist())) for k in range(n_splits)}
        donor = max(members, key=lambda k: len(members[k]))
        if len(members[donor]) < 2:
            raise LeukotreeError(f"Cannot fill {n_splits} folds with whole patient groups; "
                                 "use fewer --folds.")
        smallest = min(members[donor], key=lambda g: (int((groups == g).sum()), g))
        folds[groups == smallest] = empty
        notes.append(f"fold {empty} was empty after stratification; group {smallest} moved "
                     f"into it from fold {donor}")


def _verify_disjoint(assignment: np.ndarray, groups: np.ndarray) -> None:
    seen: dict[str, object] = {}
    for part, grp in zip(assignment.tolist(), groups.tolist(), strict=True):
        if seen.setdefault(grp, part) != part:
            raise RuntimeError(f"internal error: group {grp} assigned to two parts")


def train_val_test_split(
    labels: Sequence[str],
    groups: Sequence[str],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> np.ndarray:
    """``'train'``, ``'val'`` or ``'test'`` per image, grouped and stratified.

    The test part is one fold of ``round(1 / test_fraction)`` stratified group folds;
    the validation part is carved from the rest the same way, so the fractions are
    met as closely as whole groups allow. A fraction of 0 skips that part.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 0.5:
            raise LeukotreeError(
                f"The '{name}' parameter must be in [0, 0.5); got {value!r}."
            )
    labels_arr = np.asarray(labels)
    groups_arr = np.asarray(groups)
    out = np.array(["train"] * len(labels_arr), dtype=object)
    remaining = np.arange(len(labels_arr))
    for name, frac in (("test", test_fraction), ("val", val_fraction)):
        if frac == 0:
            continue
        share = frac if name == "test" else frac / (1 - test_fraction)
        k = max(2, round(1 / share))
        n_groups = len(set(groups_arr[remaining].tolist()))
        if k > n_groups:
            fix = (f"Use at least {1 / n_groups:.3f}" if 1 / n_groups < 0.5 else
                   f"There are too few groups for a separate {name} part: add patients, or "
                   "give separate validation data (--val DATA)")
            raise LeukotreeError(
                f"The '{name}_fraction' parameter ({frac}) is too small for {n_groups} patient "
                f"groups: one group is already 1/{n_groups} of them. {fix}, or 0 to skip the "
                f"{name} part.")
        folds, _ = assign_folds(labels_arr[remaining], groups_arr[remaining], k, seed)
        chosen = remaining[folds == 0]
        out[chosen] = name
        remaining = remaining[folds != 0]
    _verify_disjoint(out, groups_arr)
    return out.astype(str)


@dataclass(frozen=True)
class FilterSettings:
    """The seed paper's optional filters; each dropped image is reported with its reason."""

    min_images_per_patient: int = 0
    drop_duplicates: str = "none"  # none | exact | near
    near_duplicate_distance: int = 4
    min_size: int = 0

    @property
    def needs_images(self) -> bool:
        return self.drop_duplicates != "none" or self.min_size > 0


@dataclass
class FilterResult:
    keep: list[int]
    dropped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return dict(Counter(reason.split(":", 1)[0] for _, reason in self.dropped))


def apply_filters(
    samples: Sequence[Sample],
    settings: FilterSettings,
    infos: Sequence[ImageInfo] | None = None,
) -> FilterResult:
    """Indices to keep, and ``(index, reason)`` for every image dropped.

    Order: unreadable images, then minimum resolution, then duplicates (the first
    image of each duplicate cluster is kept), then patients with too few images.
    """
    if settings.drop_duplicates not in {"none", "exact", "near"}:
        raise LeukotreeError(
            f"The 'drop_duplicates' parameter must be none, exact or near; got "
            f"{settings.drop_duplicates!r}."
        )
    if settings.needs_images and (infos is None or len(infos) != len(samples)):
        raise LeukotreeError("apply_filters needs one ImageInfo per sample for these filters.")
    dropped: list[tuple[int, str]] = []
    alive = list(range(len(samples)))

    if infos is not None:
        bad = {i for i in alive if not infos[i].ok}
        dropped += [(i, f"unreadable: {infos[i].error}") for i in sorted(bad)]
        alive = [i for i in alive if i not in bad]
    if settings.min_size > 0 and infos is not None:
        small = {i for i in alive if min(infos[i].width, infos[i].height) < settings.min_size}
        dropped += [(i, f"min_size: {infos[i].width}x{infos[i].height} < {settings.min_size}")
                    for i in sorted(small)]
        alive = [i for i in alive if i not in small]
    if settings.drop_duplicates != "none" and infos is not None:
        parent = {i: i for i in alive}

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        by_digest: dict[str, int] = {}
        for i in alive:
            first = by_digest.setdefault(infos[i].sha256, i)
            parent[find(i)] = find(first)
        if settings.drop_duplicates == "near":
            for a, b, _ in hamming_pairs([infos[i].phash for i in alive],
                                         settings.near_duplicate_distance):
                ra, rb = find(alive[a]), find(alive[b])
                parent[max(ra, rb)] = min(ra, rb)
        dups = {i for i in alive if find(i) != i}
        dropped += [(i, f"duplicate: same image as {samples[find(i)].path}")
                    for i in sorted(dups)]
        alive = [i for i in alive if i not in dups]
    if settings.min_images_per_patient > 1:
        if not any(samples[i].patient for i in alive):
            raise DataError(
                f"--min-images-per-patient {settings.min_images_per_patient} needs patient ids, "
                "but none were found; every image would be dropped. Give patient ids "
                "(--patients) or leave the filter out."
            )
        counts = Counter(samples[i].patient for i in alive if samples[i].patient)
        few = {i for i in alive if samples[i].patient is None
               or counts[samples[i].patient] < settings.min_images_per_patient}
        dropped += [
            (i, f"min_images_per_patient: patient {samples[i].patient} has "
                f"{counts.get(samples[i].patient, 0)} < {settings.min_images_per_patient}")
            for i in sorted(few)
        ]
        alive = [i for i in alive if i not in few]
    return FilterResult(alive, sorted(dropped))


def fold_table(labels: Sequence[str], groups: Sequence[str], parts: Sequence[object],
               ) -> dict[str, dict[str, int]]:
    """Per part: number of images, groups and images of each label."""
    table: dict[str, dict[str, int]] = {}
    for part in sorted({str(p) for p in parts}):
        idx = [i for i, p in enumerate(parts) if str(p) == part]
        row = {"images": len(idx), "groups": len({groups[i] for i in idx})}
        row.update(sorted(Counter(labels[i] for i in idx).items()))
        table[part] = row
    return table


def write_split_csv(
    path: Path,
    samples: Sequence[Sample],
    folds: np.ndarray | None,
    parts: np.ndarray | None,
) -> None:
    """Write ``path,label,patient,slide,group`` (and ``cell_type`` when any image has one)
    plus ``fold`` and/or ``split`` columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = any(s.cell_label is not None for s in samples)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["path", "label", "patient", "slide", "group"]
        header += ["cell_type"] if cells else []
        header += ["fold"] if folds is not None else []
        header += ["split"] if parts is not None else []
        writer.writerow(header)
        for i, s in enumerate(samples):
            row: list[object] = [os.path.abspath(s.path), s.label, s.patient or "", s.slide or "",
                                 s.group]
            if cells:
                row.append(s.cell_label or "")
            if folds is not None:
                row.append(int(folds[i]))
            if parts is not None:
                row.append(str(parts[i]))
            writer.writerow(row)


def write_dropped_csv(path: Path, samples: Sequence[Sample], result: FilterResult) -> None:
    """One row per dropped image with the reason."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "reason"])
        for i, reason in result.dropped:
            writer.writerow([str(samples[i].path), samples[i].label, samples[i].patient or "",
                             reason])


@dataclass
class SplitPlan:
    """The outcome of :func:`plan_split`: who is kept, their folds and/or split parts."""

    samples: list[Sample]
    folds: np.ndarray | None
    parts: np.ndarray | None
    filtered: FilterResult
    all_samples: list[Sample]
    notes: list[str] = field(default_factory=list)

    def table(self) -> dict[str, dict[str, int]]:
        labels = [s.label for s in self.samples]
        groups = [s.group for s in self.samples]
        if self.folds is not None:
            names = [f"fold {f}" if f >= 0 else "test" for f in self.folds.tolist()]
        else:
            names = list(self.parts) if self.parts is not None else []
        return fold_table(labels, groups, names)

    def write(self, out: Path) -> Path | None:
        """Write the split CSV, and ``<out>.dropped.csv`` when filters dropped images."""
        write_split_csv(out, self.samples, self.folds, self.parts)
        if self.filtered.dropped:
            dropped = out.with_suffix(".dropped.csv")
            write_dropped_csv(dropped, self.all_samples, self.filtered)
            return dropped
        return None


def plan_split(
    samples: Sequence[Sample],
    *,
    folds: int = 5,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    filters: FilterSettings | None = None,
    infos: Sequence[ImageInfo] | None = None,
) -> SplitPlan:
    """Filter, then assign grouped stratified folds and/or a train/val/test split.

    - ``folds >= 2``: cross-validation folds; with ``test_fraction > 0`` a grouped
      test part is held out first (its fold is ``-1``).
    - ``folds == 0``: one grouped train/val/test split by the two fractions.
    """
    filters = filters or FilterSettings()
    result = apply_filters(samples, filters, infos)
    kept = [samples[i] for i in result.keep]
    if not kept:
        raise DataError("No images are left after filtering; relax the filters.")
    labels = [s.label for s in kept]
    groups = [s.group for s in kept]
    notes: list[str] = []
    fold_arr: np.ndarray | None = None
    parts: np.ndarray | None = None
    if folds == 0:
        if val_fraction == 0 and test_fraction == 0:
            raise LeukotreeError(
                "With --folds 0, give --val and/or --test fractions for a train/val/test split."
            )
        parts = train_val_test_split(labels, groups, val_fraction, test_fraction, seed)
    else:
        if val_fraction:
            raise LeukotreeError(
                "--val applies to a single split (--folds 0); with cross-validation every fold "
                "serves once as validation."
            )
        fold_arr = np.full(len(kept), -1, dtype=np.int64)
        rest = np.arange(len(kept))
        if test_fraction:
            parts = train_val_test_split(labels, groups, 0.0, test_fraction, seed)
            rest = np.flatnonzero(parts != "test")
            parts = None
        sub_folds, notes = assign_folds([labels[i] for i in rest], [groups[i] for i in rest],
                                        folds, seed)
        fold_arr[rest] = sub_folds
    return SplitPlan(kept, fold_arr, parts, result, list(samples), notes)


def write_fold_groups(path: Path, rows: Sequence[dict[str, object]]) -> None:
    """Write ``rows`` (each with at least ``group`` and ``fold``; the other keys, e.g.
    ``repeat``, ``cluster``, ``label``, ``images``, follow) as a CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, header)
        writer.writeheader()
        writer.writerows(rows)


def read_fold_groups(path: str | Path, groups: Sequence[str], n_splits: int,
                     repeat: int = 0) -> np.ndarray:
    """The fold of each image from a CSV of ``group,fold`` rows (of ``repeat`` when the
    file has a ``repeat`` column): every group of ``groups`` must be listed once, with a
    fold in ``0..n_splits-1``, and every fold must hold a group."""
    path = Path(path)
    if not path.is_file():
        raise LeukotreeError(f"--fold-groups '{path}' does not exist: give the folds.csv that "
                             "'leukotree cv' wrote, or leave --fold-groups out.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"group", "fold"} <= set(rows[0]):
        raise LeukotreeError(f"--fold-groups '{path}' must have 'group' and 'fold' columns; "
                             f"found {sorted(rows[0]) if rows else 'no rows'}.")
    fold_of: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):
        if row.get("repeat", "0") not in ("", str(repeat)):
            continue
        try:
            fold = int(row["fold"])
        except ValueError:
            fold = -1
        if not 0 <= fold < n_splits or row["group"] in fold_of:
            why = ("listed twice" if row["group"] in fold_of
                   else f"fold {row['fold']!r} is not in 0..{n_splits - 1}")
            raise LeukotreeError(f"--fold-groups '{path}' line {line}: group {row['group']!r} "
                                 f"{why}; each group needs one fold of --folds {n_splits}.")
        fold_of[row["group"]] = fold
    missing = sorted(set(groups) - set(fold_of))
    if missing:
        raise LeukotreeError(f"--fold-groups '{path}' lists no fold for {len(missing)} patient "
                             f"group(s) of the data (e.g. {missing[0]!r}); it was written for "
                             "other data. Run 'leukotree cv' on this data again.")
    folds = np.array([fold_of[g] for g in groups], dtype=np.int64)
    empty = sorted(set(range(n_splits)) - set(folds.tolist()))
    if empty:
        raise LeukotreeError(f"--fold-groups '{path}': fold {empty[0]} holds no patient of the "
                             f"data; give --folds {len(set(folds.tolist()))} or another file.")
    return folds
