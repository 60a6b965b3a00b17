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

import dataclasses
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
# Limits of one file in one decode task (InputGuard.max_pixels, InputGuard.max_file_bytes). A decode
# task holds at most: the file as read, its inflated content (gzip, deflated DICOM) or its decoded
# pixels in their stored type (each capped by max_file_bytes), and its 8-bit slices (1 byte a
# voxel, capped by max_pixels); windowing and the crop work one slice at a time. A 512x512x400 int16
# volume (CT, 3-D MR) is 105 M voxels and 200 MiB, inside both limits; at the limits the task holds
# 256 + 256 + 128 MiB on top of a Ray worker's own ~200 MB, well under 1.5 GB (measured: see
# docs/benchmarks.md). Before these limits a volume at the old voxel limit cost ~14 GB.
DEFAULT_MAX_PIXELS = 2**27  # 134 M: 512x512x512 voxels, or one 11585 x 11585 image
DEFAULT_MAX_FILE_BYTES = 256 * 2**20
# A gzipped NIfTI may hold this much past the end its header declares (padding some writers
# leave); more is a decompression bomb, refused before it is inflated.
NIFTI_GZIP_SLACK = 2**20
# A deflated DICOM may hold max_file_bytes / this outside its pixel data (16 MiB at the default):
# Siemens CSA headers are 10-100 KB, enhanced multi-frame functional groups a few KB a frame.
DICOM_HEADER_SHARE = 16
GZIP_MAGIC = b"\x1f\x8b"
DEFLATED_TS = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_INFLATE_CHUNK = 2**20

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
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, help="most pixels one file may decode to, all its slices or "
                              "frames together (512x512x512 by default); a file that declares more is an error "
                              "row before anything is decoded (decompression bomb guard)", aliases=("--max-pixels",))
    max_file_bytes: int = setting(DEFAULT_MAX_FILE_BYTES, help="most bytes one file may hold: as stored, "
                                  "decompressed (.gz, deflated DICOM) or as decoded pixels; a larger file is an "
                                  "error row and is not read", aliases=("--max-file-bytes",))
    follow_links_outside_input: bool = setting(False, help="read files whose links point outside the input folder "
                                               "(off: such links, and dangling ones, are error rows; directory "
                                               "links are never followed)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities if m.strip()))
        object.__setattr__(self, "body_parts", tuple(b.strip().upper() for b in self.body_parts if b.strip()))
        if self.min_contrast < 0:
            raise ConfigError(f"min_contrast={self.min_contrast} must be >= 0")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels={self.max_pixels} must be at least 1")
        if self.max_file_bytes < 1024:
            raise ConfigError(f"max_file_bytes={self.max_file_bytes} is too small: give bytes, at least 1024")

    def too_many_pixels(self, what: str, pixels: int) -> str | None:
        """The error for a file of ``pixels`` pixels (``what`` describes them), or None within the limit."""
        if pixels <= self.max_pixels:
            return None
        return (f"too large: {what} = {pixels:,} pixels, over the limit guard.max_pixels={self.max_pixels:,} "
                "(decompression bomb guard; raise guard.max_pixels if such scans are genuine)")

    def too_many_bytes(self, what: str, n: int) -> str | None:
        """The error for ``n`` bytes of a file (``what`` says which), or None within the limit."""
        if n <= self.max_file_bytes:
            return None
        return (f"too large: {what} {n:,} bytes, over the limit guard.max_file_bytes={self.max_file_bytes:,} "
                "(raise guard.max_file_bytes if such files are genuine)")

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
    data: bytes,
    kind: str,
    *,
    max_pixels: int | None = None,
    select: SeriesSelector | None = None,
    guard: InputGuard | None = None,
) -> list[GreySlice]:
    """Every slice of one DICOM or NIfTI file as 8-bit grey.

    The guard's limits (``max_pixels``, here overridable, and ``max_file_bytes``) are checked
    against what the file declares before anything is inflated or decoded. Raises
    MedicalDecodeError (a reason safe to store) or NotSelected.
    """
    select = select or ALL
    guard = guard or NO_GUARD
    if max_pixels is not None and max_pixels != guard.max_pixels:
        guard = dataclasses.replace(guard, max_pixels=max_pixels)
    if kind not in ("dicom", "nifti"):
        raise ValueError(f"unknown kind {kind!r}")
    try:
        if err := guard.too_many_bytes("the file holds", len(data)):
            raise MedicalDecodeError(err)
        if kind == "dicom":
            return _read_dicom(data, select=select, guard=guard)
        return _read_nifti(data, select=select, guard=guard)
    except (MedicalDecodeError, NotSelected):
        raise
    except Exception as e:  # a library's surprise: its message may quote a value, so only its type
        raise MedicalDecodeError(f"could not read this {'DICOM' if kind == 'dicom' else 'NIfTI'} file ({type(e).__name__})") from None


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
        fed, tail = start, b""
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
    return _stretch(x, _percentile_levels(flat, percentiles))


def _percentile_levels(sample: np.ndarray, percentiles: tuple[float, float] = PERCENTILE_WINDOW) -> tuple[float, float] | None:
    """The black and white levels of :func:`percentile_window`, from its sample of the values
    (None: no usable range, all black). Volumes take it once, then window slice by slice."""
    sample = np.asarray(sample, dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(finite, percentiles))
    if hi <= lo:  # mostly one value (an empty slab): fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else None


def _stretch(x: np.ndarray, levels: tuple[float, float] | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if levels is None:
        return np.zeros(x.shape, np.uint8)
    lo, hi = levels
    return _to_u8(np.nan_to_num((x - lo) * (255.0 / (hi - lo)), nan=0.0))


def _frames_sample(frames, n: int, frame_size: int) -> np.ndarray:
    """:func:`percentile_window`'s sample of a stack of ``n`` frames of ``frame_size`` values,
    taken frame by frame: the same values as from the stacked (n, rows, cols) array."""
    step = -(-(n * frame_size) // _PERCENTILE_SAMPLE) if n * frame_size > _PERCENTILE_SAMPLE else 1
    parts = [np.asarray(f, dtype=np.float64).ravel()[(-k * frame_size) % step :: step] for k, f in enumerate(frames)]
    return np.concatenate(parts) if parts else np.zeros(0)


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


def _read_dicom(data: bytes, *, select: SeriesSelector, guard: InputGuard) -> list[GreySlice]:
    pydicom = _pydicom()
    from pydicom.uid import UID

    meta_start, meta_end, meta_ts = _dicom_meta(data)
    # pydicom inflates a deflated dataset whole, before anything can be checked: such files are
    # inflated here, within the budget their header allows.
    deflated = meta_ts == DEFLATED_TS or (meta_ts is None and DEFLATED_TS.encode() in bytes(data[:4096]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if deflated:
                ds = _read_deflated(data, meta_start, meta_end, guard)
            else:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                ds.get("PixelData")  # pydicom reads lazily: a cut-off file fails here or below, not later
    except MedicalDecodeError:
        raise
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
    samples, allocated = _int(ds, "SamplesPerPixel") or 1, _int(ds, "BitsAllocated") or 8
    if err := _dicom_size_error(rows, cols, frames, samples, allocated, guard):
        raise MedicalDecodeError(err, info)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    bits = _int(ds, "BitsStored") or _int(ds, "BitsAllocated") or 0
    grey = photometric.startswith("MONOCHROME") or (_int(ds, "SamplesPerPixel") or 1) == 1 and photometric != "PALETTE COLOR"
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

    try:
        source = values()
        levels = None
        if stretch:
            # Two passes, the first for the levels; small stacks are kept rather than decoded twice.
            keep = frames * rows * cols * 8 <= _KEEP_FRAMES_BYTES
            first = list(source) if keep else values()
            levels = _percentile_levels(_frames_sample(first, frames, rows * cols))
            source = iter(first) if keep else values()
        out = []
        for v in source:
            if grey:
                u8 = voi_window(v, *window) if window else _stretch(v, levels)
                out.append(255 - u8 if photometric == "MONOCHROME1" else u8)
            else:
                out.append(_stretch(v, levels) if bits > 8 else _to_u8(v))
    except Exception as e:
        raise MedicalDecodeError(
            f"corrupt or truncated DICOM pixel data ({ts_name}): {type(e).__name__}: {_scrub(str(e), ds)}", info
        ) from None
    if not out:
        raise MedicalDecodeError(f"corrupt or truncated DICOM pixel data ({ts_name}): no frames", info)
    mode = f"DICOM {photometric} {bits}-bit"
    if len(out) == 1:
        return [GreySlice(out[0], mode, info)]
    return [GreySlice(u8, mode, _with_slice(info, k)) for k, u8 in enumerate(out)]


def _dicom_size_error(rows: int, cols: int, frames: int, samples: int, allocated: int, guard: InputGuard) -> str | None:
    """The guard's verdict on what a DICOM header declares, before any pixel is decoded."""
    pixels = rows * cols * frames * samples
    what = f"{frames} frame(s) of {cols}x{rows}" + (f"x{samples} samples" if samples > 1 else "")
    return guard.too_many_pixels(what, pixels) or guard.too_many_bytes(
        f"{what} at {allocated} bits decode to", (pixels * allocated + 7) // 8)


# --- deflated DICOM: inflated here, within a budget -------------------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_HEADER_TAGS = {0x00280010: "rows", 0x00280011: "cols", 0x00280008: "frames", 0x00280002: "samples",
                0x00280100: "allocated"}
_UNDEFINED = 0xFFFFFFFF
# A multi-frame stack is kept between the two passes of the percentile window up to this size
# (float64 values); larger ones are decoded twice instead of held.
_KEEP_FRAMES_BYTES = 64 * 2**20


class _NeedMore(Exception):
    """The header runs past the bytes inflated so far."""


def _dicom_meta(data: bytes) -> tuple[int, int, str | None]:
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


def _read_deflated(data: bytes, meta_start: int, meta_end: int, guard: InputGuard) -> Any:
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
    want = 2**16
    while True:
        try:
            head, complete = inflate(body, want, raw=True)
        except zlib.error as e:
            raise MedicalDecodeError(f"corrupt deflated DICOM: the deflate stream is damaged ({e})") from None
        try:
            pixel_at, pixel_len, found = _skim_header(head, allowance, at_end=complete and len(head) <= want)
            break
        except _NeedMore:
            if want >= allowance + 2**16:
                raise MedicalDecodeError(_over_allowance(allowance)) from None
            want = min(want * 4, allowance + 2**16)

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
    if err := _dicom_size_error(rows, cols, frames, samples, allocated, guard):
        raise MedicalDecodeError(err)
    declared = (rows * cols * frames * samples * allocated + 7) // 8
    if pixel_at is None:
        budget = allowance
    else:
        if pixel_len != _UNDEFINED and pixel_len > max(declared + 1, allowance):
            raise MedicalDecodeError(
                f"decompression bomb: the pixel data of this deflated DICOM declares {pixel_len:,} bytes, more than the "
                f"{declared:,} its {frames} frame(s) of {cols}x{rows} declare; refused before it is inflated")
        budget = pixel_at + 12 + (declared if pixel_len == _UNDEFINED else pixel_len) + allowance
    try:
        full, complete = inflate(body, budget, raw=True)
    except zlib.error as e:
        raise MedicalDecodeError(f"corrupt deflated DICOM: the deflate stream is damaged ({e})") from None
    if len(full) > budget:
        raise MedicalDecodeError(
            f"decompression bomb: this deflated DICOM inflates past {budget:,} bytes (its header, the pixel data it "
            f"declares and {allowance:,} bytes more: guard.max_file_bytes / {DICOM_HEADER_SHARE}); refused without "
            "inflating the rest")
    if not complete:
        raise MedicalDecodeError("truncated or corrupt DICOM: the deflate stream ends early")
    ds = read_dataset(io.BytesIO(full), is_implicit_VR=False, is_little_endian=True)
    ds.file_meta = FileMetaDataset(read_dataset(io.BytesIO(bytes(data[meta_start:meta_end])), False, True))
    ds.set_original_encoding(False, True)
    return ds


def _over_allowance(allowance: int) -> str:
    return (f"decompression bomb: this deflated DICOM holds more than the {allowance:,} bytes it may hold outside its "
            f"pixel data (guard.max_file_bytes / {DICOM_HEADER_SHARE}); refused before the rest is inflated (raise "
            "guard.max_file_bytes if such files are genuine)")


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
                    "are genuine)")
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


def _read_nifti(data: bytes, *, select: SeriesSelector, guard: InputGuard) -> list[GreySlice]:
    import nibabel as nib

    if not data:
        raise MedicalDecodeError("empty file (0 bytes)")
    version = _nifti_version(data)
    if version is None:
        raise MedicalDecodeError("corrupt NIfTI: no NIfTI-1 or NIfTI-2 single-file header (.hdr/.img pairs are not read)")
    cls = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    gz = data[:2] == GZIP_MAGIC
    size = cls.header_class.template_dtype.itemsize  # 348 or 540
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head = inflate(data, size)[0] if gz else data[:size]
            hdr = cls.header_class(bytes(head[:size]), check=False)
            shape = tuple(int(v) for v in hdr.get_data_shape())
            dtype = np.dtype(hdr.get_data_dtype())
            offset = int(hdr.get_data_offset())
            slope, inter = hdr.get_slope_inter()
            affine = hdr.get_best_affine()
            cal = float(hdr["cal_min"]), float(hdr["cal_max"])
    except Exception as e:
        raise MedicalDecodeError(f"corrupt NIfTI header ({type(e).__name__})") from None

    # Everything is checked against what the header declares before a byte is inflated.
    if dtype.kind not in "iuf":
        raise MedicalDecodeError(f"unsupported NIfTI data type {dtype}: only grey-level volumes are read")
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 2:
        dims.append(1)
    if len(dims) != 3:
        raise MedicalDecodeError(
            f"a {len(dims)}-D NIfTI ({'x'.join(map(str, dims))}): only 2-D and 3-D volumes are read; "
            "split a time series into 3-D volumes first"
        )
    voxels = int(np.prod(dims, dtype=np.int64))
    expected = offset + voxels * dtype.itemsize
    for err in (guard.too_many_pixels(f"a {'x'.join(map(str, dims))} volume", voxels),
                guard.too_many_bytes(f"a {'x'.join(map(str, dims))} {dtype} volume takes", expected)):
        if err:
            raise MedicalDecodeError(err)
    codes = _axcodes(affine)
    plane = _PLANE_OF_AXIS.get(codes[2]) if codes else None
    select.check_nifti(plane, NO_INFO)

    if gz:
        budget = expected + NIFTI_GZIP_SLACK
        try:
            raw, complete = inflate(data, budget)
        except zlib.error as e:
            raise MedicalDecodeError(f"corrupt NIfTI gzip stream ({e})") from None
        if len(raw) > budget:
            raise MedicalDecodeError(
                f"decompression bomb: the gzip stream holds more than the {budget:,} bytes its NIfTI header declares "
                f"({'x'.join(map(str, dims))} {dtype} and {NIFTI_GZIP_SLACK // 2**20} MiB of slack); refused without "
                "inflating the rest"
            )
        if not complete:
            raise MedicalDecodeError(f"truncated NIfTI: the gzip stream ends early ({len(raw):,} of {expected:,} bytes)")
    else:
        raw = data
    if len(raw) < expected:
        raise MedicalDecodeError(f"corrupt or truncated NIfTI data: {len(raw):,} of the {expected:,} bytes its header declares")
    # A view of the bytes, not a copy: each slice is scaled and windowed on its own.
    voxels_of = np.ndarray(tuple(dims), dtype=dtype, buffer=raw, offset=offset, order="F")
    scale = _nifti_scaling(slope, inter)
    if np.isfinite(cal).all() and cal[1] > cal[0]:
        window = ((cal[0] + cal[1]) / 2, cal[1] - cal[0], "LINEAR_EXACT")
        to_u8 = lambda v: voi_window(v, *window)  # noqa: E731
    else:
        levels = _percentile_levels(_volume_sample(voxels_of, scale))
        to_u8 = lambda v: _stretch(v, levels)  # noqa: E731
    mode = f"NIfTI-{version} {hdr.get_data_dtype()}"
    return [GreySlice(_display_slice(to_u8(scale(voxels_of[:, :, k])), codes, plane), mode, SliceInfo(slice_index=k))
            for k in range(dims[2])]


def _nifti_scaling(slope: Any, inter: Any):
    """scl_slope/scl_inter applied as nibabel applies them, to float32 (what reading the volume
    with ``np.asarray(img.dataobj, dtype=np.float32)`` gives, one part at a time)."""
    from nibabel.volumeutils import apply_read_scaling

    s = np.asanyarray(1.0 if slope is None else slope)
    i = np.asanyarray(0.0 if inter is None else inter)
    if np.can_cast(s, np.float32):
        s = s.astype(np.float32)
    if np.can_cast(i, np.float32):
        i = i.astype(np.float32)
    return lambda v: np.asarray(apply_read_scaling(v, s, i), dtype=np.float32)


def _volume_sample(voxels: np.ndarray, scale) -> np.ndarray:
    """The values the percentile window is taken on: every voxel of a small volume, else the
    same even sample :func:`percentile_window` takes of the whole volume (C order)."""
    n = voxels.size
    if n <= _PERCENTILE_SAMPLE:
        return scale(voxels).ravel()
    idx = np.unravel_index(np.arange(0, n, -(-n // _PERCENTILE_SAMPLE)), voxels.shape)
    return scale(voxels[idx])


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
