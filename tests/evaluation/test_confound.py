import json
import math

import numpy as np
import pytest
from PIL import Image

from leukotree.cli import main
from leukotree.data.discover import discover
from leukotree.errors import LeukotreeError
from leukotree.evaluation.confound import (
    ColourConfound,
    colour_confound,
    colour_features,
    normalise_stain,
)
from leukotree.taxonomy import load_taxonomy


def _white_with_black_tenth() -> np.ndarray:
    img = np.full((1, 10, 10, 3), 255, np.uint8)
    img[0, :1] = 0  # 10 of 100 pixels black
    return img


def test_stats_of_a_white_image_with_a_black_tenth():
    mean_l, mean_a, mean_b, std_l, std_a, std_b = colour_features(_white_with_black_tenth())[0]
    # L* is 100 on white and 0 on black: mean 90, deviation sqrt(0.9 * 0.1) * 100 = 30
    assert mean_l == pytest.approx(90.0, abs=0.01)
    assert std_l == pytest.approx(30.0, abs=0.01)
    assert max(abs(mean_a), abs(mean_b), std_a, std_b) < 0.01  # grey: no colour


def test_parts_are_the_brightest_and_darkest_tenth():
    img = _white_with_black_tenth()
    img[0, 5] = (200, 0, 0)  # a red row: neither the brightest nor the darkest tenth
    bright_l, bright_a, _, dark_l, dark_a, _ = colour_features(img, "parts")[0]
    assert bright_l == pytest.approx(100.0, abs=0.01) and abs(bright_a) < 0.01
    assert dark_l == pytest.approx(0.0, abs=0.01) and abs(dark_a) < 0.01
    with pytest.raises(LeukotreeError, match="--features must be one of stats, parts"):
        colour_features(img, "hue")


def _tinted(shift: tuple[int, int, int], seed: int) -> np.ndarray:
    """A pale background with a dark round 'cell', tinted by ``shift``."""
    rng = np.random.default_rng(seed)
    img = np.full((24, 24, 3), 225, np.int16)
    yy, xx = np.mgrid[:24, :24]
    img[(yy - 12) ** 2 + (xx - 12) ** 2 < 40] = (90, 60, 140)
    img += np.array(shift, np.int16) + rng.integers(-4, 5, img.shape, dtype=np.int16)
    return img.clip(0, 255).astype(np.uint8)


def test_reinhard_gives_every_image_the_same_statistics():
    pixels = np.stack([_tinted((25, -10, -20), 0), _tinted((-20, 5, 25), 1)])
    before = colour_features(pixels)
    after = colour_features(normalise_stain(pixels, "reinhard"))
    assert np.abs(before[0] - before[1]).max() > 5
    assert np.abs(after[0] - after[1]).max() < 1.0  # uint8 rounding and clipping aside
    assert normalise_stain(pixels, "none") is pixels
    with pytest.raises(LeukotreeError, match="--stain-norm must be one of"):
        normalise_stain(pixels, "macenko")


def _cohort(root, unreadable: bool = False):
    """8 patients, 4 cells each (two blasts, two lymphocytes); APL slides are redder."""
    rows = ["path,label,patient,cell_type"]
    for p in range(8):
        label = "APL" if p % 2 else "AML"
        for c in range(4):
            path = root / label / f"P{p}" / f"c{c}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            shift = (20, -10, -10) if label == "APL" else (-10, 0, 15)
            Image.fromarray(_tinted(shift, 10 * p + c)).save(path)
            rows.append(f"{path},{label},P{p},{'lymphocyte' if c < 2 else 'blast'}")
    if unreadable:
        bad = root / "AML" / "P0" / "broken.png"
        bad.write_bytes(b"not an image")
        rows.append(f"{bad},AML,P0,lymphocyte")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def test_colours_of_a_confounded_cohort_tell_the_labels_apart(tmp_path):
    manifest = _cohort(tmp_path, unreadable=True)
    cells = load_taxonomy("jhh-cells")
    samples = discover(manifest, load_taxonomy("aml-apl"), patients="manifest",
                       cell_labels="column:cell_type", cell_taxonomy=cells).samples
    found = colour_confound(samples, cell_taxonomy=cells, cell_types="lymphoid", size=24,
                            folds=4, repeats=3)
    assert (found.n_images, found.n_patients, found.other_cell_types) == (16, 8, 16)
    assert found.cell_types == ["lymphoid"]
    assert len(found.unreadable) == 1 and "broken.png" in found.unreadable[0]
    assert found.separability["auroc"] == pytest.approx(1.0)
    assert found.by_label["APL"]["mean_a"] > found.by_label["AML"]["mean_a"]  # redder
    assert "tell the labels apart" in found.verdict
    # after a per-image Reinhard every image has the same means and deviations: refused
    with pytest.raises(LeukotreeError, match=r"same for every image.*--features parts"):
        colour_confound(samples, stain_norm="reinhard", size=24)
    # a tint of the whole slide moves nuclei and plasma alike: a per-image Reinhard takes it
    gaps = {}
    for norm in ("none", "reinhard"):
        parts = colour_confound(samples, features="parts", stain_norm=norm, size=24, folds=4,
                                repeats=3)
        assert (parts.n_images, parts.stain_norm) == (32, norm)
        gaps[norm] = max(abs(parts.by_label["APL"][k] - parts.by_label["AML"][k])
                         for k in parts.by_label["APL"])
    assert gaps["none"] > 10 and gaps["reinhard"] < 1.0
    with pytest.raises(LeukotreeError, match="--cell-types needs --cell-taxonomy"):
        colour_confound(samples, cell_types="lymphoid")
    with pytest.raises(LeukotreeError, match="lymphoyd"):
        colour_confound(samples, cell_taxonomy=cells, cell_types="lymphoyd")


@pytest.mark.parametrize(("auroc", "said"), [(0.85, "tell the labels apart"),
                                              (0.65, "say something"),
                                              (0.52, "say little")])
def test_verdict_follows_the_auroc(auroc, said):
    found = ColourConfound("stats", "none", None, 10, 4, {"auroc": auroc}, {})
    assert said in found.verdict and f"AUROC {auroc:.3f}" in found.verdict
    assert found.informative == (auroc >= 0.6)
    empty = ColourConfound("stats", "none", None, 2, 1, {"note": "needs two labels"}, {})
    assert empty.verdict == "Not measured: needs two labels."


def test_cli_data_colour(tmp_path, capsys):
    manifest = _cohort(tmp_path)
    out = tmp_path / "colour.json"
    code = main(["data", "colour", str(manifest), "-t", "aml-apl", "--patients", "manifest",
                 "--cell-labels", "column:cell_type", "--cell-taxonomy", "jhh-cells",
                 "--cell-types", "blast", "--features", "parts", "--size", "24",
                 "--repeats", "2", "--json", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed["features"] == "parts" and printed["n_images"] == 16
    assert set(printed["by_label"]["APL"]) == {"bright_L", "bright_a", "bright_b", "dark_L",
                                               "dark_a", "dark_b"}
    assert not math.isnan(printed["separability"]["auroc"])
    code = main(["data", "colour", str(manifest), "-t", "aml-apl", "--patients", "manifest",
                 "--size", "24", "--repeats", "2", "--no-progress"])
    assert code == 0
    shown = capsys.readouterr().out
    assert "Colours per label" in shown and "32 images of 8 patients" in shown
    assert main(["data", "colour", str(manifest), "-t", "aml-apl", "--cell-labels",
                 "column:cell_type"]) == 2
    assert "--cell-labels and --cell-taxonomy go together" in capsys.readouterr().err
    assert main(["data", "colour", str(manifest), "-t", "aml-apl", "--patients", "manifest",
                 "--cell-labels", "column:cell_type", "--cell-taxonomy", "jhh-cells"]) == 2
    assert "only choose images with --cell-types" in capsys.readouterr().err


def test_the_verdict_of_stain_colours_points_to_the_stain_protocols():
    found = ColourConfound("parts", "none", None, 10, 4, {"auroc": 0.85}, {})
    assert "kfold,stain,stain-swap" in found.verdict and "reinhard" not in found.verdict
    after = ColourConfound("stats", "reinhard", None, 10, 4, {"auroc": 0.65}, {})
    assert "kfold,stain,stain-swap" in after.verdict


def test_patients_of_two_labels_untyped_cells_and_nothing_readable(tmp_path):
    manifest = _cohort(tmp_path)
    text = manifest.read_text().splitlines()
    text[1] = text[1].replace(",lymphocyte", ",")  # a cell without a cell type
    manifest.write_text("\n".join(text) + "\n")
    cells = load_taxonomy("jhh-cells")
    samples = discover(manifest, load_taxonomy("aml-apl"), patients="manifest",
                       cell_labels="column:cell_type", cell_taxonomy=cells).samples
    found = colour_confound(samples, cell_taxonomy=cells, cell_types="lymphoid", size=24,
                            repeats=1)
    assert (found.n_images, found.other_cell_types, found.no_cell_type) == (15, 16, 1)
    mixed = [s if s.group != samples[0].group or i != 1 else
             type(s)(**{**vars(s), "label": "APL"}) for i, s in enumerate(samples)]
    with pytest.raises(LeukotreeError, match="has images of two labels"):
        colour_confound(mixed, size=24, repeats=1)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    nothing = colour_confound([type(samples[0])(path=broken, label="AML", patient="P9")],
                              size=24, repeats=1)
    assert nothing.n_patients == 0 and nothing.verdict.startswith("Not measured")
