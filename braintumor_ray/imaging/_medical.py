"""DICOM files and NIfTI volumes -> 8-bit greyscale slices, the one place that knows how.

:class:`~braintumor_ray.imaging.MRIPreprocess` calls :func:`read_medical` for every file
that :func:`sniff_kind` does not call a plain image, so the ingest and scoring prepare DICOM
and NIfTI pixels with this very code, then crop and resize them as they do JPEGs.

Pixel values (one rule per fact):

- DICOM: the Modality LUT (Rescale Slope/Intercept) first; then the file's first VOI window
  (Window Center/Width, with its VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID) as DICOM
  PS3.3 C.11.2.1.2 defines it; with no usable window, a robust window from the 0.5 and 99.5
  percentiles of the file's own pixels (:data:`PERCENTILE_WINDOW`); MONOCHROME1 is inverted
  after windowing, so bone and air look the way they do on MONOCHROME2 scans. Colour files
  (RGB, YBR, palette) become luma. Compressed transfer syntaxes are decoded by whatever
  decoder pydicom finds installed; one it cannot decode is an error naming the syntax.
- NIfTI: the header's scl_slope/scl_inter; the window is cal_min/cal_max when the header
  sets it, else the same percentile window over the whole volume. A 3-D volume is cut along
  its last voxel axis (the acquisition's slice axis as scanner converters such as dcm2niix
  write it), slice ``k`` being ``data[:, :, k]``, each shown as a DICOM viewer shows that
  plane: axial with anterior up and the patient's right on the left, coronal with superior
  up and right on the left, sagittal with superior up and anterior on the left.

Privacy: what leaves this module is pixels, UIDs that match the UID grammar, InstanceNumber,
slice positions, and messages written here. No tag value is ever quoted (a malformed UID
field is dropped, not copied), pydicom's warnings are silenced while it reads, and its logger
does not reach the jobs' handlers, because pydicom quotes element values in both.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import Config, ConfigError, ImageDecodeError, setting

logger = logging.getLogger(__name__)

# The robust window when a file names none: these percentiles of its pixels map to 0 and 255.
PERCENTILE_WINDOW = (0.5, 99.5)
# The percentiles of a large volume are taken on an even sample of this many voxels: the same
# window to within a grey level, at a fraction of the time.
_PERCENTILE_SAMPLE = 2_000_000
# A volume may hold this many times ``max_pixels`` voxels in all (one slice is held to
# ``max_pixels`` itself, like an image).
VOLUME_PIXEL_FACTOR = 8

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
ORIENTATIONS = ("axial", "coronal", "sagittal")

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MODALITY = re.compile(r"^[A-Z0-9_]{1,16}$")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"GIF8", b"RIFF")
# Text VRs whose values may identify a patient; scrubbed from any message that quotes a
# decoder's own words.
_TEXT_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}

# Target display directions (RAS letters) of the horizontal and vertical image axes per plane.
_DISPLAY = {"axial": ("L", "P"), "coronal": ("L", "I"), "sagittal": ("P", "I")}
_PLANE_OF_AXIS = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "R": "sagittal", "L": "sagittal"}
_PAIR = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


@dataclass(frozen=True)
class SliceInfo:
    """Where a slice came from, in terms that identify no one: UIDs and positions only."""

    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None
    instance_number: int | None = None
    slice_index: int | None = None  # position along a NIfTI volume's slice axis, or a frame number


NO_INFO = SliceInfo()


@dataclass(frozen=True)
class GreySlice:
    """One slice as 8-bit grey, before the crop and resize that every image goes through."""

    gray: np.ndarray  # (H, W) uint8
    mode: str  # what the file held, for the ingest's orig_mode column
    info: SliceInfo


class MedicalDecodeError(ImageDecodeError):
    """A DICOM or NIfTI file cannot be used; ``info`` keeps the UIDs read before it failed."""

    def __init__(self, message: str, info: SliceInfo = NO_INFO):
        super().__init__(message)
        self.info = info


class NotSelected(Exception):
    """The file is fine but the series selector leaves it out; the message says which rule."""

    def __init__(self, message: str, info: SliceInfo = NO_INFO):
        super().__init__(message)
        self.info = info


@dataclass(frozen=True, kw_only=True)
class SeriesSelector(Config):
    """Which DICOM series and NIfTI volumes to use, in the spirit of MONAI Deploy's selector.

    Args:
        modalities: DICOM Modality codes to keep (e.g. ``("MR",)``); empty keeps every modality.
            DICOM only: NIfTI and plain images have no modality and are not filtered by it.
        series_description: a regular expression searched (case-insensitive) in the DICOM
            Series Description; a series with none does not match. DICOM only.
        orientations: planes to keep, of ``axial``, ``coronal``, ``sagittal``: for DICOM the
            plane closest to Image Orientation (Patient) (a file without it does not match),
            for NIfTI the plane of the slice axis. Plain images are never filtered.
    """

    modalities: tuple[str, ...] = setting((), help="keep DICOM files of these Modality codes, comma-separated "
                                          "(e.g. MR); none keeps every modality", aliases=("--dicom-modality",))
    series_description: str | None = setting(None, help="keep DICOM series whose Series Description matches this "
                                             "regular expression (case-insensitive search)",
                                             aliases=("--series-description",))
    orientations: tuple[str, ...] = setting((), help="keep axial, coronal or sagittal DICOM series and NIfTI "
                                            "volumes, comma-separated", aliases=("--orientation",))

    def __post_init__(self) -> None:
        mods = tuple(m.strip().upper() for m in self.modalities)
        for m in mods:
            if not _MODALITY.match(m):
                raise ConfigError(f"modality {m!r} is not a DICOM Modality code: use codes such as MR, CT, PT")
        object.__setattr__(self, "modalities", mods)
        ors = tuple(o.strip().lower() for o in self.orientations)
        for o in ors:
            if o not in ORIENTATIONS:
                raise ConfigError(f"orientation {o!r} is not one of {', '.join(ORIENTATIONS)}")
        object.__setattr__(self, "orientations", ors)
        if self.series_description is not None:
            if not self.series_description:
                raise ConfigError("series_description is empty: give a regular expression, or leave it out")
            try:
                re.compile(self.series_description)
            except re.error as e:
                raise ConfigError(f"series_description {self.series_description!r} is not a valid regular expression: {e}") from None

    @property
    def active(self) -> bool:
        return bool(self.modalities or self.series_description or self.orientations)

    def describe(self) -> str:
        """The settings as one canonical string ("" when nothing is filtered): scoring stores it
        on every row, so a rerun with other settings looks again at the files it left out."""
        parts = []
        if self.modalities:
            parts.append("modality=" + ",".join(self.modalities))
        if self.series_description is not None:
            parts.append("series_description=" + self.series_description)
        if self.orientations:
            parts.append("orientation=" + ",".join(self.orientations))
        return ";".join(parts)

    def check_dicom(self, modality: str | None, description: str | None, orientation: str | None, info: SliceInfo) -> None:
        # The reasons name the rule and coded values only, never the (free-text) description.
        if self.modalities and (modality or "") not in self.modalities:
            shown = modality if modality and _MODALITY.match(modality) else "none"
            raise NotSelected(f"not selected: modality {shown} is not in {','.join(self.modalities)}", info)
        if self.series_description is not None and not (
            description and re.search(self.series_description, description, re.IGNORECASE)
        ):
            raise NotSelected(f"not selected: series description does not match {self.series_description!r}", info)
        self._check_orientation(orientation, info)

    def check_nifti(self, orientation: str | None, info: SliceInfo) -> None:
        self._check_orientation(orientation, info)

    def _check_orientation(self, orientation: str | None, info: SliceInfo) -> None:
        if self.orientations and orientation not in self.orientations:
            raise NotSelected(f"not selected: orientation {orientation or 'unknown'} is not in {','.join(self.orientations)}", info)


ALL = SeriesSelector()

# BodyPartExamined values (DICOM PS3.16 CID 4031 and what scanners write) that are a head.
HEAD_BODY_PARTS = ("BRAIN", "HEAD", "SKULL", "HEADNECK", "HEAD_NECK", "HEAD NECK", "CEREBRUM", "CRANIUM", "CERVICAL")


@dataclass(frozen=True, kw_only=True)
class InputGuard(Config):
    """What the model is for, checked before it sees a file: brain MR, with something in it.

    Unlike the series selector (a choice among good series), a guard keeps out what the model
    was never trained on: a chest radiograph (modality CR) or a CT is ``skipped`` with the
    reason, and an image with no content is an error row that says so.
    """

    modalities: tuple[str, ...] = setting(("MR",), help="DICOM Modality codes the model is for; other "
                                          "modalities are skipped with the reason (empty: any)")
    body_parts: tuple[str, ...] = setting(HEAD_BODY_PARTS, help="BodyPartExamined values that are a head; a DICOM "
                                          "that names another part is skipped (a file without the tag passes; "
                                          "empty: any)")
    # Blank black or white images have a spread of 0; the flattest of the 3264 real Sartaj scans
    # has 21.0 (and every one of them has a head the crop finds, covering at least 18% of the image).
    min_contrast: float = setting(2.0, help="grey-level standard deviation below which an image is an error "
                                  "(no content)")
    require_head: bool = setting(True, help="an image where the crop finds no head (nothing above the crop "
                                 "threshold) is an error")

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities if m.strip()))
        object.__setattr__(self, "body_parts", tuple(b.strip().upper() for b in self.body_parts if b.strip()))
        if self.min_contrast < 0:
            raise ConfigError(f"min_contrast={self.min_contrast} must be >= 0")

    def check_dicom(self, modality: str | None, body_part: str | None, info: SliceInfo) -> None:
        if self.modalities and modality and modality not in self.modalities:
            shown = modality if _MODALITY.match(modality) else "unknown"
            raise NotSelected(f"not brain MR: modality {shown} (the model is for {','.join(self.modalities)}; "
                              "set guard.modalities to allow others)", info)
        if self.body_parts and body_part and body_part not in self.body_parts:
            shown = body_part if _MODALITY.match(body_part.replace(" ", "_")) else "unknown"
            raise NotSelected(f"not a head: BodyPartExamined {shown} (set guard.body_parts to allow it)", info)


NO_GUARD = InputGuard(modalities=(), body_parts=(), min_contrast=0.0, require_head=False)


def sniff_kind(data: bytes, name: str = "") -> str:
    """``dicom``, ``nifti`` or ``image``: the content decides, the name only where it cannot."""
    lower = name.lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_IMAGE_MAGIC):
        return "image"
    if lower.endswith(NIFTI_SUFFIXES) or _nifti_version(data) is not None:
        return "nifti"
    if lower.endswith(DICOM_SUFFIXES):
        return "dicom"  # part-10 files without a preamble (old exports) still say .dcm
    return "image"


def read_medical(
    data: bytes, kind: str, *, max_pixels: int, select: SeriesSelector | None = None, guard: InputGuard | None = None
) -> list[GreySlice]:
    """Every slice of one DICOM or NIfTI file as 8-bit grey.

    Raises MedicalDecodeError (a reason safe to store) or NotSelected.
    """
    select = select or ALL
    if kind not in ("dicom", "nifti"):
        raise ValueError(f"unknown kind {kind!r}")
    try:
        if kind == "dicom":
            return _read_dicom(data, max_pixels=max_pixels, select=select, guard=guard or NO_GUARD)
        return _read_nifti(data, max_pixels=max_pixels, select=select)
    except (MedicalDecodeError, NotSelected):
        raise
    except Exception as e:  # a library's surprise: its message may quote a value, so only its type
        raise MedicalDecodeError(f"could not read this {'DICOM' if kind == 'dicom' else 'NIfTI'} file ({type(e).__name__})") from None


# --- pixel arithmetic, shared by both formats ------------------------------------------------


def _to_u8(y: np.ndarray) -> np.ndarray:
    # Round half up: the same grey level a person gets by hand (numpy's rint rounds half to even).
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def voi_window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2: values -> 0..255 through a window; ``width`` >= 1 (> 0 for LINEAR_EXACT)."""
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        return _to_u8(255.0 / (1.0 + np.exp(-4.0 * (x - center) / width)))
    if function == "LINEAR_EXACT":
        return _to_u8(np.clip((x - center) / width + 0.5, 0.0, 1.0) * 255.0)
    if width <= 1:
        return np.where(x <= center - 0.5, 0, 255).astype(np.uint8)
    return _to_u8(np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0) * 255.0)


def percentile_window(x: np.ndarray, percentiles: tuple[float, float] = PERCENTILE_WINDOW) -> np.ndarray:
    """Values -> 0..255 with the given percentiles of ``x`` itself as black and white."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.ravel()
    if flat.size > _PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // _PERCENTILE_SAMPLE)]
    finite = flat[np.isfinite(flat)]
    if finite.size == 0:
        return np.zeros(x.shape, np.uint8)
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if hi <= lo:  # mostly one value (an empty slab): fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(x.shape, np.uint8)
    return _to_u8(np.nan_to_num((x - lo) * (255.0 / (hi - lo)), nan=0.0))


def _luma(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601-2, what Pillow's convert("L") uses for the JPEGs.
    rgb = rgb.astype(np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


# --- DICOM ----------------------------------------------------------------------------------

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


def _read_dicom(data: bytes, *, max_pixels: int, select: SeriesSelector, guard: InputGuard) -> list[GreySlice]:
    pydicom = _pydicom()
    from pydicom.uid import UID

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            ds.get("PixelData")  # pydicom reads lazily: a cut-off file fails here or below, not later
    except Exception as e:
        # Only the exception's type: a parse error's text may quote the bytes it choked on.
        what = "empty file (0 bytes)" if not data else "truncated or corrupt DICOM: its header cannot be parsed"
        raise MedicalDecodeError(f"{what} ({type(e).__name__})") from None

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

    if not any(k in ds for k in _PIXEL_KEYWORDS):
        # pydicom stops quietly where a cut-off file ends, so a file cut before its pixels reads
        # as one without: an image object (or nothing at all) with no pixels is called truncated.
        if len(ds) == 0:
            raise MedicalDecodeError("truncated or corrupt DICOM: nothing after the file meta header", info)
        sop_class = _uid(ds, "SOPClassUID") or _uid(ds.get("file_meta", {}), "MediaStorageSOPClassUID")
        name = UID(sop_class).name if sop_class else "unknown SOP class"
        if "Image Storage" in name or "Rows" in ds:
            raise MedicalDecodeError(f"DICOM file has no pixel data: an image object ({name}) without any, truncated or corrupt", info)
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

    rows, cols, frames = _int(ds, "Rows") or 0, _int(ds, "Columns") or 0, _int(ds, "NumberOfFrames") or 1
    if rows * cols > max_pixels or rows * cols * frames > VOLUME_PIXEL_FACTOR * max_pixels:
        raise MedicalDecodeError(
            f"image too large: {frames} frame(s) of {cols}x{rows} pixels exceed the limit of {max_pixels} "
            "per slice (decompression bomb guard; raise max_pixels if such scans are genuine)",
            info,
        )
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated") or 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
            if photometric == "PALETTE COLOR":
                from pydicom.pixels import apply_color_lut

                arr = apply_color_lut(arr, ds)
            grey = photometric.startswith("MONOCHROME") or (_int(ds, "SamplesPerPixel") or 1) == 1 and photometric != "PALETTE COLOR"
            if grey:
                from pydicom.pixels import apply_modality_lut

                arr = apply_modality_lut(arr, ds)
    except Exception as e:
        raise MedicalDecodeError(
            f"corrupt or truncated DICOM pixel data ({ts_name}): {type(e).__name__}: {_scrub(str(e), ds)}", info
        ) from None

    mode = f"DICOM {photometric} {bits}-bit"
    if grey:
        values = np.asarray(arr, dtype=np.float64)
        frames_arr = values if frames > 1 and values.ndim == 3 else values.reshape((1, *values.shape[-2:]))
        window = _file_window(ds)
        u8 = voi_window(frames_arr, *window) if window else percentile_window(frames_arr)
        if photometric == "MONOCHROME1":
            u8 = 255 - u8
    else:
        luma = _luma(np.asarray(arr))
        frames_arr = luma if luma.ndim == 3 else luma[None]
        u8 = _to_u8(frames_arr) if bits <= 8 else percentile_window(frames_arr)
    if u8.shape[0] == 1:
        return [GreySlice(u8[0], mode, info)]
    return [GreySlice(u8[k], mode, _with_slice(info, k)) for k in range(u8.shape[0])]


def _with_slice(info: SliceInfo, k: int) -> SliceInfo:
    return SliceInfo(**{**info.__dict__, "slice_index": k})


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


# --- NIfTI ----------------------------------------------------------------------------------


def _nifti_version(data: bytes) -> int | None:
    """1 or 2 when ``data`` (plain or gzipped) starts with a single-file NIfTI header."""
    head = data[:544]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:65536], 544)
        except zlib.error:
            return None
    if len(head) >= 348 and head[344:348] == b"n+1\x00" and 348 in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4]):
        return 1
    if len(head) >= 8 and head[4:8] == b"n+2\x00" and 540 in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4]):
        return 2
    return None


def _read_nifti(data: bytes, *, max_pixels: int, select: SeriesSelector) -> list[GreySlice]:
    import nibabel as nib

    if not data:
        raise MedicalDecodeError("empty file (0 bytes)")
    version = _nifti_version(data)
    if version is None:
        raise MedicalDecodeError("corrupt NIfTI: no NIfTI-1 or NIfTI-2 single-file header (.hdr/.img pairs are not read)")
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = data
            if data[:2] == b"\x1f\x8b":
                header = cls.header_class.from_fileobj(io.BytesIO(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, 1024)))
                _check_nifti_size(header.get_data_shape(), max_pixels)
                raw = gzip.decompress(data)
            img = cls.from_bytes(raw)
            shape = img.shape
            _check_nifti_size(shape, max_pixels)
            if np.dtype(img.get_data_dtype()).kind not in "iuf":
                raise MedicalDecodeError(f"unsupported NIfTI data type {img.get_data_dtype()}: only grey-level volumes are read")
            volume = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
            affine = img.affine
            cal = float(img.header["cal_min"]), float(img.header["cal_max"])
    except MedicalDecodeError:
        raise
    except Exception as e:
        raise MedicalDecodeError(f"corrupt or truncated NIfTI data ({type(e).__name__})") from None

    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        volume = volume[:, :, None]
    if volume.ndim != 3:
        raise MedicalDecodeError(
            f"a {volume.ndim}-D NIfTI ({'x'.join(map(str, volume.shape))}): only 2-D and 3-D volumes are read; "
            "split a time series into 3-D volumes first"
        )
    codes = _axcodes(affine)
    plane = _PLANE_OF_AXIS.get(codes[2]) if codes else None
    select.check_nifti(plane, NO_INFO)

    if np.isfinite(cal).all() and cal[1] > cal[0]:
        u8 = voi_window(volume, (cal[0] + cal[1]) / 2, cal[1] - cal[0], "LINEAR_EXACT")
    else:
        u8 = percentile_window(volume)
    mode = f"NIfTI-{version} {img.get_data_dtype()}"
    return [GreySlice(_display_slice(u8[:, :, k], codes, plane), mode, SliceInfo(slice_index=k)) for k in range(u8.shape[2])]


def _check_nifti_size(shape: tuple[int, ...], max_pixels: int) -> None:
    plane = int(shape[0]) * int(shape[1] if len(shape) > 1 else 1)
    total = int(np.prod([int(s) for s in shape], dtype=np.int64)) if shape else 0
    if plane > max_pixels or total > VOLUME_PIXEL_FACTOR * max_pixels:
        raise MedicalDecodeError(
            f"volume too large: {'x'.join(map(str, shape))} voxels exceed the limit of {max_pixels} per slice or "
            f"{VOLUME_PIXEL_FACTOR * max_pixels} in all (raise max_pixels if such scans are genuine)"
        )


def _axcodes(affine: np.ndarray) -> tuple[str, str, str] | None:
    import nibabel as nib

    try:
        codes = nib.aff2axcodes(affine)
    except Exception:
        return None
    return tuple(codes[:3]) if len(codes) >= 3 and all(c in _PAIR for c in codes[:3]) else None


def _display_slice(s: np.ndarray, codes: tuple[str, str, str] | None, plane: str | None) -> np.ndarray:
    """A slice data[:, :, k] turned so that rows and columns run as a viewer shows that plane."""
    if codes is None or plane is None:
        return np.ascontiguousarray(s.T)  # the usual convention: first voxel axis across
    horizontal, vertical = _DISPLAY[plane]
    h_axis = 0 if _PAIR[codes[0]] == _PAIR[horizontal] else 1
    image = s.T if h_axis == 0 else s  # rows along the vertical voxel axis, columns along h_axis
    if codes[h_axis] != horizontal:
        image = image[:, ::-1]
    if codes[1 - h_axis] != vertical:
        image = image[::-1, :]
    return np.ascontiguousarray(image)
