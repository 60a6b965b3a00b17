"""The scoring stage (``jobs/score.py``): an MRI archive -> one Parquet row per file or slice, incrementally."""

from ._config import OUTPUT_CONFIG_FILE, ScoreConfig
from ._decode import decode_batch
from ._derived import ScoringSummary, format_summary
from ._layout import PROB_PREFIX, SERIES_FILE, output_schema, recover
from ._plan import (
    ClusterShape,
    PriorFile,
    RerunDiff,
    ScoringPlan,
    plan_layout,
    plan_replicas,
    plan_scoring,
    plan_tasks,
    prior_state,
    rerun_diff,
)
from ._run import Predictor, actor_threads, run_scoring
from ._series import Verdict, series_bytes, series_location, series_table, series_verdict, top_slice

__all__ = [
    "ClusterShape",
    "PriorFile",
    "RerunDiff",
    "ScoringPlan",
    "ScoringSummary",
    "plan_scoring",
    "prior_state",
    "rerun_diff",
    "OUTPUT_CONFIG_FILE",
    "PROB_PREFIX",
    "SERIES_FILE",
    "Predictor",
    "ScoreConfig",
    "actor_threads",
    "decode_batch",
    "format_summary",
    "output_schema",
    "plan_layout",
    "plan_replicas",
    "plan_tasks",
    "recover",
    "run_scoring",
    "series_location",
    "series_table",
    "series_verdict",
    "Verdict",
    "top_slice",
    "series_bytes",
]
