"""Hyperparameter search across backbones with Ray Tune (``jobs/tune.py``).

    from braintumor_ray.tune import SearchConfig, run_search
    summary = run_search(SearchConfig(data="s3://b/preprocessed", storage="s3://b/runs", name="search1"))

Each trial is the training job's Ray Train run (``train_loop_per_worker`` under a
``TorchTrainer``), launched inside the Tune function; ASHA stops weak trials on validation
macro-F1; the leaderboard, a plot and the best trial's model package land in ``storage/name``.
"""

from ._config import (
    DEFAULT_MODELS,
    RESERVED,
    SAMPLERS,
    SEARCHABLE,
    SearchConfig,
    default_space,
    parse_space,
    to_tune_space,
)
from ._run import (
    BEST_DIR,
    ENSEMBLE_DIR,
    SEARCH_FILE,
    SearchError,
    format_leaderboard,
    leaderboard_rows,
    load_search_config,
    max_concurrent,
    run_search,
    search_location,
    trial_driver,
)
from ._summary import format_summary

__all__ = [
    "BEST_DIR",
    "ENSEMBLE_DIR",
    "DEFAULT_MODELS",
    "RESERVED",
    "SAMPLERS",
    "SEARCHABLE",
    "SEARCH_FILE",
    "SearchConfig",
    "SearchError",
    "default_space",
    "format_leaderboard",
    "format_summary",
    "leaderboard_rows",
    "load_search_config",
    "max_concurrent",
    "parse_space",
    "run_search",
    "search_location",
    "to_tune_space",
    "trial_driver",
]
