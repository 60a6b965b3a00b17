"""The search's settings and its search space: one self-validating dataclass, a YAML override."""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core import ConfigError
from ..models import Transfer
from ..train import TrainConfig

DEFAULT_MODELS = ("efficientnet_b0", "resnet50", "vgg16", "legacy_xception")

# The default space's keys (``model`` is the backbone axis); any other TrainConfig setting may be searched too.
SEARCHABLE = ("model", "lr", "weight_decay", "batch_size", "transfer", "drop_rate", "augment_strength")
# Set by the search itself, so neither a space nor a fixed setting may override them.
RESERVED = ("data", "storage", "name", "epochs", "num_workers", "cpus_per_worker", "use_gpu", "gpus_per_worker",
            "s3_endpoint_url", "inject_failure", "pretrained", "seed", "max_failures")

SAMPLERS = ("choice", "uniform", "loguniform", "randint", "grid")


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
class SearchConfig:
    """One hyperparameter search: trials are Ray Train runs of the training job.

    Args:
        data: output folder of ``jobs/preprocess.py`` (local or ``s3://``).
        storage, name: the search lives in ``storage/name`` (local or ``s3://``): Tune's state,
            each trial's Ray Train run in ``trials/<trial id>``, the leaderboard, ``best_model/``.
        models: backbones (timm names or presets); every backbone gets ``num_samples`` trials.
        num_samples: trials per backbone, each with its own draw from the space.
        max_epochs: the budget of a trial (its LR schedule spans it); ASHA stops weak trials at
            ``grace_period`` x ``reduction_factor``^k epochs.
        gpus_per_trial, cpus_per_trial: what one trial's workers get in all; fractions of a GPU
            put several small trials on one GPU.
        workers_per_trial: DDP workers of one trial (they split the trial's CPUs/GPUs).
        max_concurrent_trials: None = as many as the cluster's CPUs/GPUs hold at once.
        pretrained: start from ImageNet weights (checked for every backbone before any trial).
        space: overrides of the search space (see ``parse_space``); fixed: TrainConfig settings
            that every trial gets (e.g. ``label_smoothing: 0.1``).
        seed: the search algorithm's draws and every trial's seed.
    """

    data: str | None = None
    storage: str = "runs"
    name: str = "tune"
    s3_endpoint_url: str | None = None
    models: tuple[str, ...] = DEFAULT_MODELS
    num_samples: int = 2
    max_epochs: int = 8
    grace_period: int = 2
    reduction_factor: int = 3
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    workers_per_trial: int = 1
    max_concurrent_trials: int | None = None
    pretrained: bool = True
    space: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    max_failures: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        # Trials run in other processes (other cwd, other nodes): local paths must be absolute.
        for k in ("data", "storage"):
            v = getattr(self, k)
            if v and "://" not in v:
                object.__setattr__(self, k, os.path.abspath(v))
        object.__setattr__(self, "models", tuple(m.strip() for m in self.models if m and m.strip()))
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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown search settings: {', '.join(unknown)}")
        d = dict(d)
        if "models" in d:
            d["models"] = tuple(d["models"])
        return cls(**d)

    @classmethod
    def smoke_test(cls, **changes: Any) -> "SearchConfig":
        """About a minute on 2 CPUs: two tiny random-init backbones, one trial each, 2 epochs."""
        base: dict[str, Any] = dict(
            models=("resnet10t", "mobilenetv3_small_050"),
            num_samples=1,
            max_epochs=2,
            grace_period=1,
            pretrained=False,
            space={"lr": {"loguniform": [1e-3, 5e-3]}, "batch_size": {"choice": [8, 16]}},
            fixed={"eval_batch_size": 64, "warmup_epochs": 0.5, "early_stop_patience": 0, "num_to_keep": 1,
                   "label_smoothing": 0.0, "backbone_lr_scale": 1.0},
        )
        base.update(changes)
        return cls(**base)


def parse_space(space: dict[str, Any]) -> None:
    """Check a space: ``{key: constant | {choice: [..]} | {grid: [..]} | {uniform|loguniform|randint: [lo, hi]}}``."""
    if not isinstance(space, dict):
        raise ConfigError(f"the search space must be a mapping of setting -> range, not {type(space).__name__}")
    train_fields = {f.name for f in fields(TrainConfig)}
    for key, spec in space.items():
        if key in RESERVED:
            raise ConfigError(f"search space key {key!r} is set by the search itself (use the job's options)")
        if key not in train_fields:
            raise ConfigError(f"search space key {key!r} is not a training setting; searchable: {', '.join(SEARCHABLE)}")
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
            "choice": lambda: tune.choice(v),
            "grid": lambda: tune.grid_search(v),
            "uniform": lambda: tune.uniform(v[0], v[1]),
            "loguniform": lambda: tune.loguniform(v[0], v[1]),
            "randint": lambda: tune.randint(v[0], v[1]),
        }[kind]()
    return out


def load_yaml(uri: str, *, s3_endpoint_url: str | None = None) -> dict[str, Any]:
    """A search YAML: search-setting keys (models, num_samples, ...), ``space:`` and ``fixed:``."""
    import yaml

    from ..core import resolve

    loc = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    try:
        d = yaml.safe_load(loc.read_bytes()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{uri} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{uri}: expected a mapping (space:, fixed:, models:, ...), found {type(d).__name__}")
    return d


def _example(spec: Any) -> Any:
    if not isinstance(spec, dict):
        return spec
    kind, v = next(iter(spec.items()))
    return v[0]


def _join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])
