"""Multi-page TIFF, GIF, WebP and APNG files: one scoring row per page (slice_index = page), never
a silent first page; the ingest refuses them with the reason; guard.max_slices caps the pages (a GIF
of 100,000 frames is refused without decoding them all) and DICOM frames and NIfTI slices too.
Pure reader and batch tests: no Ray."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from braintumor_ray import MRIPreprocess
from braintumor_ray.imaging import InputGuard, encode_png, image_pages
from braintumor_ray.ingest._run import preprocess_batch
from braintumor_ray.score import decode_batch

from generators.hostile_frames import many_page_gif, multi_page
from generators.medical import dicom_bytes, head12, nifti_bytes

PRE = MRIPreprocess(image_size=64)
GUARD = InputGuard()
KINDS = ("TIFF", "GIF", "WEBP", "PNG")  # PNG with save_all: APNG


@pytest.mark.parametrize("kind", KINDS)
def test_each_page_is_a_slice_of_its_own(kind):
    data = multi_page(kind, 3)
    im = Image.open(io.BytesIO(data))
    assert im.format == kind and im.n_frames == 3
    r = PRE.try_slices(data, name=f"stack.{kind.lower()}", guard=GUARD)
    assert r.error is None, r.error
    assert [s.info.slice_index for s in r.slices] == [0, 1, 2]
    assert not np.array_equal(r.slices[0].image.pixels, r.slices[1].image.pixels)  # page 2 is not page 1 again
    if kind != "GIF":  # lossless pages: each one is exactly that page read on its own
        for k in range(3):
            im.seek(k)
            alone = PRE.try_slices(encode_png(np.asarray(im.convert("L"))), guard=GUARD).slices[0].image.pixels
            assert np.array_equal(r.slices[k].image.pixels, alone), (kind, k)
    # A one-page file of the same kind is one slice without an index, as before.
    (one,) = PRE.try_slices(multi_page(kind, 1), guard=GUARD).slices
    assert one.info.slice_index is None


def test_scoring_rows_one_per_page_and_the_ingest_refuses():
    files = {f"in/stack.{k.lower()}": multi_page(k, 3) for k in KINDS}
    batch = pa.table({"path": list(files), "bytes": list(files.values())})
    rows = decode_batch(batch, preprocess=PRE, guard=GUARD).to_pylist()
    assert sorted((r["path"], r["slice_index"], r["status"]) for r in rows) == sorted(
        (p, k, "ok") for p in files for k in range(3))
    rows = preprocess_batch(batch, preprocess=PRE, guard=GUARD).to_pylist()
    assert len(rows) == 4 and all(r["outcome"] == "error" for r in rows), rows
    for r in rows:
        kind = r["path"].rsplit(".", 1)[1].upper()
        assert r["error"] == (f"a multi-page {kind}: only single-page images are taken here (reading page one alone "
                              "would drop the others silently); split it into one file per page"), r["error"]


def test_pages_are_capped_before_they_are_decoded():
    gif = many_page_gif(100_000)
    assert len(gif) < 2_000_000
    r = PRE.try_slices(gif, guard=GUARD)
    assert not r.slices and r.error == ("too many images: a GIF of more than 4,096 pages, over the limit "
                                        "guard.max_slices=4,096 (raise guard.max_slices if such files are genuine, "
                                        "or split the file)"), r.error
    # The pages read are counted as they go: a small cap stops after that many.
    seen = []
    with pytest.raises(Exception, match="more than 5 pages"):
        for image, _ in image_pages(gif, guard=InputGuard(max_slices=5)):
            seen.append(image.tell())
    assert seen == [0, 1, 2, 3, 4]
    # An APNG declares its frame count (acTL): refused on it before any page is decoded.
    r = PRE.try_slices(multi_page("PNG", 6), guard=InputGuard(max_slices=5))
    assert r.error.startswith("too many images: a PNG of 6 pages, over the limit guard.max_slices=5"), r.error
    # All pages together are held to guard.max_pixels: 3 pages of 64x64 are 12,288 pixels.
    r = PRE.try_slices(multi_page("TIFF", 3), guard=InputGuard(max_pixels=10_000))
    assert "3 pages up to this 64x64 one = 12,288 pixels, over the limit guard.max_pixels=10,000" in r.error, r.error
    # DICOM frames and NIfTI slices are held to the same cap, on what their headers declare.
    small = InputGuard(max_slices=2, modalities=(), body_parts=())
    r = PRE.try_slices(dicom_bytes(np.stack([head12(i) for i in range(3)])), guard=small)
    assert r.error.startswith("too many images: 3 frames declared, over the limit guard.max_slices=2"), r.error
    vol = np.stack([head12(i) for i in range(3)], axis=-1).astype(np.int16)
    r = PRE.try_slices(nifti_bytes(vol), name="v.nii", guard=small)
    assert "volume of 3 slices, over the limit guard.max_slices=2" in r.error, r.error
    with pytest.raises(Exception, match="max_slices=0 must be at least 1"):
        InputGuard(max_slices=0)
