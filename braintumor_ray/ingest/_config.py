"""The ingest's settings: one self-validating dataclass; ``jobs/preprocess.py`` is generated from it."""

from __future__ import annotations

from dataclasses import dataclass

from ..core import ConfigError, InputSettings, setting
from ..imaging import InputGuard, MRIPreprocess, SeriesSelector


@dataclass(frozen=True, kw_only=True)
class IngestConfig(InputSettings):
    """What to read, where to write, and how. Each field's help is the one description of it; the
    input settings scoring shares (S3 endpoint, path and UID modes, folder depth) are
    :class:`~braintumor_ray.core.InputSettings`'s."""

    input: str = setting(
        help="folder of <split>/<class>/<image> or <class>/<image> (DICOM and NIfTI files at any "
        "depth below <class>), local or s3:// (the job: default a generated sample in ./demo/sample)"
    )
    output: str = setting(
        help="folder for the Parquet shards and report.json, local or s3:// "
        "(the job: default ./demo/preprocessed with no --input)"
    )
    preprocess: MRIPreprocess = setting(
        default_factory=MRIPreprocess, help="crop and resize, shared with training and scoring"
    )
    val_fraction: float = setting(0.15, help="share of each class's training groups moved to the validation split")
    seed: int = setting(0, help="seed of the validation split")
    # 2 catches re-encoded copies and neighbouring slices of one scan in the real data; at 4,
    # different patients match.
    near_dup_distance: int = setting(
        2, help="largest pHash Hamming distance (bits of 64) that counts as a near duplicate (-1: off)"
    )
    overwrite: bool = setting(False, help="replace a non-empty output")
    images_per_block: int = setting(128, help="unit of parallel work and most rows per Parquet file")
    select: SeriesSelector = setting(
        default_factory=SeriesSelector,
        help="which DICOM series and NIfTI volumes to use; files it leaves out are counted in the report, not errors",
    )

    # BraTS-style datasets put a segmentation beside each patient's volumes (BraTS20_..._seg.nii.gz).
    mask_pattern: str | None = setting(
        None,
        help="file name pattern (fnmatch, e.g. *_seg.nii.gz) of a NIfTI "
        "segmentation mask beside a volume: the volumes in its folder are labelled per "
        "slice from it (enough lesion: the folder's class; none: no_tumor; in between: "
        "left out); masks are never ingested as images",
    )
    # 1% of an axial head section is about 2 cm^2 (a lesion 15 mm across), which a reader sees on
    # a slice; slices with less lesion than that, but some, are neither clearly tumour nor healthy.
    mask_min_lesion: float = setting(
        0.01,
        help="share of a slice's head area the mask must mark for the slice to "
        "take the folder's tumour class (slices with some lesion, but less, are left "
        "out)",
    )
    guard: InputGuard = setting(
        default_factory=InputGuard,
        help="what the model is for: other DICOM modalities and "
        "body parts are left out (counted as not selected), images with no content are "
        "errors",
    )

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("input and output are both required: give a local path or s3://bucket/prefix")
        if not 0.0 <= self.val_fraction < 0.9:
            raise ConfigError(f"val_fraction={self.val_fraction} is out of range: use 0 <= val_fraction < 0.9")
        if not -1 <= self.near_dup_distance <= 32:
            raise ConfigError(f"near_dup_distance={self.near_dup_distance} is out of range: use -1..32 bits")
        if self.images_per_block < 1:
            raise ConfigError(f"images_per_block={self.images_per_block} must be at least 1")
        if not isinstance(self.select, SeriesSelector):
            raise ConfigError(f"select must be a SeriesSelector, not {type(self.select).__name__}")
        if self.mask_pattern is not None and (not self.mask_pattern.strip() or "/" in self.mask_pattern):
            raise ConfigError(
                f"mask_pattern={self.mask_pattern!r}: give a file name pattern such as *_seg.nii.gz "
                "(no folders), or leave it out"
            )
        if not 0.0 < self.mask_min_lesion <= 1.0:
            raise ConfigError(f"mask_min_lesion={self.mask_min_lesion} is out of range: use a share in (0, 1]")
        super().__post_init__()
