"""The settings that decide which files are read and how far: the input guard and the series selector.

:class:`InputGuard` keeps out what the model is not for (another modality, another body part, no
content) and bounds what one file may cost (pixels, bytes); :class:`SeriesSelector` chooses among
good series. Both are public config dataclasses; the readers (``_dicom``, ``_nifti``) raise
:class:`MedicalDecodeError` or :class:`NotSelected`, whose ``info`` keeps the UIDs read so far.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..core import Config, ConfigError, ImageDecodeError, setting

# Limits of one file in one decode task (InputGuard.max_pixels, InputGuard.max_file_bytes). A decode
# task holds at most: the file as read, its inflated content (gzip, deflated DICOM) or its decoded
# pixels in their stored type (each capped by max_file_bytes), and its 8-bit slices (1 byte a
# voxel, capped by max_pixels); windowing and the crop work one slice at a time. A 512x512x400 int16
# volume (CT, 3-D MR) is 105 M voxels and 200 MiB, inside both limits; at the limits the task holds
# 256 + 256 + 128 MiB on top of a Ray worker's own ~200 MB, well under 1.5 GB (measured: see
# docs/benchmarks.md). Before these limits a volume at the old voxel limit cost ~14 GB.
DEFAULT_MAX_PIXELS = 2**27  # 134 M: 512x512x512 voxels, or one 11585 x 11585 image
DEFAULT_MAX_FILE_BYTES = 256 * 2**20
# Most images (rows) one file may become. The pixel limit alone lets a file of 1x1 pages become
# 134 M rows: a hand-made GIF of 100,000 1x1 frames is 1.7 MB. Real stacks are far below this:
# a 512-slice volume, an enhanced multi-frame MR of 60 directions x 60 slices (3600 frames).
DEFAULT_MAX_SLICES = 4096
# Most scans (SOS markers) one JPEG may hold. Each scan of a progressive JPEG is another pass of
# the decoder over the whole image: a 150 KB file of thousands of scans cost 278 s and 1.36 GB in
# one decode task (issue 35). Encoders write far fewer: libjpeg's progressive script is 6 scans
# for grey and 10 for colour, mozjpeg's optimised ones stay under 64 for 4 components.
DEFAULT_MAX_JPEG_SCANS = 100

ORIENTATIONS = ("axial", "coronal", "sagittal")
MODALITY_CODE = re.compile(r"^[A-Z0-9_]{1,16}$")


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

    modalities: tuple[str, ...] = setting(
        (),
        help="keep DICOM files of these Modality codes, comma-separated (e.g. MR); none keeps every modality",
        aliases=("--dicom-modality",),
    )
    series_description: str | None = setting(
        None,
        help="keep DICOM series whose Series Description matches this regular expression (case-insensitive search)",
        aliases=("--series-description",),
    )
    orientations: tuple[str, ...] = setting(
        (),
        help="keep axial, coronal or sagittal DICOM series and NIfTI volumes, comma-separated",
        aliases=("--orientation",),
    )

    def __post_init__(self) -> None:
        mods = tuple(m.strip().upper() for m in self.modalities)
        for m in mods:
            if not MODALITY_CODE.match(m):
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
                raise ConfigError(
                    f"series_description {self.series_description!r} is not a valid regular expression: {e}"
                ) from None

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

    def check_dicom(
        self, modality: str | None, description: str | None, orientation: str | None, info: SliceInfo
    ) -> None:
        # The reasons name the rule and coded values only, never the (free-text) description.
        if self.modalities and (modality or "") not in self.modalities:
            shown = modality if modality and MODALITY_CODE.match(modality) else "none"
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
            raise NotSelected(
                f"not selected: orientation {orientation or 'unknown'} is not in {','.join(self.orientations)}", info
            )


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

    modalities: tuple[str, ...] = setting(
        ("MR",), help="DICOM Modality codes the model is for; other modalities are skipped with the reason (empty: any)"
    )
    body_parts: tuple[str, ...] = setting(
        HEAD_BODY_PARTS,
        help="BodyPartExamined values that are a head; a DICOM "
        "that names another part is skipped (a file without the tag passes; "
        "empty: any)",
    )
    # Blank black or white images have a spread of 0; the flattest of the 3264 real Sartaj scans
    # has 21.0 (and every one of them has a head the crop finds, covering at least 18% of the image).
    min_contrast: float = setting(
        2.0, help="grey-level standard deviation below which an image is an error (no content)"
    )
    require_head: bool = setting(
        True, help="an image where the crop finds no head (nothing above the crop threshold) is an error"
    )
    max_pixels: int = setting(
        DEFAULT_MAX_PIXELS,
        help="most pixels one file may decode to, all its slices or "
        "frames together (512x512x512 by default); a file that declares more is an error "
        "row before anything is decoded (decompression bomb guard)",
        aliases=("--max-pixels",),
    )
    max_file_bytes: int = setting(
        DEFAULT_MAX_FILE_BYTES,
        help="most bytes one file may hold: as stored, "
        "decompressed (.gz, deflated DICOM) or as decoded pixels; a larger file is an "
        "error row and is not read",
        aliases=("--max-file-bytes",),
    )
    max_slices: int = setting(
        DEFAULT_MAX_SLICES,
        help="most images one file may become: pages of a multi-page TIFF, "
        "GIF, WebP or APNG, frames of a DICOM, slices of a NIfTI volume; a file with more is an "
        "error row (pages are counted as they are read: the rest are never decoded)",
        aliases=("--max-slices",),
    )
    max_jpeg_scans: int = setting(
        DEFAULT_MAX_JPEG_SCANS,
        help="most scans one JPEG (a file, or a frame of a DICOM) "
        "may hold; each scan of a progressive JPEG is another pass over the whole image, "
        "so a file with more is an error row before anything is decoded",
    )
    follow_links_outside_input: bool = setting(
        False,
        help="read files whose links point outside the input folder "
        "(off: such links, and dangling ones, are error rows; directory "
        "links are never followed)",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities if m.strip()))
        object.__setattr__(self, "body_parts", tuple(b.strip().upper() for b in self.body_parts if b.strip()))
        if self.min_contrast < 0:
            raise ConfigError(f"min_contrast={self.min_contrast} must be >= 0")
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels={self.max_pixels} must be at least 1")
        if self.max_slices < 1:
            raise ConfigError(f"max_slices={self.max_slices} must be at least 1")
        if self.max_jpeg_scans < 1:
            raise ConfigError(f"max_jpeg_scans={self.max_jpeg_scans} must be at least 1")
        if self.max_file_bytes < 1024:
            raise ConfigError(f"max_file_bytes={self.max_file_bytes} is too small: give bytes, at least 1024")

    def too_many_pixels(self, what: str, pixels: int) -> str | None:
        """The error for a file of ``pixels`` pixels (``what`` describes them), or None within the limit."""
        if pixels <= self.max_pixels:
            return None
        return (
            f"too large: {what} = {pixels:,} pixels, over the limit guard.max_pixels={self.max_pixels:,} "
            "(decompression bomb guard; raise guard.max_pixels if such scans are genuine)"
        )

    def too_many_slices(self, what: str, n: int) -> str | None:
        """The error for a file of ``n`` images (``what`` says which: pages, frames, slices), or None."""
        if n <= self.max_slices:
            return None
        return (
            f"too many images: {what}, over the limit guard.max_slices={self.max_slices:,} (raise "
            "guard.max_slices if such files are genuine, or split the file)"
        )

    def too_many_bytes(self, what: str, n: int) -> str | None:
        """The error for ``n`` bytes of a file (``what`` says which), or None within the limit."""
        if n <= self.max_file_bytes:
            return None
        return (
            f"too large: {what} {n:,} bytes, over the limit guard.max_file_bytes={self.max_file_bytes:,} "
            "(raise guard.max_file_bytes if such files are genuine)"
        )

    def too_many_jpeg_scans(self, what: str, data: bytes) -> str | None:
        """The error for a JPEG codestream ``data`` of more than ``max_jpeg_scans`` scans, or None.

        Counted as the SOS markers (``FF DA``) in the bytes, a C-speed search (0.05 s for 256 MB):
        the entropy-coded data cannot hold that pair (an ``FF`` byte there is followed by ``00`` or a
        restart marker), so each one is a scan, of this image or of a thumbnail embedded in it."""
        scans = data.count(b"\xff\xda")
        if scans <= self.max_jpeg_scans:
            return None
        return (
            f"decompression bomb: {what} holds {scans:,} scans, over the limit guard.max_jpeg_scans="
            f"{self.max_jpeg_scans:,} (each scan of a progressive JPEG is another pass over the whole image); "
            "refused before decoding (raise guard.max_jpeg_scans if such files are genuine)"
        )

    def check_dicom(self, modality: str | None, body_part: str | None, info: SliceInfo) -> None:
        if self.modalities and modality and modality not in self.modalities:
            shown = modality if MODALITY_CODE.match(modality) else "unknown"
            raise NotSelected(
                f"not brain MR: modality {shown} (the model is for {','.join(self.modalities)}; "
                "set guard.modalities to allow others)",
                info,
            )
        if self.body_parts and body_part and body_part not in self.body_parts:
            shown = body_part if MODALITY_CODE.match(body_part.replace(" ", "_")) else "unknown"
            raise NotSelected(f"not a head: BodyPartExamined {shown} (set guard.body_parts to allow it)", info)


NO_GUARD = InputGuard(modalities=(), body_parts=(), min_contrast=0.0, require_head=False)


def with_slice(info: SliceInfo, k: int) -> SliceInfo:
    return SliceInfo(**{**info.__dict__, "slice_index": k})


def dicom_size_error(rows: int, cols: int, frames: int, samples: int, allocated: int, guard: InputGuard) -> str | None:
    """The guard's verdict on what a DICOM header declares, before any pixel is decoded."""
    pixels = rows * cols * frames * samples
    what = f"{frames} frame(s) of {cols}x{rows}" + (f"x{samples} samples" if samples > 1 else "")
    return (
        guard.too_many_slices(f"{frames:,} frames declared", frames)
        or guard.too_many_pixels(what, pixels)
        or guard.too_many_bytes(f"{what} at {allocated} bits decode to", (pixels * allocated + 7) // 8)
    )
