"""DICOM files and NIfTI volumes -> 8-bit greyscale slices: the one entry, :func:`read_medical`.

One concern a module, one reader shape for both formats (bytes, selector, guard -> slices):
``_guard`` (InputGuard, SeriesSelector, SliceInfo, the errors), ``_window`` (VOI and percentile
windows), ``_dicom``, ``_nifti``, and ``_inflate`` (the budgeted gzip/deflate inflaters).

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
  sets it, else the same percentile window over the head's voxels: those above the volume's
  minimum, the background of a skull-stripped or z-scored volume, which would otherwise move
  the window with the share of the field of view that is empty. A 3-D volume is cut along
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
from collections.abc import Callable

from ._dicom import DICOM_SUFFIXES, read_dicom
from ._guard import ALL, NO_GUARD, GreySlice, InputGuard, MedicalDecodeError, NotSelected, SeriesSelector
from ._nifti import NIFTI_SUFFIXES, nifti_version, read_nifti

_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"II*\x00", b"MM\x00*", b"GIF8", b"RIFF")
# One reader shape for both formats: (file bytes, selector, guard) -> the file's slices, each
# reader checking the guard against what the file declares before it inflates or decodes.
Reader = Callable[..., "list[GreySlice]"]
_READERS: dict[str, Reader] = {"dicom": read_dicom, "nifti": read_nifti}


def sniff_kind(data: bytes, name: str = "") -> str:
    """``dicom``, ``nifti`` or ``image``: the content decides, the name only where it cannot."""
    lower = name.lower()
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(_IMAGE_MAGIC):
        return "image"
    if lower.endswith(NIFTI_SUFFIXES) or nifti_version(data) is not None:
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
    if kind not in _READERS:
        raise ValueError(f"unknown kind {kind!r}")
    try:
        if err := guard.too_many_bytes("the file holds", len(data)):
            raise MedicalDecodeError(err)
        return _READERS[kind](data, select=select, guard=guard)
    except (MedicalDecodeError, NotSelected):
        raise
    except Exception as e:  # a library's surprise: its message may quote a value, so only its type
        raise MedicalDecodeError(
            f"could not read this {'DICOM' if kind == 'dicom' else 'NIfTI'} file ({type(e).__name__})"
        ) from None
