"""``data check``: counts, unreadable files, duplicates, small images and patients."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import truncate_file, write_image
from leukotree.data.check import (
    check_dataset,
    hamming_pairs,
    inspect_image,
    problems_from_infos,
    scan_images,
)
from leukotree.data.discover import discover


@pytest.fixture
def messy_dir(tmp_path: Path) -> Path:
    """ALL/P1: 4 images; AML/P2: duplicate, near duplicate, small, truncated; CML/P3: 2."""
    root = tmp_path / "data"
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        write_image(root / "ALL" / "P1" / f"{name}.png", "png", size=(80, 80), seed=seed)
    p2 = root / "AML" / "P2"
    p2.mkdir(parents=True)
    shutil.copyfile(root / "ALL" / "P1" / "a.png", p2 / "dup.png")  # same bytes
    near = np.asarray(Image.open(root / "ALL" / "P1" / "b.png")).copy()
    near[40, 40] = 255 - near[40, 40]  # one pixel changed: other bytes, same look
    Image.fromarray(near).save(p2 / "near.png")
    write_image(p2 / "small.png", "png", size=(20, 20), seed=5)
    truncate_file(write_image(p2 / "broken.png", "png", size=(80, 80), seed=6), 0.5)
    write_image(root / "CML" / "P3" / "e.png", "png", size=(80, 80), seed=7)
    write_image(root / "CML" / "P3" / "f.png", "png", size=(80, 80), seed=8)
    return root


def test_check_dataset_on_a_messy_folder(messy_dir, leukemia7):
    found = discover(messy_dir, leukemia7)
    assert found.patient_source == "folder"
    report = check_dataset(found, min_size=64, min_images_per_patient=4,
                           near_duplicate_distance=4, progress=False)

    assert report.n_images == 10
    assert report.n_readable == 9
    assert report.patient_source == "folder"
    assert report.taxonomy == "leukemia7"

    # unreadable: the truncated file, named, and the set is not usable
    assert len(report.unreadable) == 1
    assert report.unreadable[0]["path"] == str(messy_dir / "AML" / "P2" / "broken.png")
    assert report.unreadable[0]["reason"]
    assert report.usable is False

    # exact duplicate across two patients, with conflicting labels
    assert len(report.exact_duplicates) == 1
    exact = report.exact_duplicates[0]
    assert sorted(Path(p).name for p in exact["paths"]) == ["a.png", "dup.png"]
    assert exact["across_groups"] is True
    assert exact["conflicting_labels"] is True
    assert exact["labels"] == ["ALL", "AML"]

    # near duplicate: different bytes, (almost) the same perceptual hash
    assert len(report.near_duplicates) == 1
    near = report.near_duplicates[0]
    assert sorted(Path(p).name for p in near["paths"]) == ["b.png", "near.png"]
    assert 0 <= near["distance"] <= 4
    assert near["across_groups"] is True

    # small image
    assert report.small_images == [
        {"path": str(messy_dir / "AML" / "P2" / "small.png"), "width": 20, "height": 20}
    ]

    # counts per class and patient (unreadable images still count as listed)
    assert report.per_class["ALL"] == {"images": 4, "patients": 1, "depth": 3, "is_leaf": 1}
    assert report.per_class["AML"]["images"] == 4
    assert report.per_class["CML"]["images"] == 2
    assert set(report.per_class) == {"ALL", "AML", "CML"}
    assert report.leaves_without_images == ["Normal", "Reactive", "APML", "CLL"]
    assert report.per_patient == {
        "P1": {"images": 4, "labels": {"ALL": 4}},
        "P2": {"images": 4, "labels": {"AML": 4}},
        "P3": {"images": 2, "labels": {"CML": 2}},
    }
    assert report.small_patients == [{"patient": "P3", "images": 2}]
    assert report.grouping_note is None
    # warnings: 1 exact + 1 near + 1 small image + 1 small patient
    assert report.warnings == 4

    payload = report.to_dict()
    assert payload["usable"] is False
    assert payload["n_warnings"] == 4
    assert payload["settings"]["min_size"] == 64
    json.dumps(payload)  # serialisable as is


def test_check_thresholds_change_the_findings(messy_dir, leukemia7):
    found = discover(messy_dir, leukemia7)
    report = check_dataset(found, min_size=16, min_images_per_patient=2,
                           near_duplicate_distance=0, progress=False, workers=1)
    assert report.small_images == []
    assert report.small_patients == []
    # the near duplicate is found at distance 0 only if its hash is identical
    assert all(d["distance"] == 0 for d in report.near_duplicates)


def test_check_clean_synthetic_folder_is_usable(synth_dir, leukemia7):
    report = check_dataset(discover(synth_dir, leukemia7), min_size=32, progress=False)
    assert report.usable is True
    assert report.unreadable == []
    assert report.exact_duplicates == []
    assert report.small_images == []
    assert report.n_readable == report.n_images == 84
    assert report.leaves_without_images == []
    assert len(report.per_patient) == 21
    assert all(v["images"] == 4 for v in report.per_patient.values())
    assert all(row["patients"] == 3 for row in report.per_class.values())


def test_check_reports_missing_patient_ids(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "a.png", "png", size=(70, 70))
    write_image(tmp_path / "CLL" / "b.png", "png", size=(70, 70), seed=1)
    report = check_dataset(discover(tmp_path, leukemia7), progress=False)
    assert report.grouping_note.startswith("WARNING")
    assert report.per_patient == {}
    assert report.per_class["ALL"]["patients"] == 0
    assert report.usable is True
    assert report.warnings == 1


def test_check_fatal_problem_makes_it_unusable(tmp_path, leukemia7):
    write_image(tmp_path / "ALL" / "P1" / "a.png", "png", size=(70, 70))
    write_image(tmp_path / "Bogus" / "P1" / "b.png", "png", size=(70, 70))
    report = check_dataset(discover(tmp_path, leukemia7), progress=False)
    assert report.unreadable == []
    assert report.usable is False
    assert [p["kind"] for p in report.problems] == ["unknown_label"]


def test_inspect_image_and_problems_from_infos(tmp_path):
    good = write_image(tmp_path / "g.png", "png", size=(40, 30))
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    infos = scan_images([good, bad], progress=False)
    assert [i.ok for i in infos] == [True, False]
    assert (infos[0].width, infos[0].height) == (40, 30)
    assert len(infos[0].sha256) == 64
    assert 0 <= infos[0].phash < 2**64
    assert inspect_image(good) == infos[0]
    problems = problems_from_infos(infos)
    assert len(problems) == 1
    assert problems[0].kind == "unreadable" and problems[0].where == str(bad)
    assert problems[0].fatal


# ------------------------------------------------------------------ hamming_pairs
def test_hamming_pairs_hand_computed():
    values = [0, 0b1, 0b111, 2**63]
    # distances: 0-1: 1, 0-2: 3, 0-3: 1, 1-2: 2, 1-3: 2, 2-3: 4
    assert hamming_pairs(values, 2) == [(0, 1, 1), (0, 3, 1), (1, 2, 2), (1, 3, 2)]
    assert hamming_pairs(values, 1) == [(0, 1, 1), (0, 3, 1)]
    assert hamming_pairs(values, 4) == [(0, 1, 1), (0, 2, 3), (0, 3, 1), (1, 2, 2), (1, 3, 2),
                                        (2, 3, 4)]


def test_hamming_pairs_includes_identical_hashes():
    assert hamming_pairs([5, 5, 6], 0) == [(0, 1, 0)]
    assert hamming_pairs([], 3) == []
    assert hamming_pairs([2**64 - 1, 2**64 - 1 - 2**40], 1) == [(0, 1, 1)]


def _brute_force(values: list[int], max_distance: int) -> list[tuple[int, int, int]]:
    out = []
    for i, j in itertools.combinations(range(len(values)), 2):
        d = bin(values[i] ^ values[j]).count("1")
        if d <= max_distance:
            out.append((i, j, d))
    return out


def _clustered_hashes(n: int, seed: int) -> list[int]:
    """Hashes in clusters of close values (0..8 flipped bits) plus unrelated ones."""
    rng = np.random.default_rng(seed)
    centres = [int(rng.integers(0, 2**63)) * 2 + int(rng.integers(0, 2)) for _ in range(30)]
    values = []
    for k in range(n):
        v = centres[k % len(centres)]
        for bit in rng.choice(64, size=int(rng.integers(0, 9)), replace=False):
            v ^= 1 << int(bit)
        values.append(v)
    return values


@pytest.mark.parametrize("max_distance", [0, 3, 6])
def test_hamming_pairs_matches_brute_force(max_distance):
    values = _clustered_hashes(300, seed=max_distance)
    expected = _brute_force(values, max_distance)
    assert len(expected) >= 5  # the data does contain close pairs
    assert hamming_pairs(values, max_distance) == expected


def test_hamming_pairs_matches_brute_force_on_uniform_random():
    rng = np.random.default_rng(7)
    values = [int(rng.integers(0, 2**32)) << 32 | int(rng.integers(0, 2**32))
              for _ in range(300)]
    values[10] = values[20] ^ 0b101  # plant one close pair
    expected = _brute_force(values, 6)
    assert (10, 20, 2) in expected
    assert hamming_pairs(values, 6) == expected
