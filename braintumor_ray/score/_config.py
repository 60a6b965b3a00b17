"""Scoring's settings: one self-validating dataclass; ``jobs/score.py`` is generated from it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from ..core import (
    LEASE_SUFFIX,
    STAGING_SUFFIX,
    ConfigError,
    InputSettings,
    check_disjoint,
    setting,
)
from ..imaging import InputGuard, SeriesSelector
from ..tracking import MLflowConfig
from ._dicom_out import DEFAULT_BANNER, DICOM_SUFFIX, DicomOut
from ._dicom_send import DEFAULT_AE_TITLE, check_ae_title, parse_destinations
from ._explain import EXPLAIN_SUFFIX
from ._layout import SERIES_SUFFIX

# The effective settings, written into the output folder. The leading underscore keeps it out of
# pyarrow/pandas/Spark/Ray dataset discovery of the predictions (they skip "_" and "." files).
OUTPUT_CONFIG_FILE = "_config.yaml"
# How the output names files and UIDs (path_mode, uid_mode, key_id): a rerun in another mode or
# with another key is refused instead of scoring every file again under a second name.
OUTPUT_IDS_FILE = "_identifiers.json"
# What scoring writes beside OUTPUT (OUTPUT_series/, OUTPUT_explain/, OUTPUT_dicom/, OUTPUT._staging/, the lease): like
# OUTPUT itself, none of them may lie inside the input or hold it.
OUTPUT_SIBLINGS = (SERIES_SUFFIX, EXPLAIN_SUFFIX, DICOM_SUFFIX, STAGING_SUFFIX, LEASE_SUFFIX)
# The scoring engines (braintumor_ray.models.ENGINES, kept light here: no torch import to parse options).
Engine = Literal["auto", "onnxruntime", "torch"]
# Which scored rows get a heat map (score/_explain.py).
Explain = Literal["none", "flagged", "positive", "all"]
# How a heat map is made (score/_explain.py): from the forward pass where the head allows, or by gradients.
ExplainMethod = Literal["auto", "gradcam"]
# Test-time augmentation (braintumor_ray.models.TTA_MODES, kept light here).
Tta = Literal["none", "flip"]
# How the model runs beside the reads (docs/scoring.md, "Layouts"): model actors fed by decode
# tasks, or tasks that read, decode and score their own files with a model kept per worker.
Layout = Literal["auto", "tasks", "replicas"]


@dataclass(frozen=True, kw_only=True)
class ScoreConfig(InputSettings):
    """What to score with which model, and where the predictions go (the input settings the ingest
    shares: :class:`~braintumor_ray.core.InputSettings`)."""

    model: str = setting(
        help="exported model package folder, local or s3://, or a registered model: "
        "models:/NAME/VERSION or models:/NAME@ALIAS (needs mlflow.tracking_uri)"
    )
    input: str = setting(help="folder or prefix of images (any depth, any names), local or s3://")
    output: str = setting(
        help="Parquet folder of predictions, local or s3://; rows of earlier runs stay and are not redone"
    )
    batch_size: int = setting(32, help="images per model call")
    concurrency: int | None = setting(
        None,
        help="model replicas (none: one per GPU with use_gpu; on CPUs, one per 2 "
        "of the 3/4 of the cluster's CPUs that run the model, the rest decodes); with layout tasks, "
        "a cap on tasks at once (none: as many as the CPUs run; a cap costs speed, each task then waits for "
        "another to end)",
    )
    layout: Layout = setting(
        "auto",
        help="tasks = each Ray task reads, decodes and scores its own files with a model loaded once per "
        "worker process (CPUs only: no data between processes, no actor to start); replicas = model actors "
        "fed by separate decode tasks (GPUs, large models); auto = tasks on CPU with onnxruntime, else replicas",
    )
    use_gpu: bool = setting(False, help="one GPU per model replica; decoding stays on CPUs")
    engine: Engine = setting(
        "auto",
        help="inference engine: auto = onnxruntime on CPU when the package has model.onnx, else torch (and "
        "always torch with use_gpu); onnxruntime needs model.onnx; torch is eager PyTorch. Same labels either way",
    )
    tta: Tta = setting(
        "none",
        help="test-time augmentation: flip = also score each image mirrored left-right and "
        "average the logits (maps: the mirror's flipped back), about 2x the model's time; none = one "
        "pass. Rows already scored are not redone for a change of it (use rescore_all)",
    )
    cpus_per_replica: float | None = setting(
        None,
        help="CPUs of each model replica, which runs that many intra-op "
        "threads, rounded (none: 1 with use_gpu, else the model's 3/4 of the CPUs "
        "shared by the replicas); at least 0.5 CPU must be left to decode; with layout tasks, the CPUs "
        "(threads) of each task (none: 1)",
    )
    select: SeriesSelector = setting(
        default_factory=SeriesSelector,
        help="which DICOM series and NIfTI volumes to score; files it leaves out get a "
        "skipped row (plain images are all scored)",
    )
    guard: InputGuard = setting(
        default_factory=InputGuard,
        help="what the model is for, checked before it sees a "
        "file: other DICOM modalities and body parts are skipped, images with no content are "
        "errors",
    )
    expect_model_id: str | None = setting(
        None,
        help="the model_id the package must have (pin the model a scheduled "
        "job scores with): any other package is refused before any work",
    )
    review_threshold: float | None = setting(
        None,
        help="flag ok rows whose calibrated confidence is below this "
        "for review (low_confidence) (none: the threshold the model package "
        "chose on its validation split)",
    )
    explain: Explain = setting(
        "flagged",
        help="heat maps (an overlay PNG in OUTPUT_explain/, its path and "
        "peak in the predictions) for: flagged = rows with a tumour class or a review_reason; "
        "positive = a tumour class; all = every scored row; none. Rows scored by earlier runs "
        "keep what they had",
    )
    explain_method: ExplainMethod = setting(
        "auto",
        help="how a heat map is made: auto = the class-activation map from the same forward pass as the "
        "prediction, where the model's head is global pooling + a linear layer (every backbone trained here) and its "
        "package gives the maps (packages exported before them, and other heads: Grad-CAM); gradcam = gradient Grad-CAM "
        "at the last feature stage: a PyTorch forward and backward pass per batch of maps, and PyTorch in every model "
        "replica",
    )
    dicom_out: DicomOut = setting(
        "none",
        help="DICOM objects in OUTPUT_dicom/ for each scored DICOM series, in its "
        "study: sr = a Comprehensive 3D SR (TID 1500: finding, class, confidence, review "
        "reason, model); sc = a Secondary Capture of the top slice with its heat map and a "
        "text banner, for flagged or positive series; sr+sc both; none. Plain images and "
        "NIfTI volumes get none",
    )
    dicom_send: str | None = setting(
        None,
        help="send the objects of OUTPUT_dicom/ to: dicom://CALLED_AET@HOST:PORT "
        "(C-STORE) or http(s)://HOST:PORT/dicom-web (STOW-RS), comma-separated for several; "
        "each object once per destination (OUTPUT_dicom/_sent.json); a failed send is a "
        "warning, and the next run sends it",
    )
    dicom_ae_title: str = setting(DEFAULT_AE_TITLE, help="our (calling) AE title for C-STORE: the PACS must know it")
    dicom_send_retries: int = setting(
        3, help="times a failed send is tried again (backoff 0.5 s, doubling) before it waits for the next run"
    )
    dicom_banner: str = setting(
        DEFAULT_BANNER,
        help="notice burned into the SC's banner and put in both objects' SeriesDescription (empty: none)",
    )
    dicom_identifiers: bool = setting(
        False,
        help="with a hashed path_mode or uid_mode, copy the source's patient "
        "module and UIDs into the DICOM objects anyway (they then join the source study "
        "in the PACS); without it they carry hashed UIDs and no patient data",
    )
    retry_errors: int = setting(
        3,
        help="times later runs try a file again whose row is an error that may come out "
        "otherwise (it could not be read, or killed its decode task; or the guard's limits "
        "changed since); then its error row is final. A changed file starts again. 0: error "
        "rows are final",
    )
    rescore_all: bool = setting(
        False,
        help="score every file again and replace every earlier row of the output "
        "(needed to score an output that holds another model's rows: one model per output)",
    )
    # Seconds, not a flag: an unbounded wait lets scheduled runs pile up behind a stuck one.
    wait: float = setting(
        0.0,
        help="seconds to wait for another run that holds the output's lease (OUTPUT._lease.json) "
        "to finish or for its lease to expire, instead of refusing at once (0: refuse)",
    )
    lease_ttl_s: float = setting(
        120.0,
        help="lease time-to-live: the run renews its lease on the output every "
        "lease_ttl_s/4; a run that stops renewing (killed) is taken over this long after its "
        "last renewal",
    )
    mlflow: MLflowConfig = setting(
        default_factory=MLflowConfig,
        help="MLflow run of each scoring job and the registry that models:/ names are looked up in",
    )

    def __post_init__(self) -> None:
        if not (self.model and self.input and self.output):
            raise ConfigError("model, input and output are all required")
        if not 1 <= self.batch_size <= 4096:
            raise ConfigError(f"batch_size={self.batch_size} is out of range: use 1..4096")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency={self.concurrency} must be at least 1")
        if self.explain not in get_args(Explain):
            raise ConfigError(f"explain={self.explain!r} is unknown: use one of {', '.join(get_args(Explain))}")
        if self.explain_method not in get_args(ExplainMethod):
            raise ConfigError(
                f"explain_method={self.explain_method!r} is unknown: use one of {', '.join(get_args(ExplainMethod))}"
            )
        if self.tta not in get_args(Tta):
            raise ConfigError(f"tta={self.tta!r} is unknown: use one of {', '.join(get_args(Tta))}")
        if self.layout not in get_args(Layout):
            raise ConfigError(f"layout={self.layout!r} is unknown: use one of {', '.join(get_args(Layout))}")
        if self.layout == "tasks" and self.use_gpu:
            raise ConfigError(
                "layout=tasks runs the model on CPUs only, and use_gpu is set: use layout replicas (or auto) with "
                "use_gpu, or drop use_gpu"
            )
        if self.engine not in get_args(Engine):
            raise ConfigError(f"engine={self.engine!r} is unknown: use one of {', '.join(get_args(Engine))}")
        if self.cpus_per_replica is not None and not 0 < self.cpus_per_replica <= 1024:
            raise ConfigError(f"cpus_per_replica={self.cpus_per_replica} is out of range: use a number of CPUs > 0")
        check_disjoint(self.input, self.output, siblings=OUTPUT_SIBLINGS)
        if self.expect_model_id is not None and not re.fullmatch(r"[0-9a-f]{16}", self.expect_model_id.strip().lower()):
            raise ConfigError(
                f"expect_model_id={self.expect_model_id!r} is not a model id: give the 16 hex digits of a "
                "package's model_id (model.json, or the model_id column of earlier predictions)"
            )
        if self.review_threshold is not None and not 0.0 <= self.review_threshold <= 1.0:
            raise ConfigError(f"review_threshold={self.review_threshold}: use a probability in 0..1")
        if not isinstance(self.select, SeriesSelector):
            raise ConfigError(f"select must be a SeriesSelector, not {type(self.select).__name__}")
        if self.dicom_out not in get_args(DicomOut):
            raise ConfigError(f"dicom_out={self.dicom_out!r} is unknown: use one of {', '.join(get_args(DicomOut))}")
        parse_destinations(self.dicom_send)
        check_ae_title(self.dicom_ae_title, "dicom_ae_title")
        if not 0 <= self.dicom_send_retries <= 10:
            raise ConfigError(f"dicom_send_retries={self.dicom_send_retries} is out of range: use 0..10")
        if len(self.dicom_banner) > 200 or any(not c.isprintable() for c in self.dicom_banner):
            raise ConfigError("dicom_banner must be one printable line of at most 200 characters")
        if not 0 <= self.retry_errors <= 1000:
            raise ConfigError(f"retry_errors={self.retry_errors} is out of range: use 0 (errors are final) up to 1000")
        if not 0 <= self.wait <= 7 * 86400:
            raise ConfigError(f"wait={self.wait} is out of range: use 0 (refuse at once) up to 604800 seconds")
        if not 1 <= self.lease_ttl_s <= 86400:
            raise ConfigError(f"lease_ttl_s={self.lease_ttl_s} is out of range: use 1..86400 seconds")
        super().__post_init__()
