"""Leakage tests: patient groups never straddle folds or split parts.

The centre piece, ``test_grouped_folds_remove_the_patient_leak``, follows
scikit-learn's ``test_kfold_can_detect_dependent_samples_on_digits``: when images of
one patient are more alike than images of one class, a per-image split scores far
above chance on labels that carry no signal, while patient-grouped folds do not.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import PredefinedSplit, StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from leukotree.data.check import ImageInfo
from leukotree.data.discover import Sample
from leukotree.data.splits import (
    FilterSettings,
    apply_filters,
    assign_folds,
    fold_table,
    plan_split,
    train_val_test_split,
)
from leukotree.errors import DataError, LeukotreeError


def _groups_in_two_parts(parts, groups) -> set[str]:
    seen: dict[str, set[object]] = {}
    for part, group in zip(list(parts), list(groups), strict=True):
        seen.setdefault(group, set()).add(part)
    return {g for g, p in seen.items() if len(p) > 1}


def _patients(seed: int, n_patients: int = 25, mixed: float = 0.2):
    """Labels and groups of patients with 1-12 images, a few with two labels."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for p in range(n_patients):
        main = str(rng.choice(["ALL", "AML", "CLL"], p=[0.5, 0.3, 0.2]))
        for _ in range(int(rng.integers(1, 13))):
            lab = "Normal" if rng.uniform() < mixed / 4 else main
            labels.append(lab)
            groups.append(f"patient:{p:03d}")
    return labels, groups


# ------------------------------------------------------------------ (a) fold properties
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("n_splits", [2, 3, 5, 8])
def test_assign_folds_keeps_groups_whole(seed, n_splits):
    labels, groups = _patients(seed)
    folds, notes = assign_folds(labels, groups, n_splits=n_splits, seed=seed)
    assert folds.shape == (len(labels),)
    assert folds.dtype == np.int64
    assert folds.min() >= 0 and folds.max() <= n_splits - 1
    assert _groups_in_two_parts(folds, groups) == set()
    assert set(folds.tolist()) == set(range(n_splits))  # no empty fold
    assert all(isinstance(n, str) for n in notes)


@pytest.mark.parametrize("seed", range(10))
def test_assign_folds_on_one_image_per_patient(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["a", "b"], size=40).tolist()
    groups = [f"p{i}" for i in range(40)]
    folds, _ = assign_folds(labels, groups, n_splits=4, seed=seed)
    assert set(folds.tolist()) == {0, 1, 2, 3}
    assert sorted(Counter(folds.tolist()).values()) == [10, 10, 10, 10]


def test_assign_folds_is_deterministic_for_a_seed():
    labels, groups = _patients(0, n_patients=40)
    a, _ = assign_folds(labels, groups, 5, seed=11)
    b, _ = assign_folds(labels, groups, 5, seed=11)
    np.testing.assert_array_equal(a, b)
    others = [assign_folds(labels, groups, 5, seed=s)[0] for s in range(3)]
    assert any(not np.array_equal(a, o) for o in others)


def test_assign_folds_notes_classes_with_few_groups():
    labels = ["ALL"] * 6 + ["CML"] * 4
    groups = ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4", "p4", "p4"]
    folds, notes = assign_folds(labels, groups, n_splits=3, seed=0)
    assert _groups_in_two_parts(folds, groups) == set()
    assert any("class 'CML' has only 1 patient group(s) for 3 folds" in n for n in notes)


def test_assign_folds_every_fold_gets_a_group_when_folds_equal_groups():
    # Regression (fixed): splits.py assign_folds (lines 56-61) trusts StratifiedGroupKFold to
    # fill every fold, and _check_n_splits allows folds == number of groups ("a fold
    # needs at least one group"). With these 4 patients and 4 folds, whatever the
    # seed, fold 2 gets no image (patients g0 and g1 both land in fold 3), so a
    # `data split --folds 4` CSV has an empty validation fold.
    labels = ["b"] * 2 + ["c"] * 8 + ["c"] * 5 + ["b"]
    groups = ["g0"] * 2 + ["g1"] * 8 + ["g2"] * 5 + ["g3"]
    folds, _ = assign_folds(labels, groups, n_splits=4, seed=0)
    assert _groups_in_two_parts(folds, groups) == set()
    assert set(folds.tolist()) == {0, 1, 2, 3}


def test_assign_folds_with_few_images_per_class_raises_a_leukotree_error():
    # Regression (fixed): splits.py assign_folds: when every class has fewer images than
    # n_splits (here 3 + 3 images, 6 patients, 5 folds; valid by _check_n_splits),
    # scikit-learn's StratifiedGroupKFold raises a bare ValueError("n_splits=5 cannot
    # be greater than the number of members in each class."). It is not a
    # LeukotreeError, so `leukotree data split` dies with a traceback.
    labels = ["ALL"] * 3 + ["CLL"] * 3
    groups = [f"p{i}" for i in range(6)]
    try:
        folds, _ = assign_folds(labels, groups, n_splits=5, seed=0)
    except LeukotreeError as err:  # a clear error is fine...
        assert "folds" in str(err)
    else:  # ...and so is a valid assignment
        assert set(folds.tolist()) == set(range(5))


# ------------------------------------------------------------------ (b) the leak itself
def _patient_dependent_data(seed: int, n_patients: int = 200, per_patient: int = 4):
    """Features = strong patient offset + noise; one random label per patient.

    The label is independent of the features except through patient identity, so
    any accuracy above chance on unseen patients is impossible.
    """
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0, 5, (n_patients, 8))
    patient_label = rng.permutation(np.repeat(["ALL", "CLL"], n_patients // 2))
    pid = np.repeat(np.arange(n_patients), per_patient)
    x = offsets[pid] + rng.normal(0, 1, (len(pid), 8))
    y = patient_label[pid]
    groups = np.array([f"patient:{p}" for p in pid])
    return x, y, groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_remove_the_patient_leak(seed):
    x, y, groups = _patient_dependent_data(seed)
    knn = KNeighborsClassifier(n_neighbors=1)

    naive_cv = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    naive = cross_val_score(knn, x, y, cv=naive_cv).mean()
    # the per-image split puts cells of one patient on both sides...
    train, test = next(naive_cv.split(x, y))
    assert set(groups[train]) & set(groups[test])
    # ...and the nearest neighbour is a sibling cell: the score is a leak
    assert naive > 0.9

    folds, _ = assign_folds(y, groups, n_splits=5, seed=seed)
    for k in range(5):
        assert not set(groups[folds == k]) & set(groups[folds != k])
    grouped = cross_val_score(knn, x, y, cv=PredefinedSplit(folds)).mean()
    assert grouped < 0.6  # chance is 0.5: no leak left
    assert grouped > 0.35
    assert naive - grouped > 0.3


# ------------------------------------------------------------------ (c) train/val/test
@pytest.mark.parametrize("seed", [0, 1])
def test_train_val_test_split_keeps_groups_whole(seed):
    labels, groups = _patients(seed, n_patients=120)
    parts = train_val_test_split(labels, groups, val_fraction=0.2, test_fraction=0.2,
                                 seed=seed)
    assert set(parts.tolist()) == {"train", "val", "test"}
    assert _groups_in_two_parts(parts, groups) == set()
    n = len(labels)
    share = Counter(parts.tolist())
    assert share["test"] / n == pytest.approx(0.2, abs=0.06)
    assert share["val"] / n == pytest.approx(0.2, abs=0.06)
    assert share["train"] / n == pytest.approx(0.6, abs=0.08)
    group_parts = {g: p for g, p in zip(groups, parts.tolist(), strict=True)}
    group_share = Counter(group_parts.values())
    assert group_share["test"] / 120 == pytest.approx(0.2, abs=0.06)
    # stratified: every main class reaches every part
    for part in ("train", "val", "test"):
        assert {"ALL", "AML", "CLL"} <= {lab for lab, p in zip(labels, parts, strict=True)
                                         if p == part}


def test_train_val_test_split_zero_fraction_skips_the_part():
    labels, groups = _patients(3, n_patients=40)
    parts = train_val_test_split(labels, groups, val_fraction=0.0, test_fraction=0.25)
    assert set(parts.tolist()) == {"train", "test"}
    assert _groups_in_two_parts(parts, groups) == set()
    only_train = train_val_test_split(labels, groups, 0.0, 0.0)
    assert set(only_train.tolist()) == {"train"}


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.1), (0.1, -0.1), (0.1, 0.7)])
def test_train_val_test_split_fraction_errors(val, test):
    labels, groups = _patients(0)
    with pytest.raises(LeukotreeError, match="_fraction' parameter must be in"):
        train_val_test_split(labels, groups, val, test)


def test_train_val_test_split_too_small_fraction_names_the_fraction():
    # Regression (fixed): splits.py train_val_test_split (lines 109-110) turns test_fraction
    # 0.04 into k = 25 folds; with 20 patients assign_folds fails with "The 'folds'
    # parameter (25) exceeds the number of patient groups (20) ... Use --folds 20 or
    # fewer." The user gave no folds (e.g. `data split --folds 0 --test 0.04`); the
    # message should name the test fraction and the smallest usable value.
    labels = ["ALL"] * 10 + ["CLL"] * 10
    groups = [f"p{i}" for i in range(20)]
    with pytest.raises(LeukotreeError) as excinfo:
        train_val_test_split(labels, groups, val_fraction=0.0, test_fraction=0.04)
    assert "test" in str(excinfo.value)
    assert "--folds" not in str(excinfo.value)


# ------------------------------------------------------------------ (d) filters
def _info(path: str, sha: str = "", phash: int = 0, size: int = 100,
          error: str | None = None) -> ImageInfo:
    if error:
        return ImageInfo(Path(path), error=error)
    return ImageInfo(Path(path), None, size, size, sha or f"sha-{path}", phash)


def _filter_case():
    samples = [
        Sample(Path("0.png"), "ALL", "P1"),
        Sample(Path("1.png"), "ALL", "P1"),
        Sample(Path("2.png"), "ALL", "P1"),  # same bytes as 0
        Sample(Path("3.png"), "AML", "P2"),  # too small
        Sample(Path("4.png"), "AML", "P2"),
        Sample(Path("5.png"), "CML", "P3"),  # P3's only image
        Sample(Path("6.png"), "AML", "P2"),  # unreadable
        Sample(Path("7.png"), "ALL", "P1"),  # near duplicate of 1
    ]
    infos = [
        _info("0.png", sha="same", phash=0b0000),
        _info("1.png", phash=0b1111_0000),
        _info("2.png", sha="same", phash=0b0000),
        _info("3.png", phash=2**40, size=10),
        _info("4.png", phash=2**50),
        _info("5.png", phash=2**60),
        _info("6.png", error="the file is truncated"),
        _info("7.png", phash=0b1111_0001),
    ]
    return samples, infos


def test_apply_filters_exact_duplicates_min_size_and_patients():
    samples, infos = _filter_case()
    settings = FilterSettings(min_images_per_patient=2, drop_duplicates="exact", min_size=16)
    assert settings.needs_images
    result = apply_filters(samples, settings, infos)
    assert result.keep == [0, 1, 7]  # the first image of the duplicate pair is kept
    reasons = dict(result.dropped)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert reasons[2] == "duplicate: same image as 0.png"
    assert reasons[3] == "min_size: 10x10 < 16"
    assert reasons[4] == "min_images_per_patient: patient P2 has 1 < 2"
    assert reasons[5] == "min_images_per_patient: patient P3 has 1 < 2"
    assert reasons[6] == "unreadable: the file is truncated"
    assert result.summary() == {"duplicate": 1, "min_size": 1, "min_images_per_patient": 2,
                                "unreadable": 1}
    # kept and dropped partition the input
    assert sorted(result.keep + [i for i, _ in result.dropped]) == list(range(len(samples)))


def test_apply_filters_near_duplicates():
    samples, infos = _filter_case()
    exact = apply_filters(samples, FilterSettings(drop_duplicates="exact"), infos)
    assert 7 in exact.keep
    near = apply_filters(samples, FilterSettings(drop_duplicates="near",
                                                 near_duplicate_distance=1), infos)
    reasons = dict(near.dropped)
    assert reasons[7] == "duplicate: same image as 1.png"  # distance 1
    assert reasons[2] == "duplicate: same image as 0.png"
    assert 1 in near.keep and 0 in near.keep
    strict = apply_filters(samples, FilterSettings(drop_duplicates="near",
                                                   near_duplicate_distance=0), infos)
    assert 7 in strict.keep


def test_apply_filters_nothing_to_do():
    samples, _ = _filter_case()
    result = apply_filters(samples, FilterSettings())
    assert result.keep == list(range(len(samples)))
    assert result.dropped == [] and result.summary() == {}


def test_apply_filters_min_images_needs_patient_ids():
    samples = [Sample(Path(f"{i}.png"), "ALL") for i in range(3)]
    with pytest.raises(DataError, match="needs patient ids"):
        apply_filters(samples, FilterSettings(min_images_per_patient=2))


def test_apply_filters_parameter_errors():
    samples, infos = _filter_case()
    with pytest.raises(LeukotreeError, match="drop_duplicates"):
        apply_filters(samples, FilterSettings(drop_duplicates="fuzzy"), infos)
    with pytest.raises(LeukotreeError, match="one ImageInfo per sample"):
        apply_filters(samples, FilterSettings(min_size=10))
    with pytest.raises(LeukotreeError, match="one ImageInfo per sample"):
        apply_filters(samples, FilterSettings(drop_duplicates="exact"), infos[:3])


# ------------------------------------------------------------------ (e) parameter errors
@pytest.mark.parametrize("bad", [1, 0, -2, True, 2.0, "3"])
def test_folds_must_be_an_integer_of_at_least_2(bad):
    labels, groups = _patients(0)
    with pytest.raises(LeukotreeError) as excinfo:
        assign_folds(labels, groups, n_splits=bad)
    assert "'folds'" in str(excinfo.value)


def test_more_folds_than_groups():
    labels = ["ALL", "ALL", "CLL", "CLL"]
    groups = ["p1", "p1", "p2", "p3"]
    with pytest.raises(LeukotreeError) as excinfo:
        assign_folds(labels, groups, n_splits=4)
    text = str(excinfo.value)
    assert "'folds' parameter (4) exceeds the number of patient groups (3)" in text
    assert "--folds 3" in text


def test_labels_and_groups_must_match():
    with pytest.raises(LeukotreeError, match="3 labels but 2 groups"):
        assign_folds(["a", "b", "a"], ["p1", "p2"], 2)


def test_plan_split_parameter_errors():
    samples = [Sample(Path(f"{i}.png"), "ALL" if i % 2 else "CLL", f"p{i}") for i in range(10)]
    with pytest.raises(LeukotreeError, match="'folds'"):
        plan_split(samples, folds=1)
    with pytest.raises(LeukotreeError, match="--val"):
        plan_split(samples, folds=0)
    with pytest.raises(LeukotreeError, match="--val applies to a single split"):
        plan_split(samples, folds=3, val_fraction=0.2)


def test_plan_split_nothing_left_after_filtering():
    samples = [Sample(Path(f"{i}.png"), "ALL", f"p{i}") for i in range(4)]
    with pytest.raises(DataError, match="No images are left"):
        plan_split(samples, folds=2, filters=FilterSettings(min_images_per_patient=2))


# ------------------------------------------------------------------ (f) plan_split
def _samples(seed: int, n_patients: int = 40) -> list[Sample]:
    labels, groups = _patients(seed, n_patients=n_patients)
    return [Sample(Path(f"img{i}.png"), lab, grp.split(":")[1])
            for i, (lab, grp) in enumerate(zip(labels, groups, strict=True))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_split_with_held_out_test(seed):
    samples = _samples(seed)
    plan = plan_split(samples, folds=3, test_fraction=0.2, seed=seed)
    assert plan.parts is None
    folds = plan.folds
    groups = np.array([s.group for s in plan.samples])
    test_groups = set(groups[folds == -1])
    fold_groups = set(groups[folds >= 0])
    assert test_groups, "a test part is held out"
    assert not test_groups & fold_groups
    assert set(folds[folds >= 0].tolist()) == {0, 1, 2}
    assert _groups_in_two_parts(folds, groups) == set()
    assert 0.1 < np.mean(folds == -1) < 0.3
    table = plan.table()
    assert set(table) == {"fold 0", "fold 1", "fold 2", "test"}
    assert sum(row["images"] for row in table.values()) == len(samples)


def test_plan_split_single_split_and_csv(tmp_path):
    samples = _samples(5)
    plan = plan_split(samples, folds=0, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert plan.folds is None
    assert set(plan.parts.tolist()) == {"train", "val", "test"}
    assert _groups_in_two_parts(plan.parts, [s.group for s in plan.samples]) == set()
    out = tmp_path / "split.csv"
    assert plan.write(out) is None  # nothing dropped: no dropped.csv
    lines = out.read_text().splitlines()
    assert lines[0] == "path,label,patient,slide,group,split"
    assert len(lines) == len(samples) + 1


def test_plan_split_writes_dropped_csv(tmp_path):
    samples = _samples(6)
    samples.append(Sample(Path("lonely.png"), "CML", "lonely"))
    plan = plan_split(samples, folds=3, filters=FilterSettings(min_images_per_patient=2))
    assert all(s.patient != "lonely" for s in plan.samples)
    out = tmp_path / "folds.csv"
    dropped = plan.write(out)
    assert dropped == tmp_path / "folds.dropped.csv"
    rows = dropped.read_text().splitlines()
    assert rows[0] == "path,label,patient,reason"
    assert any(r.startswith("lonely.png,CML,lonely,min_images_per_patient") for r in rows)
    header = out.read_text().splitlines()[0]
    assert header == "path,label,patient,slide,group,fold"


def test_fold_table_counts():
    table = fold_table(["a", "a", "b", "b"], ["p1", "p1", "p2", "p3"], [0, 0, 1, 1])
    assert table == {"0": {"images": 2, "groups": 1, "a": 2},
                     "1": {"images": 2, "groups": 2, "b": 2}}
