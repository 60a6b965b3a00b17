"""DICOM files -> 8-bit grey frames (one :class:`GreySlice` a frame), the guard checked first.

Pixel values: the Modality LUT (Rescale Slope/Intercept) first; then the file's first VOI window
(Window Center/Width, with its VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID) as DICOM PS3.3
C.11.2.1.2 defines it; with no usable window, a robust window from the 0.5 and 99.5 percentiles of
the file's own pixels; MONOCHROME1 is inverted after windowing. Colour files (RGB, YBR, palette)
become luma. Compressed transfer syntaxes are decoded by whatever decoder pydicom finds installed;
one it cannot decode is an error naming the syntax.

Privacy: no tag value is ever quoted (a malformed UID field is dropped, not copied), pydicom's
warnings are silenced while it reads, and its logger does not reach the jobs' handlers.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from typing import Any

import numpy as np

from ._frames import check_frames
from ._guard import GreySlice, InputGuard, MedicalDecodeError, SeriesSelector, SliceInfo, dicom_size_error, with_slice
from ._inflate import DEFLATED_TS, dicom_meta, read_deflated
from ._window import _frames_sample, _luma, _percentile_levels, _stretch, _to_u8, voi_window

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Text VRs whose values may identify a patient; scrubbed from any message that quotes a
# decoder's own words.
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
# A multi-frame stack is kept between the two passes of the percentile window up to this size
# (float64 values); larger ones are decoded twice instead of held.
_KEEP_FRAMES_BYTES = 64 * 2**20

_quieted = False


def _pydicom():
    global _quieted
    import pydicom
    from pydicom import config

    if not _quieted:
        # pydicom's log lines quote element values (a name that fails to decode, say): they
        # must not reach the jobs' handlers and from there the logs.
        logging.getLogger("pydicom").propagate = False
        # Reading is lenient and silent: a value that breaks its VR's rules is not our concern
        # (we read only UIDs and pixel attributes), and the warning would quote it.
        config.settings.reading_validation_mode = config.IGNORE
        _quieted = True
    return pydicom


def _uid(ds: Any, keyword: str) -> str | None:
    """A UID attribute's value when it is a well-formed UID; anything else is not copied out."""
    try:
        v = ds.get(keyword)
        s = str(v).strip().rstrip("\x00") if v is not None else ""
    except Exception:
        return None
    return s if s and len(s) <= 64 and _UID.match(s) else None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return int(v) if v is not None and str(v).strip() != "" else None
    except Exception:
        return None


def _first_float(v: Any) -> float | None:
    try:
        if v is None:
            return None
        if not isinstance(v, (str, bytes)) and hasattr(v, "__len__"):
            v = v[0] if len(v) else None
        return None if v is None else float(v)
    except Exception:
        return None


def _dicom_orientation(ds: Any) -> str | None:
    """The plane closest to Image Orientation (Patient): the axis its normal points along most."""
    try:
        value = ds.get("ImageOrientationPatient")
        if value is None and "SharedFunctionalGroupsSequence" in ds:  # enhanced (multi-frame) objects
            value = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
        iop = [float(v) for v in value or []]
    except Exception:
        return None
    if len(iop) != 6:
        return None
    normal = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    if not np.all(np.isfinite(normal)) or np.linalg.norm(normal) < 1e-6:
        return None
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]  # patient x, y, z


def _scrub(message: str, ds: Any) -> str:
    """A decoder's own message with every text value of ``ds`` blanked out, in case it quotes one."""
    from pydicom.multival import MultiValue

    try:
        values = set()
        for elem in ds.iterall():
            if elem.VR in _TEXT_VRS and elem.value not in (None, ""):
                vals = list(elem.value) if isinstance(elem.value, (list, tuple, MultiValue)) else [elem.value]
                for v in vals:
                    s = str(v).strip()
                    if len(s) >= 3:
                        values.add(s)
                        values.update(p for p in re.split(r"[\^=]", s) if len(p) >= 3)
        for v in sorted(values, key=len, reverse=True):
            message = message.replace(v, "[redacted]")
    except Exception:
        return "(message withheld)"
    return message


def read_dicom(data: bytes, *, select: SeriesSelector, guard: InputGuard) -> list[GreySlice]:
    """A DICOM file's frames as 8-bit greyscale slices: parsed within the guard's budgets, refused
    (with its UIDs kept) when the guard or the selector leaves it out, when it holds no pixels or
    its frames cannot be decoded here."""
    ds = _parse(data, guard)
    info = SliceInfo(
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        instance_number=_int(ds, "InstanceNumber"),
    )
    try:
        modality = str(ds.get("Modality") or "").strip().upper() or None
        description = str(ds.get("SeriesDescription") or "") or None
        body_part = str(ds.get("BodyPartExamined") or "").strip().upper() or None
    except Exception:
        modality = description = body_part = None
    guard.check_dicom(modality, body_part, info)
    select.check_dicom(modality, description, _dicom_orientation(ds), info)
    ts, ts_name = _decodable(ds, info)

    rows, cols, frames = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0, _int(ds, "NumberOfFrames") or 1
    samples, allocated = _int(ds, "SamplesPerPixel") or 1, _int(ds, "BitsAllocated") or 8
    if err := dicom_size_error(rows, cols, frames, samples, allocated, guard):
        raise MedicalDecodeError(err, info)
    if ts.is_encapsulated and "PixelData" in ds:
        _check_encapsulated(ds, str(ts), ts_name, rows, cols, frames, samples, allocated, guard, info)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated") or 0
    try:
        out = _frames_u8(ds, photometric, bits, frames, rows * cols)
    except Exception as e:
        raise MedicalDecodeError(
            f"corrupt or truncated DICOM pixel data ({ts_name}): {type(e).__name__}: {_scrub(str(e), ds)}", info
        ) from None
    if not out:
        raise MedicalDecodeError(f"corrupt or truncated DICOM pixel data ({ts_name}): no frames", info)
    mode = f"DICOM {photometric} {bits}-bit"
    if len(out) == 1:
        return [GreySlice(out[0], mode, info)]
    return [GreySlice(u8, mode, with_slice(info, k)) for k, u8 in enumerate(out)]


def _parse(data: bytes, guard: InputGuard) -> Any:
    """The dataset, its pixel data not yet decoded; a deflated one inflated within its budget."""
    pydicom = _pydicom()
    meta_start, meta_end, meta_ts = dicom_meta(data)
    # pydicom inflates a deflated dataset whole, before anything can be checked: such files are
    # inflated here, within the budget their header allows.
    deflated = meta_ts == DEFLATED_TS or (meta_ts is None and DEFLATED_TS.encode() in bytes(data[:4096]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if deflated:
                return read_deflated(data, meta_start, meta_end, guard)
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.get("PixelData")  # pydicom reads lazily: a cut-off file fails here or below, not later
            return ds
    except MedicalDecodeError:
        raise
    except Exception as e:
        # Only the exception's type: a parse error's text may quote the bytes it choked on.
        what = "empty file (0 bytes)" if not data else "truncated or corrupt DICOM: its header cannot be parsed"
        raise MedicalDecodeError(f"{what} ({type(e).__name__})") from None


def _decodable(ds: Any, info: SliceInfo) -> tuple[Any, str]:
    """(transfer syntax, its name for messages) of a dataset that holds pixels this machine can
    decode; otherwise why not, as an error."""
    from pydicom.uid import UID

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        # pydicom stops quietly where a cut-off file ends, so a file cut before its pixels reads
        # as one without: an image object (or nothing at all) with no pixels is called truncated.
        if len(ds) == 0:
            raise MedicalDecodeError("truncated or corrupt DICOM: nothing after the file meta header", info)
        sop_class = _uid(ds, "SOPClassUID") or _uid(ds.get("file_meta", {}), "MediaStorageSOPClassUID")
        name = UID(sop_class).name if sop_class else "unknown SOP class"
        if "Image Storage" in name or "Rows" in ds:
            raise MedicalDecodeError(
                f"DICOM file has no pixel data: an image object ({name}) without any, truncated or corrupt", info
            )
        raise MedicalDecodeError(f"DICOM file has no pixel data: not an image object ({name})", info)
    ts = UID(_uid(ds.get("file_meta", {}), "TransferSyntaxUID") or "1.2.840.10008.1.2")
    ts_name = f"transfer syntax {ts} ({ts.name})" if ts.name != str(ts) else f"transfer syntax {ts}"
    if ts.is_compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise MedicalDecodeError(f"{ts_name} cannot be decoded: pydicom has no decoder for it", info) from None
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
            raise MedicalDecodeError(f"{ts_name} cannot be decoded here: install one of: {needs}", info)
    return ts, ts_name


def _frames_u8(ds: Any, photometric: str, bits: int, frames: int, pixels: int) -> list[np.ndarray]:
    """Each frame as 8-bit grey: the file's own VOI window, else a percentile window over all
    frames; colour as luma."""
    grey = (
        photometric.startswith("MONOCHROME")
        or (_int(ds, "SamplesPerPixel") or 1) == 1
        and photometric != "PALETTE COLOR"
    )
    window = _file_window(ds) if grey else None
    stretch = (grey and window is None) or (not grey and bits > 8)  # a percentile window over all frames

    def values():
        """Each frame's values (modality LUT applied, or luma), decoded one frame at a time."""
        from pydicom.pixels import apply_color_lut, apply_modality_lut, iter_pixels

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for arr in iter_pixels(ds):
                if photometric == "PALETTE COLOR":
                    arr = apply_color_lut(arr, ds)
                yield np.asarray(apply_modality_lut(arr, ds), dtype=np.float64) if grey else _luma(np.asarray(arr))

    source = values()
    levels = None
    if stretch:
        # Two passes, the first for the levels; small stacks are kept rather than decoded twice.
        keep = frames * pixels * 8 <= _KEEP_FRAMES_BYTES
        first = list(source) if keep else values()
        levels = _percentile_levels(_frames_sample(first, frames, pixels))
        source = iter(first) if keep else values()
    out = []
    for v in source:
        if grey:
            u8 = voi_window(v, *window) if window else _stretch(v, levels)
            out.append(255 - u8 if photometric == "MONOCHROME1" else u8)
        else:
            out.append(_stretch(v, levels) if bits > 8 else _to_u8(v))
    return out


def _check_encapsulated(
    ds: Any,
    ts: str,
    ts_name: str,
    rows: int,
    cols: int,
    frames: int,
    samples: int,
    allocated: int,
    guard: InputGuard,
    info: SliceInfo,
) -> None:
    """Each compressed frame's own header against the dataset and the guard, before decoding
    (``_frames``): the codec decodes what its codestream declares, not what Rows x Columns say."""
    from pydicom.encaps import generate_frames

    ext = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        ext = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The same split into frames that pydicom's decoders make (iter_pixels).
            split = generate_frames(ds.PixelData, number_of_frames=frames, extended_offsets=ext)
            check_frames(
                split,
                ts,
                rows=rows,
                cols=cols,
                samples=samples,
                allocated=allocated,
                number_of_frames=frames,
                guard=guard,
                info=info,
            )
    except MedicalDecodeError:
        raise
    except Exception as e:
        raise MedicalDecodeError(
            f"corrupt or truncated DICOM pixel data ({ts_name}): its encapsulated frames cannot "
            f"be split ({type(e).__name__})",
            info,
        ) from None


def _file_window(ds: Any) -> tuple[float, float, str] | None:
    """The file's first VOI window (center, width, function), or None when it has no usable one."""
    center, width = _first_float(ds.get("WindowCenter")), _first_float(ds.get("WindowWidth"))
    if center is None or width is None or not np.isfinite(center) or not np.isfinite(width):
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if width < (1 if function == "LINEAR" else 1e-9):
        return None
    return center, width, function
