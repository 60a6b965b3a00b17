"""Generators of good and bad image files for the tests (no test here)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from braintumor_ray.imaging import render_mri


def jpeg_bytes(pixels: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(buf, format="PNG")
    return buf.getvalue()


def head(label: str = "glioma", seed: int = 0, size: int = 160):
    return render_mri(label, np.random.default_rng(seed), size)


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims a huge greyscale image (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the decoder must never get here
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files(good_jpeg: bytes) -> dict[str, bytes]:
    """name -> bytes of files the ingest must refuse, one per kind of bad input."""
    sos = good_jpeg.index(b"\xff\xda")
    return {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "corrupt_header.jpg": good_jpeg[:20] + b"\x00" * 200 + good_jpeg[220:],
        "header_only.jpg": good_jpeg[: sos + 12],
        "empty.jpg": b"",
        "notes.jpg": b"this is a text file, not an image\n" * 10,
        "bomb.png": png_bomb(),
    }


def odd_but_valid(pixels: np.ndarray) -> dict[str, bytes]:
    """name -> bytes of valid images in awkward formats (16-bit, RGBA, CMYK) of ``pixels``."""
    p16 = Image.fromarray(pixels.astype(np.uint16) * 16)  # 12-bit data in a 16-bit PNG
    rgba = Image.fromarray(np.dstack([pixels] * 3 + [np.full_like(pixels, 255)]), "RGBA")
    cmyk = Image.fromarray(pixels).convert("RGB").convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    return {"sixteen_bit.png": png_bytes(p16), "rgba.png": png_bytes(rgba), "cmyk.jpg": buf.getvalue()}
