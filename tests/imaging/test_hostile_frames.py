"""Compressed-frame bombs (JPEG, JPEG lossless, JPEG-LS, JPEG 2000, RLE) are refused on their
frame headers before any pixel is decoded, and legitimate compressed frames still decode.
Pure reader tests: no Ray. The bombs come from tests/generators/hostile_frames.py (the soak uses them too)."""

from __future__ import annotations

import io
import struct
import time

import numpy as np
import pydicom
import pytest
from PIL import Image

from braintumor_ray import MRIPreprocess
from braintumor_ray.imaging import InputGuard, read_medical

from generators.hostile_frames import (
    SIDE,
    _dicom,
    frame_bombs,
    j2k_frame,
    jpeg_frame,
    jpeg_lossless_frame,
    jpeg_ls_frame,
    legit_frames,
    progressive_jpeg,
    rle_frame,
)
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

PRE = MRIPreprocess(image_size=64)
GUARD = InputGuard(modalities=(), body_parts=(), min_contrast=0.0, require_head=False)


@pytest.fixture(scope="module")
def bombs():
    return frame_bombs()


def _hwm_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


@pytest.fixture
def no_decoding(monkeypatch):
    """Any call into pydicom's pixel decoding fails the test: the refusal must come first."""
    import pydicom.pixels

    def refuse(*a, **k):
        raise AssertionError("a pixel decoder was called")

    monkeypatch.setattr(pydicom.pixels, "iter_pixels", refuse)


@pytest.mark.parametrize("name", ["jpeg_bomb.dcm", "jpeg_lossless_bomb.dcm", "jpeg_ls_bomb.dcm", "j2k_bomb.dcm",
                                  "rle_bomb.dcm", "progressive_jpeg_bomb.dcm"])
def test_each_frame_bomb_is_an_error_row_before_decoding(bombs, name, no_decoding):
    data = bombs[name]
    assert len(data) < 4_000_000  # a few KB (RLE: 3 MB)
    before, t = _hwm_mb(), time.perf_counter()
    r = PRE.try_slices(data, name=name, guard=GUARD)
    took, grew = time.perf_counter() - t, _hwm_mb() - before
    assert not r.slices and r.error, r
    assert "pixel decoder was called" not in r.error, r.error
    if name == "rle_bomb.dcm":
        assert "decompression bomb: RLE segment 1 of frame 1" in r.error and "refused before decoding" in r.error
    elif name == "progressive_jpeg_bomb.dcm":  # issue 35: its SOF agrees with the DICOM; 8000 scans cost 124 s
        assert "the JPEG codestream of frame 1 (of 1) holds 8,000 scans" in r.error, r.error
        assert "guard.max_jpeg_scans=100" in r.error and "refused before decoding" in r.error
    else:
        assert f"header of frame 1 (of 1) declares {SIDE}x{SIDE}x1" in r.error and "guard.max_pixels" in r.error, r.error
    assert r.info.sop_instance_uid  # the UIDs read before it failed are kept
    assert took < 1.0 and grew < 50, (took, grew)


@pytest.mark.parametrize("kind, frame, syntax, bits", [
    ("JPEG", jpeg_frame(128), JPEGBaseline8Bit, 8),
    ("JPEG", jpeg_lossless_frame(128), JPEGLosslessSV1, 16),
    ("JPEG-LS", jpeg_ls_frame(128), JPEGLSLossless, 16),
    ("JPEG 2000", j2k_frame(128), JPEG2000Lossless, 8),
])
def test_a_frame_header_that_disagrees_with_the_dicom_is_refused(kind, frame, syntax, bits, no_decoding):
    # Within the guard's limits, but not the 64 x 64 the DICOM declares: a bomb or corruption.
    r = PRE.try_slices(_dicom(frame, syntax, bits=bits), guard=GUARD)
    assert f"the {kind} header of frame 1 (of 1) declares 128x128x1 at {bits} bits" in r.error, r.error
    assert f"Columns x Rows x SamplesPerPixel 64x64x1 at {bits} bits; refused before decoding" in r.error
    # More precision than BitsAllocated holds is refused too.
    if bits == 16:
        r = PRE.try_slices(_dicom(frame.replace(b"\x00\x80\x00\x80", b"\x00\x40\x00\x40"), syntax, bits=8), guard=GUARD)
        assert f"declares 64x64x1 at {bits} bits" in r.error and "at 8 bits; refused before decoding" in r.error, r.error


def test_a_progressive_jpeg_past_the_scan_limit_is_refused_before_decoding(monkeypatch):
    """Issue 35: a plain progressive JPEG of 8000 scans of 8000 x 8000 (278 s and 1.36 GB to decode
    before) is an error row naming guard.max_jpeg_scans; Pillow never decodes a pixel of it. A real
    progressive JPEG (libjpeg's 6 scans) still decodes, and the limit is a setting."""
    from PIL import ImageFile

    bomb = progressive_jpeg(8000, 8000)
    assert len(bomb) < 1_500_000 and Image.open(io.BytesIO(bomb)).size == (8000, 8000)
    load = ImageFile.ImageFile.load

    def refuse(self):
        raise AssertionError("Pillow decoded the image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    before = _hwm_mb()
    r = PRE.try_slices(bomb, name="bomb.jpg", guard=GUARD)
    assert not r.slices and "a JPEG file holds 8,000 scans" in r.error, r.error
    assert "guard.max_jpeg_scans=100" in r.error and "Pillow decoded" not in r.error
    assert _hwm_mb() - before < 50
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8), "L").save(
        buf, format="JPEG", progressive=True)
    real = buf.getvalue()
    assert real.count(b"\xff\xda") > 1  # progressive: several scans
    (s,) = PRE.slices(real, name="real.jpg", guard=GUARD)
    assert s.image.pixels.shape == (64, 64)
    r = PRE.try_slices(real, name="real.jpg", guard=InputGuard(modalities=(), min_contrast=0.0, require_head=False,
                                                               max_jpeg_scans=2))
    assert not r.slices and "guard.max_jpeg_scans=2" in r.error, r.error


def test_rle_segment_count_and_garbage_headers_are_refused(no_decoding):
    two = struct.pack("<16I", 2, 64, 84, *[0] * 13) + b"\x81\x00" * 20
    r = PRE.try_slices(_dicom(two, RLELossless), guard=GUARD)
    assert "its RLE header declares 2 segments, but SamplesPerPixel 1 x BitsAllocated 8 / 8 need 1" in r.error, r.error
    backwards = struct.pack("<16I", 2, 64, 40, *[0] * 13) + b"\x81\x00" * 20
    r = PRE.try_slices(_dicom(backwards, RLELossless, bits=16), guard=GUARD)
    assert "its RLE segment offsets are out of order or outside the frame" in r.error, r.error
    r = PRE.try_slices(_dicom(rle_frame(8), RLELossless, bits=16), guard=GUARD)
    assert "its RLE header declares 1 segments, but SamplesPerPixel 1 x BitsAllocated 16 / 8 need 2" in r.error, r.error
    r = PRE.try_slices(_dicom(b"not a jpeg at all" * 4, JPEGBaseline8Bit), guard=GUARD)
    assert "frame 1 (of 1) cannot be checked before decoding: it does not start with a JPEG" in r.error, r.error
    r = PRE.try_slices(_dicom(b"\xff\x4f\xff\x51" + b"\0" * 8, JPEG2000Lossless), guard=GUARD)
    assert "its JPEG 2000 SIZ marker is cut short" in r.error, r.error


def test_legitimate_compressed_frames_pass_the_check_and_decode():
    for name, data in legit_frames().items():
        (s,) = read_medical(data, "dicom", guard=GUARD)
        assert s.gray.shape == (64, 64) and s.gray.std() > 10, name
    # Three J2K frames: every frame's header is read, all pass.
    assert len(read_medical(_dicom(j2k_frame(), JPEG2000Lossless, frames=3), "dicom", guard=GUARD)) == 3
    # A J2K frame inside a JP2 file: the codestream box is found.
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 7, np.uint8), "L").save(buf, format="JPEG2000")
    assert buf.getvalue()[4:8] == b"jP  "
    from braintumor_ray.imaging._frames import j2k_header

    h = j2k_header(buf.getvalue())
    assert (h.rows, h.cols, h.samples, h.bits) == (64, 64, 1, 8)
    # A JPEG-LS header that matches goes on to the decoder (which finds the garbage data).
    r = PRE.try_slices(_dicom(jpeg_ls_frame(64), JPEGLSLossless, bits=16), guard=GUARD)
    assert "refused before decoding" not in r.error and "corrupt or truncated DICOM pixel data" in r.error, r.error
    # The legit RLE frames pydicom writes pass (tests/imaging/test_dicom.py decodes them); a 3-sample one too.
    rgb = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    ds = pydicom.dcmread(io.BytesIO(_dicom(rle_frame(1), RLELossless, rows=32, cols=32, samples=3)))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.PixelData = rgb.tobytes()
    ds["PixelData"].VR = "OB"
    ds.compress(RLELossless, rgb)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    (s,) = read_medical(out.getvalue(), "dicom", guard=GUARD)
    assert s.gray.shape == (32, 32)
