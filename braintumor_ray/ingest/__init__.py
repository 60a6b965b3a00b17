"""The ingest stage (``jobs/preprocess.py``): MRI folders -> preprocessed Parquet shards + report.json."""

from ._report import REPORT_FILE, FileError, IngestCounts, IngestReport, format_summary
from ._run import IMAGE_EXTENSIONS, IngestConfig, InputPlan, plan_inputs, run_ingest
from ._splits import (
    ImageFacts,
    SplitDecision,
    SplitResult,
    assign_splits,
    carve_validation,
    flag_leaks,
    group_images,
    keep_one_per_group,
    val_count,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "REPORT_FILE",
    "FileError",
    "ImageFacts",
    "IngestConfig",
    "IngestCounts",
    "IngestReport",
    "InputPlan",
    "SplitDecision",
    "SplitResult",
    "assign_splits",
    "carve_validation",
    "flag_leaks",
    "format_summary",
    "group_images",
    "keep_one_per_group",
    "plan_inputs",
    "run_ingest",
    "val_count",
]
