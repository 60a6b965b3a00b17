"""Scoring's settings: one self-validating dataclass; ``jobs/score.py`` is generated from it."""

from __future__ import annotations

from dataclasses import dataclass

from ..core import Config, ConfigError, setting
from ..imaging import SeriesSelector


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(Config):
    """What to score with which model, and where the predictions go."""

    model: str = setting(help="exported model package folder, local or s3://")
    input: str = setting(help="folder or prefix of images (any depth, any names), local or s3://")
    output: str = setting(help="Parquet folder of predictions, local or s3://; rows of earlier runs stay and "
                          "are not redone")
    batch_size: int = setting(32, help="images per model call")
    concurrency: int | None = setting(None, help="model replicas (none: one per GPU with use_gpu, else half the "
                                      "cluster's CPUs, the other half decodes)")
    use_gpu: bool = setting(False, help="one GPU per model replica; decoding stays on CPUs")
    s3_endpoint_url: str | None = setting(None, help="S3-compatible endpoint", env="AWS_ENDPOINT_URL")
    select: SeriesSelector = setting(default_factory=SeriesSelector,
                                     help="which DICOM series and NIfTI volumes to score; files it leaves out get a "
                                     "skipped row (plain images are all scored)")

    def __post_init__(self) -> None:
        if not (self.model and self.input and self.output):
            raise ConfigError("model, input and output are all required")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"batch_size={self.batch_size} is out of range: use 1..4096")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency={self.concurrency} must be at least 1")
        if self.output.rstrip("/") == self.input.rstrip("/"):
            raise ConfigError("output must not be the input folder: predictions would be scored as images")
        if not isinstance(self.select, SeriesSelector):
            raise ConfigError(f"select must be a SeriesSelector, not {type(self.select).__name__}")
