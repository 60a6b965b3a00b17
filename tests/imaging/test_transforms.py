"""MRIPreprocess on single images: decoding, channel handling, the head crop."""

import numpy as np
import pytest
from PIL import Image

from braintumor_ray import ConfigError, MRIPreprocess
from braintumor_ray.core import ImageDecodeError
from braintumor_ray.core import canonical_label
from braintumor_ray.imaging import find_head_box, to_gray_u8

from _images import bad_files, head, jpeg_bytes, odd_but_valid


@pytest.mark.parametrize("seed", range(6))
def test_crop_keeps_the_head_and_drops_border_and_marker(seed):
    pixels, truth = head(["glioma", "meningioma", "no_tumor", "pituitary"][seed % 4], seed=seed)
    out = MRIPreprocess(image_size=96)(jpeg_bytes(pixels))
    x0, y0, x1, y1 = out.crop_box
    hx0, hy0, hx1, hy1 = truth.box
    assert out.cropped
    assert x0 <= hx0 and y0 <= hy0 and x1 >= hx1 and y1 >= hy1, "the head must lie inside the box"
    slack = 0.02 * max(hx1 - hx0, hy1 - hy0) + 4  # margin plus JPEG ringing
    assert hx0 - x0 <= slack and hy0 - y0 <= slack and x1 - hx1 <= slack and y1 - hy1 <= slack, "border not dropped"
    mx0, my0, mx1, my1 = truth.marker
    assert not (x0 < mx1 and mx0 < x1 and y0 < my1 and my0 < y1), "the burnt-in marker must fall outside"
    assert out.pixels.shape == (96, 96) and out.pixels.dtype == np.uint8


def test_resize_keeps_aspect_by_padding():
    img = np.zeros((100, 200), np.uint8)
    img[30:70, 20:180] = 200  # a wide bright slab
    out = MRIPreprocess(image_size=64, margin=0.0)(jpeg_bytes(img))
    rows = np.nonzero(out.pixels.max(axis=1) > 100)[0]
    # 160x40 box -> 64x16 after scaling: 16 bright rows, centred, black above and below.
    assert 14 <= len(rows) <= 18
    assert abs((rows[0] + rows[-1]) / 2 - 31.5) <= 1.5
    assert out.pixels[:20].max() < 30 and out.pixels[-20:].max() < 30


def test_blank_image_is_kept_uncropped():
    out = MRIPreprocess(image_size=32)(jpeg_bytes(np.zeros((50, 50), np.uint8)))
    assert not out.cropped and out.crop_box == (0, 0, 50, 50)


def test_sixteen_bit_is_stretched_to_the_values_used():
    a = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)
    got = to_gray_u8(Image.fromarray(a))
    np.testing.assert_array_equal(got, np.round(a / 4000 * 255).astype(np.uint8))


def test_alpha_becomes_black_background():
    rgba = np.array([[[200, 200, 200, 255], [200, 200, 200, 0]], [[100, 50, 0, 128], [0, 0, 0, 255]]], np.uint8)
    got = to_gray_u8(Image.fromarray(rgba, "RGBA"))
    r, g, b = 100 * 128 / 255, 50 * 128 / 255, 0
    expected_mixed = round(round(r) * 299 / 1000 + round(g) * 587 / 1000 + b)
    assert got[0, 0] == 200 and got[0, 1] == 0 and got[1, 1] == 0
    assert abs(int(got[1, 0]) - expected_mixed) <= 1


def test_odd_formats_decode_to_the_same_head():
    pixels, _ = head(seed=3)
    ref = MRIPreprocess(image_size=64)(jpeg_bytes(pixels, quality=100)).pixels.astype(int)
    for name, data in odd_but_valid(pixels).items():
        out = MRIPreprocess(image_size=64)(data)
        assert out.cropped, name
        assert np.abs(out.pixels.astype(int) - ref).mean() < 12, name


@pytest.mark.parametrize(
    "name,reason",
    [
        ("truncated.jpg", "truncated"),
        ("corrupt_header.jpg", "corrupt JPEG"),
        ("header_only.jpg", "(?i)truncated"),
        ("empty.jpg", "empty file"),
        ("notes.jpg", "not an image"),
        ("bomb.png", "too large"),
    ],
)
def test_bad_files_raise_a_reason(name, reason):
    pixels, _ = head()
    data = bad_files(jpeg_bytes(pixels))[name]
    with pytest.raises(ImageDecodeError, match=reason):
        MRIPreprocess()(data)


def test_preset_validates_and_round_trips():
    with pytest.raises(ConfigError, match="image_size"):
        MRIPreprocess(image_size=4)
    with pytest.raises(TypeError):
        MRIPreprocess(224)  # keyword-only
    p = MRIPreprocess(image_size=128, threshold=30)
    assert MRIPreprocess.from_dict(p.to_dict()) == p


def test_find_head_box_picks_the_largest_region():
    img = np.zeros((300, 300), np.uint8)
    img[50:250, 60:240] = 150  # head
    img[5:15, 5:15] = 255  # label
    x0, y0, x1, y1 = find_head_box(img, margin=0.0)
    # The mask is computed at 1/3 scale here: a few pixels of slack, never inside the head.
    assert 52 <= x0 <= 60 and 42 <= y0 <= 50 and 240 <= x1 <= 248 and 250 <= y1 <= 258


def test_find_head_box_joins_a_head_that_falls_apart():
    img = np.zeros((200, 200), np.uint8)
    img[40:160, 30:95] = 90  # left hemisphere
    img[40:160, 105:170] = 90  # right hemisphere, split by a dark fissure
    img[2:6, 2:6] = 255  # label
    x0, y0, x1, y1 = find_head_box(img, margin=0.0)
    assert x0 <= 30 and x1 >= 170 and y0 <= 40 and y1 >= 160 and x0 > 6


@pytest.mark.parametrize(
    "folder,label",
    [
        ("glioma_tumor", "glioma"),
        ("meningioma_tumor", "meningioma"),
        ("no_tumor", "no_tumor"),
        ("pituitary_tumor", "pituitary"),
        ("notumor", "no_tumor"),
        ("Glioma", "glioma"),
        ("No Tumour", "no_tumor"),
        ("pituitary", "pituitary"),
        ("tumor", None),
        ("cats", None),
    ],
)
def test_class_folder_names(folder, label):
    assert canonical_label(folder) == label


def test_a_first_scipy_import_cut_off_in_a_worker_does_not_break_later_files():
    """A cancelled task's half-made import of scipy.ndimage (its submodules left behind) made
    every later file on that Ray worker an error row ("name '_ndimage_api' is not defined")."""
    import sys

    import scipy
    from scipy import ndimage  # noqa: F401

    from braintumor_ray import MRIPreprocess
    from braintumor_ray.imaging import encode_png

    del sys.modules["scipy.ndimage"]
    delattr(scipy, "ndimage")
    with pytest.raises(NameError, match="_ndimage_api"):
        from scipy import ndimage  # noqa: F401, F811  (the state the worker was in)
    img = np.zeros((96, 96), np.uint8)
    img[20:70, 30:80] = 180
    out = MRIPreprocess(image_size=64)(encode_png(img))
    assert out.cropped and out.crop_box != (0, 0, 96, 96)
    assert "scipy.ndimage" in sys.modules
