"""Leave-cluster-out folds: statistics per patient, k-means, the class rebalance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukotree.data.cohorts import (
    COLOUR_FEATURES,
    cluster_folds,
    cluster_patients,
    lab_statistics,
    patient_statistics,
    standardise,
    weigh_blocks,
)
from leukotree.data.discover import Sample
from leukotree.data.splits import read_fold_groups, write_fold_groups
from leukotree.errors import LeukotreeError


def _flat(path: Path, rgb: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), rgb).save(path)
    return path


def test_lab_statistics_of_white_and_black_by_hand():
    white = lab_statistics(np.full((4, 4, 3), 255, np.uint8))
    black = lab_statistics(np.zeros((4, 4, 3), np.uint8))
    assert white == pytest.approx([100, 0, 0, 0, 0, 0], abs=0.01)  # D65 white
    assert black == pytest.approx([0, 0, 0, 0, 0, 0], abs=1e-3)
    half = np.zeros((2, 2, 3), np.uint8)
    half[0] = 255  # half the pixels white: L mean 50, std 50
    assert lab_statistics(half)[[0, 3]] == pytest.approx([50, 50], abs=1e-3)


def test_standardise_by_hand():
    z = standardise(np.array([[1.0, 5.0], [3.0, 5.0]]))
    assert z.tolist() == [[-1.0, 0.0], [1.0, 0.0]]  # the constant column becomes 0


def test_patient_statistics_average_images_and_count_cell_types(tmp_path):
    samples = [
        Sample(_flat(tmp_path / "a1.png", (255, 255, 255)), "APL", "a", cell_label="blast"),
        Sample(_flat(tmp_path / "a2.png", (0, 0, 0)), "APL", "a", cell_label="blast"),
        Sample(_flat(tmp_path / "a3.png", (255, 255, 255)), "APL", "a", cell_label="other"),
        Sample(_flat(tmp_path / "a4.png", (255, 255, 255)), "APL", "a", cell_label="other"),
        Sample(_flat(tmp_path / "b1.png", (0, 0, 0)), "AML", "b", cell_label="other"),
    ]
    stats = patient_statistics(samples, size=8, workers=1)
    assert stats.groups == ["patient:a", "patient:b"]
    assert stats.names == [*COLOUR_FEATURES, "cells_blast", "cells_other"]
    assert stats.labels == [{"APL"}, {"AML"}]
    # a: three white images (L 100) and one black (L 0) -> mean L 75; each image flat
    assert stats.features[0] == pytest.approx([75, 0, 0, 0, 0, 0, 0.5, 0.5], abs=0.01)
    assert stats.features[1] == pytest.approx([0, 0, 0, 0, 0, 0, 0.0, 1.0], abs=1e-3)


def test_two_obvious_clusters_need_no_move():
    features = np.array([[0, 0], [0, 1], [10, 10], [10, 11]], float)
    labels = [{"A"}, {"B"}, {"A"}, {"B"}]
    clusters, notes = cluster_patients(features, labels, 2, seed=0)
    assert clusters[0] == clusters[1] != clusters[2] == clusters[3]
    assert notes == []


def test_a_cluster_holding_a_whole_class_gives_up_its_nearest_patient():
    # x splits {p0, p1, p4} from {p2, p3, p5}: the first holds every A, the second every B
    features = np.array([[0, 0], [0, 1], [10, 10], [10, 11], [0, 2], [10, 12]], float)
    labels = [{"A"}, {"A"}, {"B"}, {"B"}, {"C"}, {"C"}]
    clusters, notes = cluster_patients(features, labels, 2, seed=0)
    low, high = clusters[0], clusters[3]
    assert low != high
    # p1 (y = 1) is the A nearest the high centre, p2 (y = 10) the B nearest the low one
    assert clusters.tolist() == [low, high, low, high, low, high]
    assert len(notes) == 2 and "#1 moved" in " ".join(notes) and "#2 moved" in " ".join(notes)
    for c in (low, high):  # every fold's training part has every class
        assert {x for i, g in enumerate(labels) if clusters[i] != c for x in g} == {"A", "B",
                                                                                     "C"}


def test_clustering_refuses_a_class_of_one_patient_and_bad_k():
    with pytest.raises(LeukotreeError, match="at least two patients of every class"):
        cluster_patients(np.zeros((3, 1)), [{"A"}, {"A"}, {"B"}], 2)
    with pytest.raises(LeukotreeError, match="'folds' parameter"):
        cluster_patients(np.zeros((3, 1)), [{"A"}, {"A"}, {"A"}], 4)


def test_cluster_folds_needs_patients(tmp_path):
    samples = [Sample(_flat(tmp_path / "x.png", (1, 2, 3)), "A")]
    with pytest.raises(LeukotreeError, match="patient ids"):
        cluster_folds(samples, 2)


def test_cluster_folds_by_colour_round_trip_through_the_fold_file(tmp_path):
    samples = []
    for p, (rgb, label) in enumerate([((250, 200, 200), "A"), ((240, 190, 190), "B"),
                                      ((60, 60, 200), "A"), ((70, 70, 210), "B")]):
        for c in range(2):
            samples.append(Sample(_flat(tmp_path / f"p{p}_{c}.png", rgb), label, f"p{p}"))
    fold_of, _, notes = cluster_folds(samples, 2, seed=0, workers=1)
    assert notes == []
    assert fold_of["patient:p0"] == fold_of["patient:p1"] != fold_of["patient:p2"]
    assert fold_of["patient:p2"] == fold_of["patient:p3"]
    path = tmp_path / "folds.csv"
    write_fold_groups(path, [{"group": g, "fold": f, "cluster": f} for g, f in fold_of.items()])
    groups = [s.group for s in samples]
    folds = read_fold_groups(path, groups, 2)
    assert folds.tolist() == [fold_of[g] for g in groups]


def test_read_fold_groups_refuses_what_does_not_fit(tmp_path):
    path = tmp_path / "f.csv"
    write_fold_groups(path, [{"group": "g1", "fold": 0}, {"group": "g2", "fold": 1}])
    with pytest.raises(LeukotreeError, match="no fold for 1 patient group"):
        read_fold_groups(path, ["g1", "g2", "g3"], 2)
    with pytest.raises(LeukotreeError, match=r"fold '1' is not in 0\.\.0"):
        read_fold_groups(path, ["g1", "g2"], 1)
    with pytest.raises(LeukotreeError, match="fold 2 holds no patient"):
        read_fold_groups(path, ["g1", "g2"], 3)
    with pytest.raises(LeukotreeError, match="does not exist"):
        read_fold_groups(tmp_path / "none.csv", ["g1"], 2)
    write_fold_groups(path, [{"repeat": 0, "group": "g1", "fold": 0},
                             {"repeat": 1, "group": "g1", "fold": 1},
                             {"repeat": 0, "group": "g2", "fold": 1},
                             {"repeat": 1, "group": "g2", "fold": 0}])
    assert read_fold_groups(path, ["g1", "g2"], 2, repeat=1).tolist() == [1, 0]


def test_blocks_weigh_alike_by_hand():
    z = np.ones((2, 5))
    weighed = weigh_blocks(z, [0, 1, 1, 1, 1])  # one colour column, four cell-mix columns
    assert weighed[0].tolist() == [1.0, 0.5, 0.5, 0.5, 0.5]
    assert weigh_blocks(z, None) is z


def test_an_outlier_alone_in_its_cluster_gets_the_nearest_patients():
    # k-means puts the patient at 100 alone; a cluster needs max(2, 7 // 6) = 2 patients:
    # the patient nearest its centre from a cluster above 2 (0.3, of {0 .. 0.3}) moves in
    features = np.array([[0.0], [0.1], [0.2], [0.3], [5.0], [5.1], [100.0]])
    labels = [{"A"}, {"B"}, {"A"}, {"B"}, {"A"}, {"B"}, {"A"}]
    clusters, notes = cluster_patients(features, labels, 3, seed=0)
    assert clusters[6] == clusters[3] and sorted(np.bincount(clusters).tolist()) == [2, 2, 3]
    assert len(set(clusters[[0, 1, 2]].tolist())) == 1 and clusters[4] == clusters[5]
    assert notes == [f"cluster {clusters[6]} had 1 patient(s), fewer than 2: #3 moved "
                     f"into it from cluster {clusters[0]} (the nearest)"]
