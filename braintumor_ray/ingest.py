"""Public face of the ingest stage."""

from ._ingest import IMAGE_EXTENSIONS, IngestConfig, format_summary, plan_inputs, run_ingest

__all__ = ["IMAGE_EXTENSIONS", "IngestConfig", "format_summary", "plan_inputs", "run_ingest"]
