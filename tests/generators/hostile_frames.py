"""Compressed-frame bombs and multi-page files, generated (no file is stored): the tests
(tests/imaging/test_hostile_frames.py, test_multipage.py), the soak and the decode-cost benchmark
(benchmarks/hostile_frames.py) build their hostile inputs here.

Each bomb is a small DICOM that says Rows x Columns = 64 x 64 while its one encapsulated frame's
own header declares ``side`` x ``side``: JPEG baseline (a real 64 x 64 JPEG whose SOF0 is
patched), JPEG lossless (SOF3) and JPEG-LS (SOF55) headers over garbage entropy data, JPEG 2000 (a
real 64 x 64 codestream whose SIZ is patched), and an RLE frame whose one segment is PackBits runs
that expand 64-fold (3 MB to 192 MB); a progressive JPEG frame of 8000 scans whose header agrees
with its 8000 x 8000 DICOM, and two plain files (:func:`image_bombs`).
"""

from __future__ import annotations

import io
import struct

import numpy as np

SIDE = 30000  # what the tests' bombs declare: 900 M pixels, refused on the header alone
PROGRESSIVE_SIDE = 8000  # the progressive-JPEG bomb's side, its DICOM's Rows x Columns alike
RLE_RUNS = 1_500_000  # 2 bytes each: 3 MB of segment that decodes to 192 MB


def _dicom(frame: bytes, syntax: str, *, rows: int = 64, cols: int = 64, bits: int = 8, samples: int = 1,
           frames: int = 1) -> bytes:
    """A part-10 MR DICOM with ``frames`` copies of ``frame`` encapsulated under ``syntax``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "MR", rows, cols
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = encapsulate([frame] * frames)
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _gradient(side: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:side, 0:side]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)


def jpeg_frame(side: int | None = None) -> bytes:
    """A real 64 x 64 greyscale baseline JPEG; with ``side``, its SOF0 declares side x side."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_gradient(), "L").save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    if side is not None:
        at = data.index(b"\xff\xc0")
        struct.pack_into(">HH", data, at + 5, side, side)
    return bytes(data)


def progressive_jpeg(scans: int = 8000, side: int | None = None) -> bytes:
    """A progressive greyscale JPEG (libjpeg's own 64 x 64 of :func:`_gradient`) whose last scan
    (an AC refinement; the Huffman table defined before it stays in force) is repeated until the
    file holds ``scans`` scans;
    with ``side``, its SOF2 declares side x side, so that each scan is a pass over that many
    pixels. libjpeg decodes every repeated scan (a warning, not an error): 8000 scans of 8000 x
    8000 is the issue-35 bomb (80 KB in a DICOM, 124 s to decode)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_gradient(), "L").save(buf, format="JPEG", quality=90, progressive=True)
    data = buf.getvalue()
    last = data.rindex(b"\xff\xda")
    have = data.count(b"\xff\xda")
    out = bytearray(data[:-2] + data[last:-2] * max(0, scans - have) + b"\xff\xd9")
    if side is not None:
        at = out.index(b"\xff\xc2")
        struct.pack_into(">HH", out, at + 5, side, side)
    return bytes(out)


def _sof_only(marker: int, side: int, precision: int) -> bytes:
    """SOI, a frame header (``marker``: 0xC3 lossless, 0xF7 JPEG-LS) for one side x side
    component, a scan header and 4 KB of entropy-coded garbage, EOI."""
    sof = struct.pack(">BBHBHHBBBB", 0xFF, marker, 11, precision, side, side, 1, 1, 0x11, 0)
    sos = struct.pack(">BBHBBBBBB", 0xFF, 0xDA, 8, 1, 1, 0, 1, 0, 0)
    return b"\xff\xd8" + sof + sos + bytes(range(1, 255)) * 16 + b"\xff\xd9"


def jpeg_lossless_frame(side: int = 64) -> bytes:
    return _sof_only(0xC3, side, 16)


def jpeg_ls_frame(side: int = 64) -> bytes:
    return _sof_only(0xF7, side, 16)


def j2k_frame(side: int | None = None) -> bytes:
    """A real 64 x 64 greyscale JPEG 2000 codestream (Pillow's OpenJPEG); with ``side``, its SIZ
    declares side x side (image and tile), the one tile's data left as it is."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_gradient(), "L").save(buf, format="JPEG2000", no_jp2=True, irreversible=False)
    data = bytearray(buf.getvalue())
    if side is not None:
        assert data[:4] == b"\xff\x4f\xff\x51"
        struct.pack_into(">II", data, 8, side, side)  # Xsiz, Ysiz
        struct.pack_into(">II", data, 24, side, side)  # XTsiz, YTsiz: one tile, as written
    return bytes(data)


def rle_frame(runs: int = RLE_RUNS) -> bytes:
    """One RLE segment of ``runs`` PackBits runs of 128 zeros: 2 bytes each, 64-fold expansion."""
    return struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * runs


def real_frame(kind: str, side: int) -> bytes:
    """A real side x side black JPEG or JPEG 2000 (lossless) codestream: every byte of it valid,
    so a decoder decodes all of it (8000 x 8000: 0.7 MB as JPEG, 336 bytes as J2K)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (side, side), 0).save(buf, format=kind, **({"no_jp2": True} if kind == "JPEG2000" else {}))
    return buf.getvalue()


def frame_bombs(side: int = SIDE, *, real_side: int | None = None) -> dict[str, bytes]:
    """{name: DICOM bytes}: one bomb of each kind, each file a few KB (RLE: 3 MB); with
    ``real_side``, also a JPEG and a J2K frame really encoded at that size (slow to make)."""
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

    real = {} if real_side is None else {
        "jpeg_real_bomb.dcm": _dicom(real_frame("JPEG", real_side), JPEGBaseline8Bit),
        "j2k_real_bomb.dcm": _dicom(real_frame("JPEG2000", real_side), JPEG2000Lossless),
    }
    return {**real,
        "jpeg_bomb.dcm": _dicom(jpeg_frame(side), JPEGBaseline8Bit),
        "jpeg_lossless_bomb.dcm": _dicom(jpeg_lossless_frame(side), JPEGLosslessSV1, bits=16),
        "jpeg_ls_bomb.dcm": _dicom(jpeg_ls_frame(side), JPEGLSLossless, bits=16),
        "j2k_bomb.dcm": _dicom(j2k_frame(side), JPEG2000Lossless),
        "rle_bomb.dcm": _dicom(rle_frame(), RLELossless),
        # A frame whose header agrees with the DICOM (8000 x 8000), but of 8000 scans (issue 35).
        "progressive_jpeg_bomb.dcm": _dicom(progressive_jpeg(8000, PROGRESSIVE_SIDE), JPEGBaseline8Bit,
                                            rows=PROGRESSIVE_SIDE, cols=PROGRESSIVE_SIDE),
    }


def legit_frames() -> dict[str, bytes]:
    """The same kinds, their headers matching the DICOM: JPEG and J2K decode."""
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    return {"jpeg.dcm": _dicom(jpeg_frame(), JPEGBaseline8Bit), "j2k.dcm": _dicom(j2k_frame(), JPEG2000Lossless)}


def multi_page(kind: str, pages: int, side: int = 64) -> bytes:
    """A ``kind`` (TIFF, GIF, WEBP, PNG = APNG) file of ``pages`` distinct MRI-like pages."""
    from PIL import Image

    from braintumor_ray.imaging import render_mri

    rng = np.random.default_rng(pages)
    first = Image.fromarray(render_mri("glioma", rng, side)[0], "L")
    rest = [Image.fromarray(render_mri("meningioma", rng, side)[0], "L") for _ in range(min(pages, 8) - 1)]
    rest = [rest[k % len(rest)] if rest else first for k in range(pages - 1)]
    buf = io.BytesIO()
    extra = {"lossless": True} if kind == "WEBP" else {}
    if kind == "GIF":
        first, rest = first.convert("P"), [r.convert("P") for r in rest]
    first.save(buf, format=kind, save_all=True, append_images=rest, duration=40, **extra)
    return buf.getvalue()


def many_page_gif(pages: int = 100_000) -> bytes:
    """A GIF of ``pages`` 1x1 frames, hand-made (Pillow merges identical frames when it writes):
    17 bytes a frame, 1.7 MB for 100,000."""
    header = b"GIF89a\x01\x00\x01\x00\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"  # 1x1, a 2-colour palette
    frame = b",\x00\x00\x00\x00\x01\x00\x01\x00\x00" + b"\x02\x02\x44\x01\x00"  # descriptor, 1 pixel of LZW
    return header + frame * pages + b";"


def image_bombs() -> dict[str, bytes]:
    """Issue 35's plain files: a progressive JPEG of 8000 scans of 8000 x 8000 (278 s and 1.36 GB
    before), and a flat PNG of 11584 x 11584 (134.2 M pixels, just under guard.max_pixels: +1.2 GB
    before, the contrast check's float64 copy of the image)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (11584, 11584), 0).save(buf, format="PNG")
    return {"progressive_jpeg_bomb.jpg": progressive_jpeg(8000, PROGRESSIVE_SIDE), "flat_max_pixels.png": buf.getvalue()}
