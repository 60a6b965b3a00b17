"""Imaging code shared by the ingest, training and scoring: one preprocessing, one reader.

:class:`MRIPreprocess` (decode, crop the head, resize) is the code every stage runs, so a model
never sees pixels prepared differently from its training data; DICOM and NIfTI volumes are read
slice by slice (``read_medical``); :class:`TrainAugment` is the training-time augmentation;
``make_sample_dataset`` generates an MRI-like sample for demos and tests.
"""

from ._dicom import DICOM_SUFFIXES
from ._guard import HEAD_BODY_PARTS, NO_GUARD, ORIENTATIONS, InputGuard, SeriesSelector, SliceInfo
from ._hashing import group_duplicates, phash, sha256_hex
from ._medical import read_medical, sniff_kind
from ._nifti import NIFTI_SUFFIXES, mask_slice_counts
from ._preprocess import (
    SLICE_SKIP_REASONS,
    FileResult,
    MRIPreprocess,
    SkippedSlice,
    decode_image,
    decode_png,
    encode_png,
    find_head,
    find_head_box,
    image_pages,
    original_xy,
    resize_pad,
    to_gray_u8,
)
from ._sample import SampleHead, make_sample_dataset, render_mri
from ._window import percentile_window, voi_window

# TrainAugment needs torch (seconds to import); the ingest's Ray workers never do.
_LAZY = {"TrainAugment": "._augment"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DICOM_SUFFIXES",
    "HEAD_BODY_PARTS",
    "NO_GUARD",
    "FileResult",
    "InputGuard",
    "NIFTI_SUFFIXES",
    "ORIENTATIONS",
    "MRIPreprocess",
    "SLICE_SKIP_REASONS",
    "SampleHead",
    "SeriesSelector",
    "SkippedSlice",
    "SliceInfo",
    "TrainAugment",
    "decode_image",
    "decode_png",
    "encode_png",
    "find_head",
    "find_head_box",
    "group_duplicates",
    "image_pages",
    "make_sample_dataset",
    "mask_slice_counts",
    "original_xy",
    "percentile_window",
    "phash",
    "read_medical",
    "render_mri",
    "resize_pad",
    "sha256_hex",
    "sniff_kind",
    "to_gray_u8",
    "voi_window",
]
