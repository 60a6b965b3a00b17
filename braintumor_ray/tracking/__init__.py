"""Experiment tracking and the model registry in MLflow (the optional ``mlflow`` extra).

Every stage's config has ``mlflow`` (:class:`MLflowConfig`); without a tracking URI nothing here
imports mlflow or logs anything. The driver logs (never a Ray worker):

    t = start_tracking(cfg.mlflow, run_folder, stage="train", name=cfg.name, params=cfg.to_dict(), resume=resume)
    finish_training(t, metrics, run_folder)             # metrics, artifacts, registered model version
    config, registered = resolve_registered_model(score_config)   # models:/NAME/VERSION -> a package folder
"""

from ._config import MLflowConfig
from ._mlflow import (
    MODELS_SCHEME,
    RUN_ID_FILE,
    Tracking,
    finish_search,
    finish_training,
    log_scoring,
    resolve_registered_model,
    start_tracking,
)

__all__ = [
    "MLflowConfig",
    "MODELS_SCHEME",
    "RUN_ID_FILE",
    "Tracking",
    "finish_search",
    "finish_training",
    "log_scoring",
    "resolve_registered_model",
    "start_tracking",
]
