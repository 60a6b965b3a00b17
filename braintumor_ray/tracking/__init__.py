"""Experiment tracking and the model registry in MLflow (the optional ``mlflow`` extra).

Every stage's config has ``mlflow`` (:class:`MLflowConfig`); without a tracking URI nothing here
imports mlflow or logs anything. The driver logs (never a Ray worker):

    t = start_tracking(cfg.mlflow, run_folder, stage="train", name=cfg.name, params=cfg.to_dict(), resume=resume)
    finish_training(t, metrics, run_folder)             # metrics, artifacts, registered model version
    found = find_registered_version("models:/NAME/3", cfg.mlflow)  # the registry's entry (models fetches it)
"""

from ._config import MLflowConfig
from ._mlflow import (
    MODELS_SCHEME,
    RUN_ID_FILE,
    RegisteredVersion,
    Tracking,
    find_registered_version,
    finish_search,
    finish_training,
    log_scoring,
    start_tracking,
)

__all__ = [
    "MLflowConfig",
    "MODELS_SCHEME",
    "RUN_ID_FILE",
    "RegisteredVersion",
    "Tracking",
    "find_registered_version",
    "finish_search",
    "finish_training",
    "log_scoring",
    "start_tracking",
]
