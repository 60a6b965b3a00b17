"""Input guards before the model: a non-MR or non-head DICOM is skipped with its reason, an image
with no content is an error row, and the head's share of the image is measured."""

from __future__ import annotations

import numpy as np
import pytest

from braintumor_ray import MRIPreprocess
from braintumor_ray.imaging import NO_GUARD, InputGuard, find_head, render_mri
from _images import jpeg_bytes, png_bytes
from generators.medical import dicom_bytes, head12

GUARD = InputGuard()
PRE = MRIPreprocess(image_size=64)


@pytest.mark.parametrize("modality, body_part, skipped", [
    ("MR", None, None),
    ("MR", "BRAIN", None),
    ("MR", "HEAD", None),
    ("CR", "CHEST", "not brain MR: modality CR"),
    ("CT", "HEAD", "not brain MR: modality CT"),
    ("MR", "KNEE", "not a head: BodyPartExamined KNEE"),
])
def test_dicom_guard_table(modality, body_part, skipped):
    data = dicom_bytes(head12(1), modality=modality)
    if body_part:
        from pydicom import dcmread
        import io

        ds = dcmread(io.BytesIO(data))
        ds.BodyPartExamined = body_part
        buf = io.BytesIO()
        ds.save_as(buf)
        data = buf.getvalue()
    r = PRE.try_slices(data, guard=GUARD)
    if skipped is None:
        assert r.slices and r.skipped is None and r.error is None
    else:
        assert not r.slices and skipped in r.skipped
        # the same file passes when the guard allows everything
        assert PRE.try_slices(data, guard=NO_GUARD).slices


def test_other_modalities_can_be_allowed():
    data = dicom_bytes(head12(1), modality="CT")
    assert PRE.try_slices(data, guard=InputGuard(modalities=("MR", "CT"))).slices


@pytest.mark.parametrize("image, reason", [
    (np.zeros((96, 96), np.uint8), "no content"),
    (np.full((96, 96), 255, np.uint8), "no content"),
    (np.full((96, 96), 10, np.uint8) + np.random.default_rng(0).integers(0, 9, (96, 96)).astype(np.uint8), "no head found"),
])
def test_images_with_no_content_are_errors(image, reason):
    r = PRE.try_slices(jpeg_bytes(image, quality=100) if image.std() else png_bytes(image), guard=GUARD)
    assert not r.slices and reason in r.error
    assert PRE.try_slices(png_bytes(image), guard=NO_GUARD).slices  # without the guard it was "scored"


def test_head_fraction_is_small_for_a_small_head():
    big, _ = render_mri("no_tumor", np.random.default_rng(0), size=160)
    small = np.zeros_like(big)
    small[60:100, 60:100] = big[::4, ::4]
    assert find_head(big)[1] > 3 * find_head(small)[1] > 0
    out = PRE.try_slices(png_bytes(big), guard=GUARD).slices[0].image
    assert 0.2 < out.head_fraction <= 1.0


def test_the_contrast_and_head_checks_cost_a_few_bytes_a_pixel():
    """Issue 35: the contrast check made a float64 copy of the whole image (8 bytes a pixel: +1.07 GB
    for a flat PNG of guard.max_pixels). Now it is an integer pass over the histogram and the head
    check works on a bounded sample: what numpy allocates, decoding included, stays under 3 bytes a
    pixel (it was 9), for a flat image (refused) and one with a head (scored)."""
    import tracemalloc

    from braintumor_ray.imaging._preprocess import grey_spread

    side = 3000
    y, x = np.mgrid[0:side, 0:side]
    head = np.where((x - side / 2) ** 2 + (y - side / 2) ** 2 < (side / 3) ** 2, 120, 0).astype(np.uint8)
    head[::7] += 40
    flat, headed = png_bytes(np.full((side, side), 9, np.uint8)), png_bytes(head)
    assert abs(grey_spread(head) - float(head.std())) < 1e-9
    del y, x, head
    for data, error in ((flat, "no content"), (headed, None)):
        tracemalloc.start()
        try:
            r = PRE.try_slices(data, guard=GUARD)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert (r.error or "").startswith(error or "") and bool(r.slices) == (error is None), r.error
        assert peak < 3 * side * side, (error, peak / side / side)
