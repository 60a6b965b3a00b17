"""The ingest stage (``jobs/preprocess.py``): MRI folders -> preprocessed Parquet shards + report.json."""

from ._run import IMAGE_EXTENSIONS, IngestConfig, format_summary, plan_inputs, run_ingest

__all__ = ["IMAGE_EXTENSIONS", "IngestConfig", "format_summary", "plan_inputs", "run_ingest"]
