"""The search's settings and its search space: one self-validating dataclass; ``jobs/tune.py`` is generated
from it and takes it as ``--config`` YAML (``space:``, ``fixed:`` and any other setting)."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..core import Config, ConfigError, setting
from ..models import Transfer
from ..tracking import MLflowConfig
from ..train import TrainConfig

DEFAULT_MODELS = ("efficientnet_b0", "resnet50", "vgg16", "legacy_xception")

# The default space's keys (``model`` is the backbone axis); any other TrainConfig setting may be searched too.
SEARCHABLE = ("model", "lr", "weight_decay", "batch_size", "transfer", "drop_rate", "augment_strength")
# Set by the search itself, so neither a space nor a fixed setting may override them.
RESERVED = (
    "data",
    "storage",
    "name",
    "epochs",
    "num_workers",
    "cpus_per_worker",
    "use_gpu",
    "gpus_per_worker",
    "s3_endpoint_url",
    "pretrained",
    "seed",
    "max_failures",
    "mlflow",
)

# The samplers of a space key and what each draws (docs/configuration.md lists these lines).
SAMPLERS = {
    "choice": "`{choice: [a, b, c]}`: one of the values, at random per trial",
    "uniform": "`{uniform: [low, high]}`: a float, uniform in [low, high)",
    "loguniform": "`{loguniform: [low, high]}`: a float, uniform in log space (low > 0)",
    "randint": "`{randint: [low, high]}`: an integer in [low, high)",
    "grid": "`{grid: [a, b]}`: every value; multiplies the trial count by the list's length",
}


def default_space(*, pretrained: bool) -> dict[str, Any]:
    """Ranges around the Lite0 defaults of the training job (lr 1e-3, wd 0.01, dropout 0.3).

    Transfer depth is searched only on pretrained weights: random init always trains everything.
    """
    space: dict[str, Any] = {
        "lr": {"loguniform": [3e-4, 3e-3]},
        "weight_decay": {"loguniform": [1e-3, 1e-1]},
        "batch_size": {"choice": [16, 32, 64]},
        "drop_rate": {"uniform": [0.1, 0.5]},
        "augment_strength": {"uniform": [0.5, 1.5]},
    }
    if pretrained:
        space["transfer"] = {"choice": ["last-2", "last-3", "last-4", "full"]}
    return space


@dataclass(frozen=True, kw_only=True)
class SearchConfig(Config):
    """One hyperparameter search: trials are Ray Train runs of the training job.

    Each field's help below is the one description of that setting: ``jobs/tune.py --help``
    and ``docs/configuration.md`` are generated from it. ASHA stops weak trials at
    ``grace_period`` x ``reduction_factor``^k epochs; ``space`` is checked by :func:`parse_space`.
    """

    # Data and storage
    data: str | None = setting(
        None,
        help="output of jobs/preprocess.py, local or s3:// (the job: default a generated "
        "sample, preprocessed into ./demo)",
    )
    storage: str = setting(
        "runs", help="searches folder, local or s3://; the search is storage/name (the job: ./demo/runs with no data)"
    )
    name: str = setting(
        "tune",
        help="search name: Tune's state, each trial's run in trials/<trial id>, the "
        "leaderboard and best_model/ go under it (the job: default tune-<UTC date-time>)",
    )
    s3_endpoint_url: str | None = setting(
        None, help="S3-compatible endpoint for data and storage", env="AWS_ENDPOINT_URL"
    )

    # What is searched
    models: tuple[str, ...] = setting(
        DEFAULT_MODELS, help="backbones (timm names or presets), comma-separated: each gets num_samples trials"
    )
    num_samples: int = setting(2, help="trials per backbone, each with its own draw from the space")
    pretrained: bool = setting(
        True,
        help="start every backbone from ImageNet weights (--no-pretrained: random init), "
        "checked for every backbone before any trial",
    )
    space: dict[str, Any] = setting(
        default_factory=dict,
        help="overrides of the default search space, a YAML mapping "
        "of training setting -> range (see the space: section)",
    )
    fixed: dict[str, Any] = setting(
        default_factory=dict, help="training settings every trial gets, a YAML mapping (see the fixed: section)"
    )
    seed: int = setting(0, help="the search's draws and every trial's seed")

    # ASHA
    max_epochs: int = setting(8, help="epochs of a trial that ASHA never stops (its LR schedule spans them)")
    grace_period: int = setting(2, help="epochs before ASHA may stop a trial")
    reduction_factor: int = setting(3, help="ASHA keeps 1 in this many at each rung")

    # Resources
    gpus_per_trial: float = setting(
        0.0, help="GPUs of one trial in all; fractions put several trials on one GPU (0: CPU only)"
    )
    cpus_per_trial: float = setting(1.0, help="CPUs of one trial in all (its workers split them)")
    workers_per_trial: int = setting(1, help="DDP workers of one trial (they split its CPUs/GPUs)")
    max_concurrent_trials: int | None = setting(
        None,
        help="trials at once (none: what the cluster's CPUs/GPUs hold); "
        "set it on an autoscaling cluster that has no GPU node yet",
    )
    max_failures: int = setting(
        2, help="times Tune restarts a failed trial (a lost node, a crashed worker) from its last checkpoint"
    )

    ensemble: int = setting(
        0,
        help="also write best_ensemble/: one package averaging the top this-many trials' best "
        "epochs (by validation macro-F1; trust refitted on the ensemble), beside best_model/; 0: "
        "none (docs/scoring.md#ensembles)",
    )

    # Experiment tracking (the search's driver logs every trial; trials themselves log nothing)
    mlflow: MLflowConfig = setting(
        default_factory=MLflowConfig,
        help="MLflow parent run of the search, a child run "
        "per trial, and the best model's registered version (none without a tracking URI)",
    )

    # About a minute on 2 CPUs: two tiny random-init backbones, one trial each, 2 epochs.
    SMOKE: ClassVar[Mapping[str, Any]] = dict(
        models=("resnet10t", "mobilenetv3_small_050"),
        num_samples=1,
        max_epochs=2,
        grace_period=1,
        pretrained=False,
        space={"lr": {"loguniform": [1e-3, 5e-3]}, "batch_size": {"choice": [8, 16]}},
        fixed={
            "eval_batch_size": 64,
            "warmup_epochs": 0.5,
            "early_stop_patience": 0,
            "num_to_keep": 1,
            "label_smoothing": 0.0,
            # The archive-shift augmentations off, as in TrainConfig's smoke preset: the tests read
            # the smoke trials' learning (ASHA must tell a learning trial from one that cannot).
            "augment": {"skull_strip": 0.0, "renormalise": 0.0},
            "backbone_lr_scale": 1.0,
        },
    )

    def __post_init__(self) -> None:
        # Trials run in other processes (other cwd, other nodes): local paths must be absolute.
        for k in ("data", "storage"):
            v = getattr(self, k)
            if v and "://" not in v:
                object.__setattr__(self, k, os.path.abspath(v))
        models = self.models.split(",") if isinstance(self.models, str) else self.models  # "a,b" in a YAML file
        object.__setattr__(self, "models", tuple(m.strip() for m in models if m and m.strip()))
        if not self.models:
            raise ConfigError("models is empty: give at least one backbone, e.g. --models efficientnet_b0,resnet50")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"models lists a backbone twice: {', '.join(self.models)}")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", self.name or ""):
            raise ConfigError(f"search name {self.name!r}: use letters, digits, '.', '_' and '-' (no slashes)")
        for k in ("num_samples", "max_epochs", "grace_period", "workers_per_trial"):
            v = getattr(self, k)
            if int(v) != v or v < 1:
                raise ConfigError(f"{k}={v} must be a whole number >= 1")
        if int(self.ensemble) != self.ensemble or self.ensemble == 1 or self.ensemble < 0:
            raise ConfigError(f"ensemble={self.ensemble}: give 0 (no ensemble) or 2 or more trials to average")
        if self.grace_period > self.max_epochs:
            raise ConfigError(f"grace_period={self.grace_period} is more than max_epochs={self.max_epochs}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor={self.reduction_factor}: ASHA needs 2 or more")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"cpus_per_trial={self.cpus_per_trial} must be > 0")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial={self.gpus_per_trial} must be >= 0")
        if self.gpus_per_trial > 1 and self.gpus_per_trial != self.workers_per_trial * math.floor(
            self.gpus_per_trial / self.workers_per_trial
        ):
            raise ConfigError(
                f"gpus_per_trial={self.gpus_per_trial} with workers_per_trial={self.workers_per_trial}: more than "
                "one GPU per trial must be one whole GPU per worker (set workers_per_trial to the GPU count)"
            )
        if self.gpus_per_trial and self.gpus_per_trial / self.workers_per_trial > 1:
            raise ConfigError("one worker drives one GPU: set workers_per_trial to gpus_per_trial")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError(f"max_concurrent_trials={self.max_concurrent_trials} must be >= 1")
        parse_space(self.space)
        if not isinstance(self.fixed, dict):
            raise ConfigError(f"fixed must be a mapping of training setting -> value, not {type(self.fixed).__name__}")
        bad = sorted(set(self.fixed) & (set(RESERVED) | {k for k, v in self.space.items() if v is not None}))
        if bad:
            raise ConfigError(f"fixed settings {', '.join(bad)} are set by the search itself or searched: remove them")
        train_fields = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(self.fixed) - train_fields)
        if unknown:
            raise ConfigError(f"fixed settings {', '.join(unknown)} are not training settings")
        self.trial_config({k: _example(v) for k, v in self.search_space().items()} | {"model": self.models[0]})

    def search_space(self) -> dict[str, Any]:
        """The space as plain specs: the defaults less what ``fixed`` sets, then the overrides
        (a key set to None drops it)."""
        space = {k: v for k, v in default_space(pretrained=self.pretrained).items() if k not in self.fixed}
        for k, v in self.space.items():
            if v is None:
                space.pop(k, None)
            else:
                space[k] = v
        space.pop("model", None)  # the backbone axis is ``models``
        return space

    def trial_config(self, params: dict[str, Any], *, trial_id: str = "trial") -> TrainConfig:
        """The training settings of one trial (also validates a draw from the space)."""
        per_worker_cpu = self.cpus_per_trial / self.workers_per_trial
        gpu = self.gpus_per_trial > 0
        settings: dict[str, Any] = dict(self.fixed)
        # Every key of the space is a training setting (parse_space checked); Tune's config holds those and the backbone.
        settings.update({k: v for k, v in params.items() if k not in RESERVED})
        settings.update(
            data=self.data,
            storage=_join(self.storage, self.name, "trials"),
            name=trial_id,
            s3_endpoint_url=self.s3_endpoint_url,
            epochs=self.max_epochs,
            num_workers=self.workers_per_trial,
            cpus_per_worker=per_worker_cpu,
            use_gpu=gpu,
            gpus_per_worker=(self.gpus_per_trial / self.workers_per_trial) if gpu else 1.0,
            pretrained=self.pretrained,
            max_failures=self.max_failures,
            seed=self.seed,
        )
        if "batch_size" in settings:
            settings["batch_size"] = int(settings["batch_size"])
        if not self.pretrained:
            settings.pop("transfer", None)
        return TrainConfig(**settings)


def parse_space(space: dict[str, Any]) -> None:
    """Check a space: ``{key: constant | {choice: [..]} | {grid: [..]} | {uniform|loguniform|randint: [lo, hi]}}``."""
    if not isinstance(space, dict):
        raise ConfigError(f"the search space must be a mapping of setting -> range, not {type(space).__name__}")
    train_fields = {f.name for f in fields(TrainConfig)}
    for key, spec in space.items():
        if key in RESERVED:
            raise ConfigError(f"search space key {key!r} is set by the search itself (use the job's options)")
        if key not in train_fields:
            raise ConfigError(
                f"search space key {key!r} is not a training setting; searchable: {', '.join(SEARCHABLE)}"
            )
        if key == "model":
            raise ConfigError("search space key 'model': list backbones with --models (or models: in the YAML)")
        if spec is None or not isinstance(spec, dict):
            continue  # a constant (or None: drop the key from the defaults)
        if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"search space {key}: {spec!r}: use one of {', '.join(SAMPLERS)} with a list")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space {key}.{kind}: give a non-empty list, not {values!r}")
        if kind in ("uniform", "loguniform", "randint"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values) or not values[0] < values[1]:
                raise ConfigError(f"search space {key}.{kind}: give [low, high] with low < high, not {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"search space {key}.loguniform: the low end must be > 0, not {values[0]}")
        if key == "transfer":
            for v in values:
                Transfer.parse(v)


def to_tune_space(space: dict[str, Any]) -> dict[str, Any]:
    """Plain specs -> Ray Tune sampling objects."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            out[key] = spec
            continue
        kind, v = next(iter(spec.items()))
        out[key] = {
            "choice": tune.choice,
            "grid": tune.grid_search,
            "uniform": lambda x: tune.uniform(x[0], x[1]),
            "loguniform": lambda x: tune.loguniform(x[0], x[1]),
            "randint": lambda x: tune.randint(x[0], x[1]),
        }[kind](v)
    return out


def _example(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    kind, v = next(iter(spec.items()))
    return v[0]


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])
