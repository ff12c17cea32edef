"""Synthetic cells: deterministic, laid out per label and patient, and learnable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_selection import f_classif
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from leukotree.data.discover import discover
from leukotree.data.images import load_rgb_array
from leukotree.data.synth import (
    LEUKEMIA7_PROFILES,
    Morphology,
    Stain,
    class_profiles,
    generate,
    render_cell,
)
from leukotree.errors import LeukotreeError
from leukotree.taxonomy import load_taxonomy


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_generate_is_deterministic_for_a_seed(tmp_path, leukemia7):
    kwargs = {"patients_per_class": 1, "cells_per_patient": 2, "size": 16, "progress": False}
    n_a = generate(tmp_path / "a", leukemia7, seed=3, **kwargs)
    n_b = generate(tmp_path / "b", leukemia7, seed=3, **kwargs)
    n_c = generate(tmp_path / "c", leukemia7, seed=4, **kwargs)
    assert n_a == n_b == n_c == 14
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 14
    assert a == b  # byte-identical
    assert set(a) == set(c)  # same names...
    assert all(a[name] != c[name] for name in a)  # ...other pixels


def test_generate_layout(synth_dir, leukemia7):
    for leaf in leukemia7.leaves:
        patients = sorted(p.name for p in (synth_dir / leaf).iterdir())
        assert patients == [f"{leaf}-p000", f"{leaf}-p001", f"{leaf}-p002"]
        for patient in patients:
            images = sorted(p.name for p in (synth_dir / leaf / patient).iterdir())
            assert images == [f"{patient}_{c:04d}.png" for c in range(4)]
    assert sorted(p.name for p in synth_dir.iterdir()) == sorted(leukemia7.leaves)
    some = next((synth_dir / "ALL" / "ALL-p000").iterdir())
    arr = load_rgb_array(some)
    assert arr.shape == (32, 32, 3)
    assert arr.std() > 5  # not a blank image


@pytest.mark.parametrize("fmt", ["jpg", "bmp"])
def test_generate_other_formats(tmp_path, leukemia7, fmt):
    n = generate(tmp_path, leukemia7, patients_per_class=1, cells_per_patient=1, size=16,
                 image_format=fmt, progress=False)
    files = sorted(tmp_path.rglob("*.*"))
    assert n == len(files) == 7
    assert {p.suffix for p in files} == {f".{fmt}"}
    assert load_rgb_array(files[0]).shape == (16, 16, 3)


def test_inner_fraction_labels_some_cells_at_the_parent(tmp_path, leukemia7):
    generate(tmp_path, leukemia7, patients_per_class=2, cells_per_patient=6, size=16,
             inner_fraction=0.5, seed=0, progress=False)
    folders = {p.name for p in tmp_path.iterdir()}
    inner = folders - set(leukemia7.leaves)
    assert inner  # some inner-node labels exist
    # only parents of leaves other than the root can appear
    assert inner <= {"Acute", "Chronic"}
    found = discover(tmp_path, leukemia7)
    assert found.problems == []
    for s in found.samples:
        leaf = s.patient.rsplit("-p", 1)[0]  # the patient folder names the true leaf
        assert s.label in (leaf, leukemia7.parent(leaf))
    # about half of the 60 acute/chronic cells move up (binomial mean 30, sd 3.9)
    moved = sum(s.label in {"Acute", "Chronic"} for s in found.samples)
    assert 15 <= moved <= 45


def test_inner_fraction_one_moves_every_cell_with_a_parent(tmp_path, leukemia7):
    generate(tmp_path, leukemia7, patients_per_class=1, cells_per_patient=2, size=16,
             inner_fraction=1.0, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"Normal", "Reactive", "Acute", "Chronic"}


def test_generate_custom_taxonomy(tmp_path):
    pbc = load_taxonomy("pbc")
    n = generate(tmp_path, pbc, patients_per_class=1, cells_per_patient=2, size=16,
                 progress=False)
    assert n == 16
    assert {p.name for p in tmp_path.iterdir()} == set(pbc.leaves)
    found = discover(tmp_path, pbc)
    assert found.problems == [] and found.patient_source == "folder"


def test_class_profiles_cover_every_node():
    leukemia7 = load_taxonomy("leukemia7")
    profiles = class_profiles(leukemia7)
    assert set(profiles) == {leukemia7.root, *leukemia7.nodes}
    for leaf in leukemia7.leaves:
        assert profiles[leaf] == LEUKEMIA7_PROFILES[leaf]
    pbc = load_taxonomy("pbc")
    derived = class_profiles(pbc, seed=0)
    assert derived == class_profiles(pbc, seed=0)
    assert derived["neutrophil"] != derived["lymphocyte"]
    for morph in derived.values():
        assert 1 <= morph.lobes <= 4
        assert 0 <= morph.nc_ratio <= 1


def test_render_cell_shape_and_range():
    rng = np.random.default_rng(0)
    img = render_cell(Morphology(), Stain.random(rng), 24, rng)
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"patients_per_class": 0}, "patients_per_class"),
        ({"cells_per_patient": 1.5}, "cells_per_patient"),
        ({"size": 8}, "size"),
        ({"inner_fraction": 1.5}, "inner_fraction"),
        ({"image_format": "gif"}, "image_format"),
    ],
)
def test_generate_parameter_errors(tmp_path, leukemia7, kwargs, name):
    with pytest.raises(LeukotreeError, match=f"'{name}'"):
        generate(tmp_path, leukemia7, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    """8x8 colour thumbnails of 7 classes x 6 patients x 10 cells, 32 px."""
    root = tmp_path_factory.mktemp("learnable")
    tax = load_taxonomy("leukemia7")
    generate(root, tax, patients_per_class=6, cells_per_patient=10, size=32, seed=0,
             progress=False)
    x, y, groups = [], [], []
    for path in sorted(root.rglob("*.png")):
        arr = load_rgb_array(path).astype(np.float32) / 255
        x.append(arr.reshape(8, 4, 8, 4, 3).mean(axis=(1, 3)).ravel())
        y.append(path.parent.parent.name)
        groups.append(path.parent.name)
    return np.array(x), np.array(y), np.array(groups)


def test_classes_differ_in_mean_colour(learnable):
    x, y, _ = learnable
    mean_rgb = x.reshape(len(x), 64, 3).mean(axis=1)
    _, p_values = f_classif(mean_rgb, y)
    assert p_values.min() < 1e-6  # class means differ far beyond chance
    brightness = mean_rgb.mean(axis=1)
    per_class = [brightness[y == c].mean() for c in np.unique(y)]
    assert max(per_class) - min(per_class) > 0.02


def test_classes_are_learnable_across_patients(learnable):
    x, y, groups = learnable
    assert len(np.unique(y)) == 7 and len(np.unique(groups)) == 42
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    # patients 0-3 to train, patients 4-5 (never seen) to test
    patient_number = np.array([int(g[-3:]) for g in groups])
    train = patient_number < 4
    held_out = clf.fit(x[train], y[train]).score(x[~train], y[~train])
    assert held_out > 0.3  # chance is 1/7 = 0.14
    grouped_cv = cross_val_score(clf, x, y, groups=groups, cv=GroupKFold(3)).mean()
    assert grouped_cv > 0.3
