"""The compressed-frame header budget: what each encapsulated DICOM frame will decode to, read
from the frame's own header and checked before any pixel is decoded.

A DICOM's Rows x Columns x SamplesPerPixel is checked against the guard on the dataset header
(``dicom_size_error``), but a codec decodes what its *codestream* declares: a JPEG 2000 frame
whose SIZ marker says 30000x30000 in a file that says 64x64 is decoded in full by OpenJPEG (a
3.4 MB file cost 17 s and +2.4 GB RSS before this check; docs/lab-log.md), and an RLE segment
can expand 64-fold. So each frame's header is read here and must declare exactly the image the
dataset declares (within the guard's limits):

- JPEG (baseline, extended, progressive, lossless: SOF0..SOF15) and JPEG-LS (SOF55): the frame
  header's precision, lines, samples per line and components;
- JPEG 2000 and HTJ2K (a bare codestream or a JP2 file): the SIZ marker's image extent
  (Xsiz - XOsiz, Ysiz - YOsiz), its components and their largest precision;
- RLE: the segment count must be SamplesPerPixel x BitsAllocated / 8 (PS3.5 G.5), and each
  segment's output, counted from its run headers without writing any, at most Rows x Columns.

Written here rather than borrowed: pydicom's JPEG/JPEG-LS header reader is private
(``pydicom.pixels.utils._get_jpg_parameters``, an empty dict on any parse failure) and its public
``get_j2k_parameters`` gives the precision only, not the size; Pillow's lazy ``Image.open`` reads
the JPEG SOF and the J2K SIZ size without decoding, but not JPEG-LS, refuses J2K component
layouts it cannot represent, and applies its own global 179 Mpx bomb limit. Each parser is a few
lines of fixed offsets from the standards (ITU-T T.81 B.2.2, ISO/IEC 15444-1 A.5.1, T.87 C.2.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ._guard import InputGuard, MedicalDecodeError, SliceInfo

RLE_TS = "1.2.840.10008.1.2.5"
# An RLE segment may decode to a little more than Rows x Columns: a run or literal that crosses
# the last row's end (lenient decoders drop the excess).
_RLE_SLACK = 128
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_LS_SOF = 0xF7


@dataclass(frozen=True)
class FrameHeader:
    """What one compressed frame's own header says it decodes to."""

    codec: str  # "JPEG", "JPEG-LS", "JPEG 2000", "RLE"
    rows: int
    cols: int
    samples: int
    bits: int  # the largest precision of any component (RLE: BitsAllocated, the segments checked)


class _Bad(Exception):
    """A frame header that cannot be read: the message says what is wrong with it."""


def jpeg_header(frame: bytes) -> FrameHeader:
    """The frame header (SOFn or the JPEG-LS SOF55) of a JPEG or JPEG-LS codestream."""
    if frame[:2] != b"\xff\xd8":
        raise _Bad("it does not start with a JPEG start-of-image marker")
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            raise _Bad("a JPEG marker segment is corrupt before the frame header")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xDA, 0xD9):
            raise _Bad("its JPEG scan starts before any frame header (SOF)")
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if marker in _JPEG_SOF or marker == _JPEG_LS_SOF:
            if length < 8 or pos + 10 > len(frame):
                raise _Bad("its JPEG frame header (SOF) is cut short")
            precision = frame[pos + 4]
            rows, cols = struct.unpack_from(">HH", frame, pos + 5)
            return FrameHeader("JPEG-LS" if marker == _JPEG_LS_SOF else "JPEG", rows, cols, frame[pos + 9], precision)
        if length < 2:
            raise _Bad("a JPEG marker segment declares a length under 2")
        pos += 2 + length
    raise _Bad("no JPEG frame header (SOF) before the data ends")


def j2k_header(frame: bytes) -> FrameHeader:
    """The SIZ marker of a JPEG 2000 (or HTJ2K) codestream, bare or inside a JP2 file."""
    pos = 0
    if frame[:8] == b"\x00\x00\x00\x0cjP  ":
        pos, found = 0, False
        while pos + 8 <= len(frame):
            length, box = struct.unpack_from(">I4s", frame, pos)
            head = 8
            if length == 1:
                if pos + 16 > len(frame):
                    break
                length, head = struct.unpack_from(">Q", frame, pos + 8)[0], 16
            if box == b"jp2c":
                pos, found = pos + head, True
                break
            if length < head:
                break
            pos += length
        if not found:
            raise _Bad("its JP2 file holds no codestream box (jp2c)")
    if frame[pos : pos + 4] != b"\xff\x4f\xff\x51":
        raise _Bad("it does not start with a JPEG 2000 SOC and SIZ marker")
    if pos + 42 > len(frame):
        raise _Bad("its JPEG 2000 SIZ marker is cut short")
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frame, pos + 8)
    (csiz,) = struct.unpack_from(">H", frame, pos + 40)
    if csiz < 1 or pos + 42 + 3 * csiz > len(frame) or xsiz <= xo or ysiz <= yo:
        raise _Bad("its JPEG 2000 SIZ marker is corrupt (no components, or an empty image extent)")
    bits = max((frame[pos + 42 + 3 * c] & 0x7F) + 1 for c in range(csiz))
    return FrameHeader("JPEG 2000", ysiz - yo, xsiz - xo, csiz, bits)


def rle_segments(frame: bytes) -> list[memoryview]:
    """The segments an RLE frame's 64-byte header points to (PS3.5 G.5)."""
    if len(frame) < 64:
        raise _Bad("its RLE header is cut short (under 64 bytes)")
    count, *offsets = struct.unpack_from("<16I", frame, 0)
    if not 1 <= count <= 15:
        raise _Bad(f"its RLE header declares {count} segments (1 to 15 are allowed)")
    offsets = offsets[:count] + [len(frame)]
    if offsets[0] != 64 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise _Bad("its RLE segment offsets are out of order or outside the frame")
    view = memoryview(frame)
    return [view[a:b] for a, b in zip(offsets, offsets[1:])]


def rle_segment_length(segment: memoryview, limit: int) -> int:
    """How many bytes a PackBits segment decodes to, counted from its run headers without
    writing any; the count stops once it passes ``limit`` (so the walk is bounded by it too)."""
    n, pos, end = 0, 0, len(segment)
    while pos < end and n <= limit:
        h = segment[pos]
        if h < 128:  # a literal of h + 1 bytes
            n += h + 1
            pos += h + 2
        elif h > 128:  # one byte repeated 257 - h times
            n += 257 - h
            pos += 2
        else:  # 128: no operation
            pos += 1
    return n


def check_frames(
    frames,
    ts: str,
    *,
    rows: int,
    cols: int,
    samples: int,
    allocated: int,
    number_of_frames: int,
    guard: InputGuard,
    info: SliceInfo,
) -> None:
    """Every encapsulated frame's header against the dataset's Rows x Columns x SamplesPerPixel
    and BitsAllocated and the guard's limits; raises MedicalDecodeError naming the frame and the
    cause. ``frames`` yields each frame's bytes (pydicom's ``generate_frames``): nothing is decoded."""
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        read = jpeg_header
    elif ts in JPEG2000TransferSyntaxes:
        read = j2k_header
    elif ts == RLE_TS:
        read = None
    else:
        return  # a syntax without a size in its frame header (MPEG, deflate...): the dataset's own checks hold
    declared = f"{cols}x{rows}x{samples} at {allocated} bits"
    for k, frame in enumerate(frames):
        where = f"frame {k + 1} (of {number_of_frames})"
        if err := (
            guard.too_many_slices(f"{k + 1:,} frames in the pixel data", k + 1)
            or guard.too_many_pixels(f"{k + 1} frame(s) of {cols}x{rows}x{samples}", (k + 1) * rows * cols * samples)
        ):
            raise MedicalDecodeError(err + f" ({where}: the pixel data holds more frames than declared)", info)
        try:
            if read is None:
                _check_rle(frame, rows, cols, samples, allocated, where, info)
                continue
            h = read(frame)
        except _Bad as e:
            raise MedicalDecodeError(
                f"corrupt DICOM pixel data: {where} cannot be checked before decoding: {e} (re-export the file)", info
            ) from None
        if read is jpeg_header and (err := guard.too_many_jpeg_scans(f"the {h.codec} codestream of {where}", frame)):
            raise MedicalDecodeError(err, info)
        got = f"{h.cols}x{h.rows}x{h.samples} at {h.bits} bits"
        if err := guard.too_many_pixels(
            f"the {h.codec} header of {where} declares {h.cols}x{h.rows}x{h.samples}", h.rows * h.cols * h.samples
        ):
            raise MedicalDecodeError(err, info)
        if (h.rows, h.cols, h.samples) != (rows, cols, samples) or h.bits > allocated:
            raise MedicalDecodeError(
                f"decompression bomb or corrupt file: the {h.codec} header of {where} declares {got}, but the DICOM header "
                f"declares Columns x Rows x SamplesPerPixel {declared}; refused before decoding (re-export the file)",
                info,
            )


def _check_rle(frame: bytes, rows: int, cols: int, samples: int, allocated: int, where: str, info: SliceInfo) -> None:
    if allocated % 8:
        raise _Bad(f"RLE needs BitsAllocated a multiple of 8, not {allocated}")
    segments = rle_segments(frame)
    want = samples * allocated // 8
    if len(segments) != want:
        raise _Bad(
            f"its RLE header declares {len(segments)} segments, but SamplesPerPixel {samples} x "
            f"BitsAllocated {allocated} / 8 need {want}"
        )
    limit = rows * cols + _RLE_SLACK
    for s, seg in enumerate(segments):
        if rle_segment_length(seg, limit) > limit:
            raise MedicalDecodeError(
                f"decompression bomb: RLE segment {s + 1} of {where} decodes to more than the {rows * cols:,} bytes "
                f"its Columns x Rows ({cols}x{rows}) allow; refused before decoding (re-export the file)",
                info,
            )
