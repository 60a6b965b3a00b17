"""NIfTI volumes -> 8-bit grey slices (one :class:`GreySlice` a slice), the guard checked first.

Pixel values: the header's scl_slope/scl_inter; the window is cal_min/cal_max when the header sets
it, else the percentile window over the head's voxels (all but the background: the volume's
minimum, where a skull-stripped or z-scored volume puts it, and the slices' edges' most common value
when it is inside the range and fills a large share of the volume, where a nonzero-mask z-score
puts it, mapped to black: ``head_levels``).
A 3-D volume is cut along its last voxel axis (the acquisition's slice axis as scanner converters
such as dcm2niix write it), slice ``k`` being ``data[:, :, k]``, each shown as a DICOM viewer shows
that plane: axial with anterior up and the patient's right on the left, coronal with superior up
and right on the left, sagittal with superior up and anterior on the left.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from ._guard import NO_INFO, GreySlice, InputGuard, MedicalDecodeError, SeriesSelector, SliceInfo
from ._inflate import GZIP_MAGIC, NIFTI_GZIP_SLACK, inflate
from ._window import _PERCENTILE_SAMPLE, head_levels, voi_window

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Target display directions (RAS letters) of the horizontal and vertical image axes per plane.
_DISPLAY = {"axial": ("L", "P"), "coronal": ("L", "I"), "sagittal": ("P", "I")}
_PLANE_OF_AXIS = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "R": "sagittal", "L": "sagittal"}
_PAIR = {"L": "LR", "R": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}


def nifti_version(data: bytes) -> int | None:
    """1 or 2 when ``data`` (plain or gzipped) starts with a single-file NIfTI header."""
    head = data[:544]
    if data[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:65536], 544)
        except zlib.error:
            return None
    if (
        len(head) >= 348
        and head[344:348] == b"n+1\x00"
        and 348 in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4])
    ):
        return 1
    if (
        len(head) >= 8
        and head[4:8] == b"n+2\x00"
        and 540 in struct.unpack("<i", head[:4]) + struct.unpack(">i", head[:4])
    ):
        return 2
    return None


def _checked_dims(shape: tuple[int, ...], dtype: np.dtype, offset: int, guard: InputGuard) -> tuple[list[int], int]:
    """The volume's 3 dimensions (trailing 1s dropped, a 2-D image one slice) and the bytes the
    file must hold, refused when the guard's limits or the kind of volume say so."""
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
    for err in (
        guard.too_many_slices(f"a {'x'.join(map(str, dims))} volume of {dims[2]:,} slices", dims[2]),
        guard.too_many_pixels(f"a {'x'.join(map(str, dims))} volume", voxels),
        guard.too_many_bytes(f"a {'x'.join(map(str, dims))} {dtype} volume takes", expected),
    ):
        if err:
            raise MedicalDecodeError(err)
    return dims, expected


def _voxel_bytes(data: bytes, gz: bool, expected: int, dims: list[int], dtype: np.dtype) -> bytes:
    """The file's bytes with the voxels at their offset: a gzipped file inflated within the size
    its header declares (plus slack), a truncated one refused."""
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
            raise MedicalDecodeError(
                f"truncated NIfTI: the gzip stream ends early ({len(raw):,} of {expected:,} bytes)"
            )
    else:
        raw = data
    if len(raw) < expected:
        raise MedicalDecodeError(
            f"corrupt or truncated NIfTI data: {len(raw):,} of the {expected:,} bytes its header declares"
        )
    return raw


def read_nifti(data: bytes, *, select: SeriesSelector, guard: InputGuard) -> list[GreySlice]:
    """A single-file NIfTI-1/2 volume (gzipped or not) as 8-bit slices along its third axis,
    every size its header declares checked against the guard before a voxel is inflated."""
    import nibabel as nib

    if not data:
        raise MedicalDecodeError("empty file (0 bytes)")
    version = nifti_version(data)
    if version is None:
        raise MedicalDecodeError(
            "corrupt NIfTI: no NIfTI-1 or NIfTI-2 single-file header (.hdr/.img pairs are not read)"
        )
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
    dims, expected = _checked_dims(shape, dtype, offset, guard)
    codes = _axcodes(affine)
    plane = _PLANE_OF_AXIS.get(codes[2]) if codes else None
    select.check_nifti(plane, NO_INFO)

    raw = _voxel_bytes(data, gz, expected, dims, dtype)
    # A view of the bytes, not a copy: each slice is scaled and windowed on its own.
    voxels_of = np.ndarray(tuple(dims), dtype=dtype, buffer=raw, offset=offset, order="F")
    scale = _nifti_scaling(slope, inter)
    to_u8: Callable[[np.ndarray], np.ndarray]
    if np.isfinite(cal).all() and cal[1] > cal[0]:
        window = ((cal[0] + cal[1]) / 2, cal[1] - cal[0], "LINEAR_EXACT")
        to_u8 = lambda v: voi_window(v, *window)  # noqa: E731
    else:
        to_u8 = head_levels(_volume_sample(voxels_of, scale), _slice_edges(voxels_of, scale))
    mode = f"NIfTI-{version} {hdr.get_data_dtype()}"
    return [
        GreySlice(_display_slice(to_u8(scale(voxels_of[:, :, k])), codes, plane), mode, SliceInfo(slice_index=k))
        for k in range(dims[2])
    ]


def _nifti_scaling(slope: Any, inter: Any):
    """scl_slope/scl_inter applied as nibabel applies them, to float32 (what reading the volume
    with ``np.asarray(img.dataobj, dtype=np.float32)`` gives, one part at a time)."""
    from nibabel.volumeutils import apply_read_scaling

    # Any: nibabel's stubs want a scalar, and a 0-d array is one to its code.
    s: Any = np.asanyarray(1.0 if slope is None else slope)
    i: Any = np.asanyarray(0.0 if inter is None else inter)
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


def _slice_edges(voxels: np.ndarray, scale) -> np.ndarray:
    """The voxels on the edges of the slices (first and last row and column of ``data[:, :, k]``),
    scaled, of every slice or of an even choice of them (at most about ``_PERCENTILE_SAMPLE``
    voxels): where a head volume's field of view is empty."""
    x, y, z = voxels.shape
    voxels = voxels[:, :, :: -(-2 * (x + y) * z // _PERCENTILE_SAMPLE)]
    faces = [voxels[0], voxels[-1]] if x > 1 else [voxels[0]]
    faces += [voxels[1:-1, 0], voxels[1:-1, -1]] if y > 1 else [voxels[1:-1, 0]]
    return np.concatenate([scale(f).ravel() for f in faces])


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


def mask_slice_counts(data: bytes, *, guard: InputGuard) -> tuple[tuple[int, int, int], np.ndarray]:
    """A NIfTI segmentation mask's shape (x, y, slices) and, per slice along its last axis (the
    axis :func:`read_nifti` cuts a volume along), how many voxels it marks (non-zero)."""
    import nibabel as nib

    if err := guard.too_many_bytes("the mask holds", len(data)):
        raise MedicalDecodeError(err)
    version = nifti_version(data)
    if version is None:
        raise MedicalDecodeError("corrupt NIfTI mask: no NIfTI-1 or NIfTI-2 single-file header")
    raw: bytes | bytearray = data
    if data[:2] == GZIP_MAGIC:
        try:
            raw, complete = inflate(data, guard.max_file_bytes)
        except zlib.error as e:
            raise MedicalDecodeError(f"corrupt NIfTI mask gzip stream ({e})") from None
        if len(raw) > guard.max_file_bytes:
            raise MedicalDecodeError(
                f"decompression bomb: the mask's gzip content is over guard.max_file_bytes="
                f"{guard.max_file_bytes:,}; refused without inflating the rest"
            )
        if not complete:
            raise MedicalDecodeError("truncated NIfTI mask: the gzip stream ends early")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = (nib.Nifti1Image if version == 1 else nib.Nifti2Image).from_bytes(bytes(raw))
            shape = tuple(int(v) for v in img.shape)
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            if len(shape) == 2:
                shape = shape + (1,)
            if len(shape) != 3:
                raise MedicalDecodeError(f"a {len(shape)}-D NIfTI mask: only 2-D and 3-D masks are read")
            if err := guard.too_many_pixels("the mask", int(np.prod(shape, dtype=np.int64))):
                raise MedicalDecodeError(err)
            marked = np.asanyarray(img.dataobj).reshape(shape, order="F")
            counts = np.count_nonzero(marked, axis=(0, 1))
    except MedicalDecodeError:
        raise
    except Exception as e:  # nibabel's message may quote header values: only its type
        raise MedicalDecodeError(f"corrupt NIfTI mask ({type(e).__name__})") from None
    return shape, counts
