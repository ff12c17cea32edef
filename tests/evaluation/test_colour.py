"""The colour protocols: recolouring by hand, targets from the training patients only, and
``cv --protocol kfold,colour-swap`` (tests/evaluation/test_cv.py)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from leukotree.errors import LeukotreeError
from leukotree.evaluation.colour import (
    clipped_summary,
    colour_statistics,
    colour_targets,
    move_colours,
    recolour,
    restain,
    write_recoloured,
)
from leukotree.evaluation.confound import colour_features, colour_separability, patient_means
from leukotree.evaluation.cv import parse_protocols, patient_change


def _stats(pixels: np.ndarray) -> np.ndarray:
    """The six L*a*b* statistics the colour protocols move."""
    return colour_features(pixels[None], "stats")[0]


def _image(seed: int = 0) -> np.ndarray:
    """A 16x16 image of mid-range colours (no channel near 0 or 255: nothing clips)."""
    rng = np.random.default_rng(seed)
    return rng.integers(90, 170, size=(16, 16, 3), dtype=np.uint8)


def test_recolouring_to_its_own_statistics_changes_nothing():
    pixels = _image()
    stats = _stats(pixels)
    assert np.abs(recolour(pixels, stats, stats).astype(int) - pixels).max() <= 1


def test_recolouring_moves_the_lab_statistics_to_the_target():
    pixels = _image(1)
    m_l, m_a, m_b, s_l, s_a, s_b = _stats(pixels)
    # L* up by 5 with its spread kept; a* spread halved; b* mean down by 3
    target = [m_l + 5, m_a, m_b - 3, s_l, s_a / 2, s_b]
    moved = _stats(recolour(pixels, _stats(pixels), target))
    assert moved == pytest.approx(target, abs=0.3)  # 8-bit rounding only


def test_a_grey_image_has_lab_statistics_by_hand():
    # sRGB (119, 119, 119) is L* = 50.0 (Y = 0.1845), a* = b* = 0, no spread
    stats = _stats(np.full((4, 4, 3), 119, np.uint8))
    assert stats == pytest.approx([50.0, 0, 0, 0, 0, 0], abs=0.05)


def _rows(spec):
    return [{"path": path, "label": label, "group": group, "patient": group}
            for path, label, group in spec]


def test_targets_weigh_each_training_patient_alike_and_swap_takes_the_other_labels():
    stats = {"a1": np.full(6, 1.0), "a2": np.full(6, 3.0), "b1": np.full(6, 10.0),
             "c1": np.full(6, 4.0), "t1": np.zeros(6), "t2": np.zeros(6)}
    train = _rows([("a1", "APL", "A"), ("a2", "APL", "A"), ("b1", "AML", "B"),
                   ("c1", "AML", "C")])
    test = _rows([("t1", "APL", "T"), ("t2", "AML", "U")])
    assert patient_means(train, stats)["A"] == pytest.approx(np.full(6, 2.0))
    neutral = colour_targets(test, train, stats, "neutral")
    assert neutral["T"] == pytest.approx(np.full(6, (2 + 10 + 4) / 3))  # not (1+3+10+4)/4
    swap = colour_targets(test, train, stats, "swap")
    assert swap["T"] == pytest.approx(np.full(6, 7.0))  # the AML patients B and C
    assert swap["U"] == pytest.approx(np.full(6, 2.0))  # the APL patient A
    with pytest.raises(LeukotreeError, match="another label than 'APL'"):
        colour_targets(test[:1], train[:2], stats, "swap")
    with pytest.raises(LeukotreeError, match="colour target"):
        colour_targets(test, train, stats, "grey")


def test_recoloured_copies_and_their_manifest(tmp_path):
    paths = []
    for i in range(3):
        path = tmp_path / f"cell {i}.jpg"
        Image.fromarray(_image(i)).save(path)
        paths.append(str(path))
    blast = {"path": paths[1], "label": "APL", "group": "T", "patient": "T",
             "cell_type": "blast"}
    test = [*_rows([(paths[0], "APL", "T")]), blast]
    train = _rows([(paths[2], "AML", "B")])
    stats = colour_statistics(paths, tmp_path / "stats.csv")
    assert (tmp_path / "stats.csv").exists()
    assert colour_statistics(paths[:1], tmp_path / "stats.csv")[paths[0]] == pytest.approx(
        stats[paths[0]], abs=1e-4)  # read back from the cache
    manifest = write_recoloured(test, train, stats, "swap", tmp_path / "out")
    rows = list(csv.DictReader(manifest.open()))
    assert [(r["label"], r["patient"]) for r in rows] == [("APL", "T"), ("APL", "T")]
    assert rows[1]["cell_type"] == "blast" and rows[0]["cell_type"] == ""
    copies = [np.asarray(Image.open(r["path"])) for r in rows]
    # the patient's mean colour is now the AML patient's
    mean = np.mean([_stats(c) for c in copies], axis=0)
    assert mean[:3] == pytest.approx(stats[paths[2]][:3], abs=0.5)
    assert all(r["path"].endswith(".png") for r in rows)
    assert all(0.0 <= float(r["clipped"]) <= 1.0 for r in rows)
    # a resumed CV keeps the copies and the clipped shares they were written with, and
    # measures the share again where its manifest had none (an interrupted run)
    again = list(csv.DictReader(write_recoloured(test, train, stats, "swap",
                                                 tmp_path / "out").open()))
    assert [r["clipped"] for r in again] == [r["clipped"] for r in rows]
    (tmp_path / "out" / "manifest.csv").unlink()
    stamp = Path(rows[0]["path"]).stat().st_mtime_ns
    again = list(csv.DictReader(write_recoloured(test, train, stats, "swap",
                                                 tmp_path / "out").open()))
    assert [r["clipped"] for r in again] == [r["clipped"] for r in rows]
    assert Path(rows[0]["path"]).stat().st_mtime_ns == stamp  # the copy itself kept


def test_colours_pushed_out_of_gamut_are_counted_as_clipped(tmp_path):
    grey = np.full((4, 4, 3), 119, np.uint8)  # L* 50, a* = b* = 0, no spread
    same, clipped = move_colours(grey, [50, 0, 0, 0, 0, 0], [50, 0, 0, 0, 0, 0])
    assert clipped == 0.0 and np.abs(same.astype(int) - 119).max() <= 1
    # L* 50 -> 120 lies beyond white: every pixel clipped (to white)
    white, clipped = move_colours(grey, [50, 0, 0, 0, 0, 0], [120, 0, 0, 0, 0, 0])
    assert clipped == 1.0 and (white == 255).all()
    # b* 50 -> 150 at L* 50 is beyond any sRGB blue-yellow: clipped too
    assert move_colours(grey, [50, 0, 0, 0, 0, 0], [50, 0, 150, 0, 0, 0])[1] == 1.0
    with pytest.raises(ValueError, match="features must be one of"):
        move_colours(grey, [0] * 6, [0] * 6, "hue")
    manifests = []
    for i, shares in enumerate((["0.5", "0.0"], ["0.002", "0.004"])):
        manifests.append(tmp_path / f"m{i}.csv")
        manifests[-1].write_text("path,clipped\n" + "".join(f"x{i}{j}.png,{c}\n"
                                                         for j, c in enumerate(shares)))
    manifests[1].write_text("path,clipped\nx10.png,\nx11.png,0.004\n")  # one unknown
    assert clipped_summary([*manifests, tmp_path / "gone.csv"]) == {
        "n_images": 3, "mean_share": pytest.approx(0.168), "images_over": 1, "n_unknown": 1,
        "manifests_missing": 1}


def _tones(*colours: tuple[int, int, int]) -> np.ndarray:
    """A 10x10 image: 6 rows of plasma, 2 of cytoplasm, 2 of nucleus (the darkest
    tenth and more); two colours: plasma and nucleus only."""
    img = np.empty((10, 10, 3), np.uint8)
    img[:6], img[6:8], img[8:] = colours if len(colours) == 3 else (colours[0], *colours)
    return img


def _lab(rgb: tuple[int, int, int] | np.ndarray) -> np.ndarray:
    from leukotree.models.stain import rgb_to_lab

    x = torch.tensor(np.asarray(rgb, np.float32)).view(1, 3, 1, 1)
    return rgb_to_lab(x).flatten().double().numpy()


def test_restaining_gives_nuclei_and_plasma_the_target_colours():
    source = _tones((228, 214, 226), (92, 60, 140))
    target = _tones((222, 220, 214), (70, 48, 150))
    parts = [colour_features(img[None], "parts")[0] for img in (source, target)]
    moved = restain(source, parts[0], parts[1])
    assert np.abs(moved.astype(int) - target).max() <= 1  # 8-bit rounding only
    assert np.abs(restain(source, parts[0], parts[0]).astype(int) - source).max() <= 1
    # a cytoplasm pixel slides between the two shifts by its lightness
    mid = (170, 120, 180)
    three = _tones((228, 214, 226), mid, (92, 60, 140))
    (b_l, *_), (d_l, *_) = parts[0][:3], parts[0][3:]
    w = (_lab(mid)[0] - d_l) / (b_l - d_l)
    expected = _lab(mid) + (1 - w) * (parts[1][3:] - parts[0][3:]) + w * (parts[1][:3]
                                                                         - parts[0][:3])
    got = _lab(restain(three, parts[0], parts[1])[7, 0])
    assert 0.2 < w < 0.8 and got == pytest.approx(expected, abs=0.6)
    with pytest.raises(ValueError, match="6 values"):
        restain(source, parts[0][:3], parts[1])


def test_colour_protocols_run_after_the_kfold_they_rescore():
    assert parse_protocols("colour") == ["kfold", "colour"]
    assert parse_protocols("stain-swap,kfold") == ["kfold", "stain-swap"]
    assert parse_protocols("cluster,colour-swap,repeated") == ["repeated", "colour-swap",
                                                               "cluster"]
    with pytest.raises(LeukotreeError, match="colour-swap"):
        parse_protocols("colours")


def test_patient_change_by_hand():
    before = {"P1": {"p_APL": 0.8, "decision": "APL"}, "P2": {"p_APL": 0.2, "decision": "AML"}}
    after = {"P1": {"p_APL": 0.4, "decision": "AML"}, "P2": {"p_APL": 0.3, "decision": "AML"}}
    change = patient_change(before, after, [{"positive": "APL"}])
    assert change == {"n": 2, "decisions_changed": 1, "mean_abs_p": pytest.approx(0.25)}


def test_colour_alone_separates_labels_only_when_the_colours_follow_them():
    rows = [{"path": f"{label}{i}", "label": label, "group": f"{label}{i}"}
            for label in ("APL", "AML") for i in range(6)]
    apart = {r["path"]: np.full(6, (10.0 if r["label"] == "APL" else 0.0) + int(r["path"][-1]))
             for r in rows}
    assert colour_separability(rows, apart, repeats=3)["auroc"] == pytest.approx(1.0)
    # one colour for all: each fold predicts its training patients' class shares, which
    # lean away from its test patients' classes: no better than chance
    alike = {r["path"]: np.full(6, 5.0) for r in rows}
    out = colour_separability(rows, alike, repeats=3)
    assert out["auroc"] <= 0.5 and out["n_patients"] == 12 and out["folds"] == 5
    lonely = colour_separability(rows[:7], apart)  # one AML patient
    assert "auroc" not in lonely and "two labels" in lonely["note"]
