"""Finding the cell: a crop that follows the nucleus, not the camera."""

import numpy as np
import pytest
from PIL import Image

from leukotree.data.cache import cache_key
from leukotree.data.cells import FRAME_PER_NUCLEUS, cell_frame, find_cell
from leukotree.data.images import load_rgb_array

BACKGROUND = (238, 222, 212)
NUCLEUS = (90, 50, 140)


def smear(size: int, cx: float, cy: float, r: float) -> Image.Image:
    """A pale background with one purple disc (a nucleus) of radius ``r``."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2] = NUCLEUS
    return Image.fromarray(img)


def test_the_nucleus_is_found_where_it_is_with_its_size():
    cx, cy, d = find_cell(smear(360, 200, 150, 40))
    assert cx == pytest.approx(200, abs=4) and cy == pytest.approx(150, abs=4)
    assert d == pytest.approx(80, rel=0.1)
    frame = cell_frame(smear(360, 200, 150, 40))
    assert frame.found and frame.side == pytest.approx(FRAME_PER_NUCLEUS * d)


def test_an_image_without_a_nucleus_keeps_the_whole_image_as_its_frame():
    frame = cell_frame(Image.new("RGB", (300, 200), BACKGROUND))
    assert not frame.found and (frame.cx, frame.cy, frame.side) == (150, 100, 200)


def test_a_tight_crop_and_a_wide_frame_of_one_cell_look_the_same(tmp_path):
    wide = smear(360, 180, 180, 30)
    wide.save(tmp_path / "wide.png")
    wide.crop((120, 120, 240, 240)).save(tmp_path / "tight.png")  # 120 px around the cell
    shifted = smear(360, 140, 210, 30)  # the camera did not centre it
    shifted.save(tmp_path / "shifted.png")
    a, b, c = (load_rgb_array(tmp_path / f"{n}.png", 64, crop=0.65, crop_mode="cell")
               for n in ("wide", "tight", "shifted"))
    assert np.abs(a.astype(int) - b).mean() < 3 and np.abs(a.astype(int) - c).mean() < 3
    centre = load_rgb_array(tmp_path / "tight.png", 64, crop=0.65)  # the centre crop is not
    assert np.abs(a.astype(int) - centre).mean() > 10


def test_the_crop_mode_is_checked_and_keys_the_cache(tmp_path):
    smear(64, 32, 32, 8).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="crop_mode"):
        load_rgb_array(tmp_path / "a.png", 32, crop_mode="nucleus")
    paths = [tmp_path / "a.png"]
    assert cache_key(paths, 32, 0.65) != cache_key(paths, 32, 0.65, "cell")
    assert cache_key(paths, 32, 0.65) == cache_key(paths, 32, 0.65, "centre")


def test_a_blank_noisy_image_has_no_nucleus_and_decodes_to_its_size(tmp_path):
    rng = np.random.default_rng(0)
    noise = rng.normal(230, 2, (600, 600, 3)).clip(0, 255).astype(np.uint8)
    Image.fromarray(noise).save(tmp_path / "blank.png")
    assert find_cell(Image.open(tmp_path / "blank.png")) is None
    out = load_rgb_array(tmp_path / "blank.png", 48, crop=0.65, crop_mode="cell")
    assert out.shape == (48, 48, 3)


def test_auto_keeps_the_centre_crop_unless_the_image_is_a_tight_crop(tmp_path):
    smear(360, 180, 180, 45).save(tmp_path / "wide.png")  # frame ~ the image: centre
    smear(360, 180, 180, 45).crop((108, 108, 252, 252)).save(tmp_path / "tight.png")
    wide_auto = load_rgb_array(tmp_path / "wide.png", 64, crop=0.65, crop_mode="auto")
    wide_centre = load_rgb_array(tmp_path / "wide.png", 64, crop=0.65)
    assert np.array_equal(wide_auto, wide_centre)
    tight_auto = load_rgb_array(tmp_path / "tight.png", 64, crop=0.65, crop_mode="auto")
    tight_cell = load_rgb_array(tmp_path / "tight.png", 64, crop=0.65, crop_mode="cell")
    assert np.array_equal(tight_auto, tight_cell)
    assert np.abs(tight_auto.astype(int) - wide_centre).mean() < 6  # framed like the wide one
