"""The budgeted inflaters: gzip and deflate streams inflated within a limit, never past it.

:func:`inflate` holds at most its limit (a bomb stops there); a deflated-transfer-syntax DICOM is
inflated here, not by pydicom (which inflates the whole dataset before anything can be checked),
within the budget its own header allows, the header walked as it is inflated.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from ._guard import InputGuard, MedicalDecodeError, dicom_size_error

# A gzipped NIfTI may hold this much past the end its header declares (padding some writers
# leave); more is a decompression bomb, refused before it is inflated.
NIFTI_GZIP_SLACK = 2**20
# A deflated DICOM may hold max_file_bytes / this outside its pixel data (16 MiB at the default):
# Siemens CSA headers are 10-100 KB, enhanced multi-frame functional groups a few KB a frame.
DICOM_HEADER_SHARE = 16
GZIP_MAGIC = b"\x1f\x8b"
DEFLATED_TS = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_INFLATE_CHUNK = 2**20

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_HEADER_TAGS = {
    0x00280010: "rows",
    0x00280011: "cols",
    0x00280008: "frames",
    0x00280002: "samples",
    0x00280100: "allocated",
}
_UNDEFINED = 0xFFFFFFFF


class _NeedMore(Exception):
    """The header runs past the bytes inflated so far."""


def inflate(data: bytes | memoryview, limit: int, *, raw: bool = False) -> tuple[bytes, bool]:
    """Decompress gzip (every member) or, with ``raw``, a bare deflate stream, holding at most
    ``limit`` + 1 bytes: ``(output, complete)``. The output is longer than ``limit`` when the
    stream holds more (inflating stopped there, the rest never held); ``complete`` is False when
    the input ends before the stream does (truncated). Raises zlib.error on corrupt data.

    Input is fed a MiB at a time and output goes into one growing buffer, so nothing is held
    twice (zlib's own one-shot calls join their output blocks at the end: a second copy).
    """
    out = io.BytesIO()
    view = memoryview(data).cast("B")
    n, start = 0, 0
    wbits = -zlib.MAX_WBITS if raw else 16 + zlib.MAX_WBITS
    while True:  # one gzip member at a time
        d = zlib.decompressobj(wbits)
        fed = start
        tail: bytes | memoryview = b""
        while not d.eof:
            if not tail:
                if fed >= len(view):
                    return out.getvalue(), False
                tail = view[fed : fed + _INFLATE_CHUNK]
                fed += len(tail)
            piece = d.decompress(tail, limit + 1 - n)
            tail = d.unconsumed_tail
            out.write(piece)
            n += len(piece)
            if n > limit:
                return out.getvalue(), True
        end = fed - len(d.unused_data) - len(d.unconsumed_tail)
        # Another member follows, or the stream is done (zero padding and trailing bytes are
        # ignored, as gzip tools do).
        if raw or bytes(view[end : end + 2]) != GZIP_MAGIC:
            return out.getvalue(), True
        start = end


def dicom_meta(data: bytes) -> tuple[int, int, str | None]:
    """(start, end, transfer syntax UID) of the file meta group (0002,xxxx), always explicit VR
    little endian; (start, start, None) when there is none."""
    start = 132 if bytes(data[128:132]) == b"DICM" else 0
    pos, ts = start, None
    try:
        while pos + 8 <= len(data):
            group, elem = struct.unpack_from("<HH", data, pos)
            if group != 2:
                break
            if bytes(data[pos + 4 : pos + 6]) in _LONG_VRS:
                length, head = struct.unpack_from("<I", data, pos + 8)[0], 12
            else:
                length, head = struct.unpack_from("<H", data, pos + 6)[0], 8
            if elem == 0x0010:
                ts = bytes(data[pos + head : pos + head + length]).rstrip(b"\0 ").decode("ascii", "replace")
            pos += head + length
    except struct.error:
        pass
    return start, pos, ts


def read_deflated(data: bytes, meta_start: int, meta_end: int, guard: InputGuard) -> Any:
    """A deflated-transfer-syntax file as a pydicom Dataset, inflated within the budget its own
    header allows: the elements before the pixel data (each, and all of them, at most
    max_file_bytes / DICOM_HEADER_SHARE), the pixel data its Rows x Columns x NumberOfFrames x
    SamplesPerPixel x BitsAllocated declare (within the guard's limits), as much again after it.
    The header is walked as it is inflated, so an oversized element is refused before it is."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    if meta_end <= meta_start:
        raise MedicalDecodeError("truncated or corrupt DICOM: a deflated file whose file meta header cannot be read")
    body = memoryview(data)[meta_end:]
    allowance = guard.max_file_bytes // DICOM_HEADER_SHARE
    pixel_at, pixel_len, found = _inflated_header(body, allowance)

    def number(key: str, default: int) -> int:
        raw = found.get(key)
        try:
            if key == "frames":
                return int(raw.decode("ascii").strip("\0 ")) if raw else default
            return struct.unpack("<H", raw[:2])[0] if raw and len(raw) >= 2 else default
        except (ValueError, UnicodeDecodeError):
            return default

    rows, cols, frames = number("rows", 0), number("cols", 0), number("frames", 1)
    samples, allocated = number("samples", 1), number("allocated", 8)
    if err := dicom_size_error(rows, cols, frames, samples, allocated, guard):
        raise MedicalDecodeError(err)
    declared = (rows * cols * frames * samples * allocated + 7) // 8
    if pixel_at is None:
        budget = allowance
    else:
        assert pixel_len is not None  # _skim_header gives the length with the offset
        if pixel_len != _UNDEFINED and pixel_len > max(declared + 1, allowance):
            raise MedicalDecodeError(
                f"decompression bomb: the pixel data of this deflated DICOM declares {pixel_len:,} bytes, more than the "
                f"{declared:,} its {frames} frame(s) of {cols}x{rows} declare; refused before it is inflated"
            )
        budget = pixel_at + 12 + (declared if pixel_len == _UNDEFINED else pixel_len) + allowance
    try:
        full, complete = inflate(body, budget, raw=True)
    except zlib.error as e:
        raise MedicalDecodeError(f"corrupt deflated DICOM: the deflate stream is damaged ({e})") from None
    if len(full) > budget:
        raise MedicalDecodeError(
            f"decompression bomb: this deflated DICOM inflates past {budget:,} bytes (its header, the pixel data it "
            f"declares and {allowance:,} bytes more: guard.max_file_bytes / {DICOM_HEADER_SHARE}); refused without "
            "inflating the rest"
        )
    if not complete:
        raise MedicalDecodeError("truncated or corrupt DICOM: the deflate stream ends early")
    ds = read_dataset(io.BytesIO(full), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = FileMetaDataset(read_dataset(io.BytesIO(bytes(data[meta_start:meta_end])), False, True))
    ds.set_original_encoding(False, True)
    return ds


def _over_allowance(allowance: int) -> str:
    return (
        f"decompression bomb: this deflated DICOM holds more than the {allowance:,} bytes it may hold outside its "
        f"pixel data (guard.max_file_bytes / {DICOM_HEADER_SHARE}); refused before the rest is inflated (raise "
        "guard.max_file_bytes if such files are genuine)"
    )


def _element(buf: bytes, pos: int, at_end: bool) -> tuple[int, int, int] | None:
    """(tag, value length, header length) of the explicit-VR little-endian element at ``pos``;
    None where the data ends."""
    if pos + 8 > len(buf):
        if at_end:
            return None
        raise _NeedMore
    group, elem = struct.unpack_from("<HH", buf, pos)
    tag = group << 16 | elem
    if group == 0xFFFE:  # items and delimiters carry no VR
        return tag, struct.unpack_from("<I", buf, pos + 4)[0], 8
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            if at_end:
                return None
            raise _NeedMore
        return tag, struct.unpack_from("<I", buf, pos + 8)[0], 12
    if not (vr.isalpha() and vr.isupper()):
        raise MedicalDecodeError("corrupt deflated DICOM: its dataset is not explicit VR little endian")
    return tag, struct.unpack_from("<H", buf, pos + 6)[0], 8


def _inflated_header(body: memoryview, allowance: int) -> tuple[int | None, int | None, dict[str, bytes]]:
    """:func:`_skim_header` of a deflated dataset, inflating more of it (4x a time, up to
    ``allowance``) until its header is all there."""
    want = 2**16
    while True:
        try:
            head, complete = inflate(body, want, raw=True)
        except zlib.error as e:
            raise MedicalDecodeError(f"corrupt deflated DICOM: the deflate stream is damaged ({e})") from None
        try:
            return _skim_header(head, allowance, at_end=complete and len(head) <= want)
        except _NeedMore:
            if want >= allowance + 2**16:
                raise MedicalDecodeError(_over_allowance(allowance)) from None
            want = min(want * 4, allowance + 2**16)


def _skim_header(buf: bytes, allowance: int, *, at_end: bool) -> tuple[int | None, int | None, dict[str, bytes]]:
    """Walk the top-level elements of an inflated dataset up to its pixel data, reading none of
    their values but the few the size check needs: (offset of the pixel data element or None,
    its length, those values). An element longer than ``allowance`` is refused on sight."""
    found: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos > allowance:
            raise MedicalDecodeError(_over_allowance(allowance))
        el = _element(buf, pos, at_end)
        if el is None:
            return None, None, found
        tag, length, head = el
        if tag in _PIXEL_TAGS:
            return pos, length, found
        if length == _UNDEFINED:
            end = _skip_undefined(buf, pos + head, allowance, at_end)
        else:
            if length > allowance:
                raise MedicalDecodeError(
                    f"decompression bomb: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of this deflated DICOM declares "
                    f"{length:,} bytes, over the {allowance:,} it may hold outside its pixel data (guard.max_file_bytes "
                    f"/ {DICOM_HEADER_SHARE}); refused before it is inflated (raise guard.max_file_bytes if such files "
                    "are genuine)"
                )
            end = pos + head + length
            if tag in _HEADER_TAGS:
                if end > len(buf) and not at_end:
                    raise _NeedMore
                found[_HEADER_TAGS[tag]] = bytes(buf[pos + head : end])
        pos = end


def _skip_undefined(buf: bytes, pos: int, allowance: int, at_end: bool) -> int:
    """The offset just past an undefined-length value (a sequence, or encapsulated data) that
    starts at ``pos``: its items are skipped by their lengths, undefined ones walked."""
    while True:
        if pos > allowance:
            raise MedicalDecodeError(_over_allowance(allowance))
        el = _element(buf, pos, at_end)
        if el is None:
            raise MedicalDecodeError("truncated or corrupt DICOM: a sequence in the deflated dataset has no end")
        tag, length, head = el
        pos += head
        if tag == 0xFFFEE0DD:  # sequence delimiter: the end
            return pos
        if tag == 0xFFFEE00D or (tag == 0xFFFEE000 and length == _UNDEFINED):
            continue  # an item's end, or an item whose elements follow one by one
        if length == _UNDEFINED:
            pos = _skip_undefined(buf, pos, allowance, at_end)
        elif length > allowance:
            raise MedicalDecodeError(_over_allowance(allowance))
        else:
            pos += length
