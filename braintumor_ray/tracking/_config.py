"""MLflow settings, one nested config reused by training, search and scoring (``--mlflow.*``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core import Config, ConfigError, setting


@dataclass(frozen=True, kw_only=True)
class MLflowConfig(Config):
    """Where a stage logs its MLflow runs; nothing is logged (and mlflow is not imported) without
    a tracking URI."""

    tracking_uri: str | None = setting(
        None,
        help="MLflow tracking server (http://host:5000, or any URI MLflow takes); none: nothing is logged to MLflow",
        env="MLFLOW_TRACKING_URI",
        aliases=("--mlflow-tracking-uri",),
    )
    experiment: str = setting(
        "braintumor-ray", help="MLflow experiment of the runs (created if missing)", env="MLFLOW_EXPERIMENT_NAME"
    )
    registered_model: str = setting(
        "braintumor-classifier",
        help="registered model that training and search add their model package to as a new version",
    )

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ConfigError("mlflow.experiment must not be empty")
        if not self.registered_model or "/" in self.registered_model or "@" in self.registered_model:
            raise ConfigError(f"mlflow.registered_model={self.registered_model!r}: give a name without '/' or '@'")

    @property
    def enabled(self) -> bool:
        return bool(self.tracking_uri)
