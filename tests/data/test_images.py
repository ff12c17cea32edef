"""Image reading: every supported kind decodes to RGB; every failure names the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import truncate_file, write_image
from leukotree.data.images import is_image_file, load_rgb_array, open_image
from leukotree.errors import DataError, ImageReadError


@pytest.mark.parametrize(
    ("kind", "suffix"),
    [
        ("jpeg", ".jpg"),
        ("png", ".png"),
        ("rgba", ".png"),
        ("palette", ".png"),
        ("palette_transparent", ".png"),
        ("gray", ".png"),
        ("gray16", ".png"),
        ("la", ".png"),
        ("bmp", ".bmp"),
        ("tiff", ".tif"),
    ],
)
def test_open_image_returns_rgb_of_the_right_size(tmp_path, kind, suffix):
    path = write_image(tmp_path / f"img{suffix}", kind, size=(30, 20))
    img = open_image(path)
    assert img.mode == "RGB"
    assert img.size == (30, 20)
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (20, 30, 3)


def test_png_rgb_pixels_are_unchanged(tmp_path):
    path = write_image(tmp_path / "a.png", "png", size=(16, 12), seed=3)
    expected = np.asarray(Image.open(path))
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (0, 0, 0, 255))  # opaque black stays black
    path = tmp_path / "alpha.png"
    rgba.save(path)
    img = open_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)
    assert img.getpixel((1, 0)) == (0, 0, 0)
    assert img.getpixel((2, 0)) == (10, 20, 30)


def test_half_transparent_pixel_is_blended_with_white(tmp_path):
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    path = tmp_path / "half.png"
    rgba.save(path)
    r, g, b = open_image(path).getpixel((0, 0))
    assert r == g == b
    assert 120 <= r <= 135  # 255 * (1 - 128/255) = 127


def test_transparent_palette_entry_becomes_white(tmp_path):
    path = write_image(tmp_path / "pal.png", "palette_transparent", size=(5, 4))
    img = open_image(path)
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent index 0
    assert img.getpixel((1, 1)) == (200, 30, 40)  # opaque index 1


def test_transparent_la_is_white(tmp_path):
    path = tmp_path / "la.png"
    Image.new("LA", (3, 3), (0, 0)).save(path)
    assert open_image(path).getpixel((1, 1)) == (255, 255, 255)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "g.png"
    Image.new("L", (4, 4), 77).save(path)
    assert open_image(path).getpixel((2, 2)) == (77, 77, 77)


def test_16_bit_grayscale_full_range_maps_to_8_bits(tmp_path):
    values = np.array([[0, 65535], [0, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    img = open_image(path)
    assert img.getpixel((0, 0)) == (0, 0, 0)
    assert img.getpixel((1, 0)) == (255, 255, 255)


def test_16_bit_uniform_white_stays_white(tmp_path):
    # Regression (fixed): images.py _to_rgb (lines 101-102) rescales 16-bit/float images by their
    # own min..max; when the image is uniform (hi == lo) the scale is 0 and every pixel
    # becomes 0. A uniformly white 16-bit PNG (all 65535) decodes as pure black
    # (0, 0, 0); a uniform 1000 does too. (More generally, the per-image min-max stretch
    # changes brightness between images: 16-bit values 1000..2000 become 0..255.)
    path = tmp_path / "white16.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(path)
    assert open_image(path).getpixel((0, 0)) == (255, 255, 255)


# ------------------------------------------------------------------ failures
def _read_error(path, **kwargs) -> ImageReadError:
    with pytest.raises(ImageReadError) as excinfo:
        open_image(path, **kwargs)
    err = excinfo.value
    assert path.name in str(err)  # the message always names the file
    assert err.path == str(path)
    assert isinstance(err, DataError)
    return err


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    assert "empty (0 bytes)" in _read_error(path).reason


def test_missing_file(tmp_path):
    assert "does not exist" in _read_error(tmp_path / "ghost.jpg").reason


def test_text_file_with_jpg_suffix(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    assert "not a recognised image file" in _read_error(path).reason


def test_truncated_jpeg(tmp_path):
    path = write_image(tmp_path / "cut.jpg", "jpeg", size=(256, 256))
    assert open_image(path).size == (256, 256)
    truncate_file(path, 0.5)
    assert "truncated" in _read_error(path).reason.lower()


def test_truncated_png(tmp_path):
    path = write_image(tmp_path / "cut.png", "png", size=(64, 64))
    truncate_file(path, 0.5)
    _read_error(path)


def test_gif_is_unsupported(tmp_path):
    path = write_image(tmp_path / "anim.gif", "gif")
    err = _read_error(path)
    assert "format GIF is not supported" in err.reason


def test_gif_with_a_png_suffix_is_still_refused(tmp_path):
    path = tmp_path / "disguised.png"
    write_image(tmp_path / "x.gif", "gif").rename(path)
    assert "GIF" in _read_error(path).reason


def test_image_above_max_pixels(tmp_path):
    path = write_image(tmp_path / "big.png", "png", size=(20, 20))
    err = _read_error(path, max_pixels=100)
    assert "20x20 = 400 pixels exceeds the limit of 100" in err.reason
    assert open_image(path, max_pixels=400).size == (20, 20)  # at the limit: fine


def test_directory_is_not_an_image(tmp_path):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    _read_error(folder)


# ------------------------------------------------------------------ helpers
def test_draft_size_decodes_a_smaller_jpeg(tmp_path):
    path = write_image(tmp_path / "large.jpg", "jpeg", size=(800, 600))
    full = open_image(path)
    assert full.size == (800, 600)
    small = open_image(path, draft_size=100)
    assert small.mode == "RGB"
    assert small.size[0] < 800 and small.size[1] < 600
    assert min(small.size) >= 100
    # the JPEG decoder scales by 1/2, 1/4 or 1/8: 1/8 would give 100x75 < 100
    assert small.size == (200, 150)


def test_draft_size_ignored_for_png(tmp_path):
    path = write_image(tmp_path / "large.png", "png", size=(400, 300))
    assert open_image(path, draft_size=50).size == (400, 300)


def test_load_rgb_array(tmp_path):
    path = write_image(tmp_path / "wide.png", "png", size=(40, 20))
    arr = load_rgb_array(path, 16)
    assert arr.shape == (16, 16, 3)
    assert arr.dtype == np.uint8
    native = load_rgb_array(path)
    assert native.shape == (20, 40, 3)


def test_load_rgb_array_from_rgba_and_jpeg(tmp_path):
    rgba = write_image(tmp_path / "a.png", "rgba", size=(24, 24))
    jpeg = write_image(tmp_path / "b.jpg", "jpeg", size=(300, 300))
    assert load_rgb_array(rgba, 8).shape == (8, 8, 3)
    assert load_rgb_array(jpeg, 32).shape == (32, 32, 3)


def test_load_rgb_array_propagates_read_errors(tmp_path):
    path = tmp_path / "bad.png"
    path.write_bytes(b"\x89PNG garbage")
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        load_rgb_array(path, 8)


def test_is_image_file(tmp_path):
    assert is_image_file(tmp_path / "a.JPG")
    assert is_image_file(tmp_path / "a.tiff")
    assert is_image_file(tmp_path / "a.bmp")
    assert not is_image_file(tmp_path / "a.gif")
    assert not is_image_file(tmp_path / "a.txt")


def test_a_window_is_an_absolute_centred_square_padded_beyond_the_image(tmp_path):
    img = np.full((100, 100, 3), 250, np.uint8)
    img[40:60, 40:60] = (200, 0, 0)  # a 20 px "cell" in the centre
    Image.fromarray(img).save(tmp_path / "c.png")
    red = lambda a: (a[..., 1] < 100).mean()  # noqa: E731 - share of red pixels
    inside = load_rgb_array(tmp_path / "c.png", 40, window=40)  # the cell is half the side
    assert red(inside) == pytest.approx(0.25, abs=0.03)
    wide = load_rgb_array(tmp_path / "c.png", 40, window=200)  # twice the image
    assert red(wide) == pytest.approx(0.01, abs=0.005)  # 10% of the side
    assert (wide[0, 0] == 250).all()  # beyond the image: the border's colour
    with pytest.raises(ValueError, match="window must be positive"):
        load_rgb_array(tmp_path / "c.png", 40, window=0)
