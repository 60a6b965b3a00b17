"""Scoring's settings: one self-validating dataclass; ``jobs/score.py`` is generated from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..core import Config, ConfigError, setting
from ..imaging import InputGuard, SeriesSelector
from ..tracking import MLflowConfig

# The effective settings, written into the output folder. The leading underscore keeps it out of
# pyarrow/pandas/Spark/Ray dataset discovery of the predictions (they skip "_" and "." files).
OUTPUT_CONFIG_FILE = "_config.yaml"
# The scoring engines (braintumor_ray.models.ENGINES, kept light here: no torch import to parse options).
Engine = Literal["auto", "onnxruntime", "torch"]

@dataclass(frozen=True, kw_only=True)
class ScoreConfig(Config):
    """What to score with which model, and where the predictions go."""

    model: str = setting(help="exported model package folder, local or s3://, or a registered model: "
                         "models:/NAME/VERSION or models:/NAME@ALIAS (needs mlflow.tracking_uri)")
    input: str = setting(help="folder or prefix of images (any depth, any names), local or s3://")
    output: str = setting(help="Parquet folder of predictions, local or s3://; rows of earlier runs stay and "
                          "are not redone")
    batch_size: int = setting(32, help="images per model call")
    concurrency: int | None = setting(None, help="model replicas (none: one per GPU with use_gpu; on CPUs, one per 2 "
                                      "of the 3/4 of the cluster's CPUs that run the model, the rest decodes)")
    use_gpu: bool = setting(False, help="one GPU per model replica; decoding stays on CPUs")
    engine: Engine = setting(
        "auto", help="inference engine: auto = onnxruntime on CPU when the package has model.onnx, else torch (and "
        "always torch with use_gpu); onnxruntime needs model.onnx; torch is eager PyTorch. Same labels either way")
    cpus_per_replica: float | None = setting(None, help="CPUs of each model replica, which runs that many intra-op "
                                             "threads, rounded (none: 1 with use_gpu, else the model's 3/4 of the CPUs "
                                             "shared by the replicas); at least 0.5 CPU must be left to decode")
    s3_endpoint_url: str | None = setting(None, help="S3-compatible endpoint", env="AWS_ENDPOINT_URL")
    select: SeriesSelector = setting(default_factory=SeriesSelector,
                                     help="which DICOM series and NIfTI volumes to score; files it leaves out get a "
                                     "skipped row (plain images are all scored)")
    guard: InputGuard = setting(default_factory=InputGuard, help="what the model is for, checked before it sees a "
                                "file: other DICOM modalities and body parts are skipped, images with no content are "
                                "errors")
    review_threshold: float | None = setting(None, help="flag ok rows whose calibrated confidence is below this "
                                             "for review (low_confidence) (none: the threshold the model package "
                                             "chose on its validation split)")
    mlflow: MLflowConfig = setting(default_factory=MLflowConfig, help="MLflow run of each scoring job and the "
                                   "registry that models:/ names are looked up in")

    def __post_init__(self) -> None:
        if not (self.model and self.input and self.output):
            raise ConfigError("model, input and output are all required")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"batch_size={self.batch_size} is out of range: use 1..4096")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency={self.concurrency} must be at least 1")
        if self.engine not in get_args(Engine):
            raise ConfigError(f"engine={self.engine!r} is unknown: use one of {', '.join(get_args(Engine))}")
        if self.cpus_per_replica is not None and not 0 < self.cpus_per_replica <= 1024:
            raise ConfigError(f"cpus_per_replica={self.cpus_per_replica} is out of range: use a number of CPUs > 0")
        if self.output.rstrip("/") == self.input.rstrip("/"):
            raise ConfigError("output must not be the input folder: predictions would be scored as images")
        if self.review_threshold is not None and not 0.0 <= self.review_threshold <= 1.0:
            raise ConfigError(f"review_threshold={self.review_threshold}: use a probability in 0..1")
        if not isinstance(self.select, SeriesSelector):
            raise ConfigError(f"select must be a SeriesSelector, not {type(self.select).__name__}")
