"""Driver side of a training run: data, the TorchTrainer, and the run's outputs.

cfg = TrainConfig(data="s3://bucket/preprocessed", storage="s3://bucket/runs", name="lite0")
summary = run_training(cfg)                       # metrics.json, plots, model/ under storage/name
trainer = build_trainer(cfg)                      # or just the trainer (Ray Tune launches this)
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import torch

from ..core import CLASS_NAMES, CONFIG_FILE, BraintumorError, ConfigError, InputError, Location, check_disjoint, resolve
from ..imaging import MRIPreprocess
from ..tracking import finish_training, start_tracking
from ._config import TrainConfig
from ._data import TrainData, load_train_data, read_report
from ._loop import STATE_FILE, read_checkpoint_state, train_loop_per_worker
from ._outputs import package_metrics, write_plots
from ._report import write_run_report
from ._trust import fit_model_trust, write_reliability

if TYPE_CHECKING:
    from ..models import PackageMeta

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MODEL_DIR = "model"
SCORE = "val_macro_f1"


class TrainingError(BraintumorError):
    """The distributed run failed more often than max_failures allows."""


def run_location(cfg: TrainConfig) -> Location:
    return resolve(cfg.storage, s3_endpoint_url=cfg.s3_endpoint_url).join(cfg.name)


def build_trainer(cfg: TrainConfig, *, data: TrainData | None = None, callbacks: list | None = None):
    """A ``TorchTrainer`` for ``cfg``: DDP over ``cfg.num_workers`` (gloo on CPU, NCCL on GPU).

    ``data`` defaults to :func:`load_train_data` of ``cfg.data`` (Tune passes the data it loaded
    once for all trials). Checkpoints go to ``cfg.storage/cfg.name``, scored by validation
    macro-F1; running the same storage and name again continues from the run's latest checkpoint
    (Ray Train's restore). ``callbacks`` are Ray Train callbacks (Tune's ``TuneReportCallback``).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if data is None:
        data = load_train_data(_data_uri(cfg), s3_endpoint_url=cfg.s3_endpoint_url, seed=cfg.seed)
    if data.counts["train"] < cfg.num_workers:
        raise InputError(f"{data.counts['train']} training images cannot be shared by {cfg.num_workers} workers")
    storage = resolve(cfg.storage, s3_endpoint_url=cfg.s3_endpoint_url)
    run_config = ray.train.RunConfig(
        name=cfg.name,
        storage_path=storage.path,
        storage_filesystem=storage.pyarrow_fs if storage.is_s3 else None,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=cfg.num_to_keep, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        callbacks=list(callbacks or []),
    )
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    loop_config = cfg.to_dict() | {
        "n_train": data.counts["train"],
        "class_counts": data.class_counts,
        "has_test": "test" in data.datasets,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=run_config,
        datasets=data.datasets,
        # Only training is sharded; every worker sees all of val/test and scores its own batches.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def start_run(loc: Location, *, what: str, resume: bool, data: str | None, s3_endpoint_url: str | None) -> None:
    """Checks shared by training and search drivers, then Ray: the run folder is new (or, with
    ``resume``, exists), and ``data`` is an ingest output; errors come before Ray starts."""
    import ray

    if data is not None:  # first: the run's config.yaml would replace the ingest's in the data folder
        check_disjoint(data, loc, input_name="data", output_name=f"{what} folder (--storage/--name)")
    exists = loc.exists() and not loc.is_empty()
    if exists and not resume:
        raise ConfigError(f"{what} {loc.uri} already exists: pass --resume to continue it, or choose another --name")
    if resume and not exists:
        raise ConfigError(f"--resume: there is no {what} at {loc.uri} to continue (check --storage and --name)")
    if data is None:
        raise ConfigError("no data: give --data (the output folder of jobs/preprocess.py)")
    read_report(resolve(data, s3_endpoint_url=s3_endpoint_url))
    if not ray.is_initialized():
        ray.init()


def run_training(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train, then write ``metrics.json``, the plots and ``model/`` under ``storage/name``.

    A run folder that already holds a run is refused unless ``resume``: then training continues
    from its latest checkpoint (epoch, optimizer, schedule, early-stopping state) and a finished
    run is only evaluated and exported again. Returns the metrics written to ``metrics.json``.
    """
    t0 = time.time()
    run = run_location(cfg)
    start_run(run, what="run", resume=resume, data=cfg.data, s3_endpoint_url=cfg.s3_endpoint_url)
    cfg.save_yaml(run.join(CONFIG_FILE))  # the effective settings: `jobs/train.py --config` takes them back
    data = load_train_data(_data_uri(cfg), s3_endpoint_url=cfg.s3_endpoint_url, seed=cfg.seed)
    trainer = build_trainer(cfg, data=data)
    # MLflow (with a tracking URI only): this run's MLflow run, the same one again on --resume.
    tracking = start_tracking(cfg.mlflow, run, stage="train", name=cfg.name, params=cfg.to_dict(), resume=resume)
    out, checkpoint = _fit(trainer, cfg)
    metrics = _run_metrics(cfg, run, data, out, resume=resume)
    model = best_model(cfg, checkpoint)
    trust, metrics["trust"] = fit_model_trust(model, data, cfg.trust, seed=cfg.seed, batch_size=cfg.eval_batch_size)
    preprocess = MRIPreprocess.from_dict(data.report["preprocess"])
    meta = export_package(
        model,
        run.join(MODEL_DIR).uri,
        preprocess=preprocess,
        trust=trust,
        metrics=package_metrics(out, best_epoch=out["best_epoch"]),
        s3_endpoint_url=cfg.s3_endpoint_url,
        onnx=cfg.onnx,
    )
    metrics["model"] = {"uri": run.join(MODEL_DIR).uri, "model_id": meta.model_id}
    metrics["run"]["wall_s"] = round(time.time() - t0, 1)
    write_plots(metrics, run)
    write_reliability(metrics["trust"], run)
    metrics["report"] = write_run_report(metrics, run, model=model, trust=trust, data=data)  # reads the plots
    run.join(METRICS_FILE).write_bytes(json.dumps(metrics, indent=2, allow_nan=False).encode())
    logger.info("wrote %s, plots and %s", run.join(METRICS_FILE).uri, run.join(MODEL_DIR).uri)
    finish_training(tracking, metrics, run)
    return metrics


def _fit(trainer: Any, cfg: TrainConfig) -> tuple[dict[str, Any], Any]:
    """(the workers' result, the checkpoint of the best epoch), or why there is none."""
    import ray.train

    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training failed after {cfg.max_failures} retries: {e}") from e
    if result.error:
        raise TrainingError(f"training failed: {result.error}")
    out = result.return_value
    if not out or result.checkpoint is None:
        raise TrainingError("training finished without a result or checkpoint (see the worker logs above)")
    return out, result.checkpoint


def _run_metrics(cfg: TrainConfig, run: Location, data: Any, out: dict[str, Any], *, resume: bool) -> dict[str, Any]:
    """``metrics.json`` as training leaves it (trust, model and wall time are added after)."""
    import ray

    metrics: dict[str, Any] = {
        "run": {
            "name": cfg.name,
            "uri": run.uri,
            "data": cfg.data,
            "images": data.counts,
            "train_images_per_class": dict(zip(CLASS_NAMES, data.class_counts)),
            "config": cfg.to_dict(),
            "resumed": resume,
            "wall_s": None,
            "ray": ray.__version__,
            "torch": torch.__version__,
        },
        "class_names": list(CLASS_NAMES),
        "epochs": out["history"],
        "best_epoch": out["best_epoch"],
        "restores": out["restores"],
        "stopped_early": out["stopped_early"],
        "val": out["val"],
    }
    for k in ("test", "test_clean"):
        if k in out:
            metrics[k] = out[k]
    return metrics


def export_package(model, uri: str, **kw: Any) -> PackageMeta:
    from ..models import export_model_package

    return export_model_package(model, uri, **kw)


def best_model(cfg: TrainConfig, checkpoint) -> torch.nn.Module:
    """The best epoch's weights (kept in every checkpoint) in a fresh model of the run's architecture."""
    from ..models import create_model

    with checkpoint.as_directory() as d:
        state = read_checkpoint_state(os.path.join(d, STATE_FILE), source=f"{checkpoint.path}/{STATE_FILE}")
    weights = state["best_model"] if state.get("best_model") is not None else state["model"]
    model = create_model(cfg.model, pretrained=False, drop_rate=cfg.drop_rate)
    model.load_state_dict(weights)
    return model.eval()


# --- the console table ----------------------------------------------------------------------


def format_table(metrics: dict[str, Any]) -> str:
    """The final console table: overall and per-class figures for val, test and test_clean."""
    splits = [s for s in ("val", "test", "test_clean") if s in metrics]
    lines = [
        f"run {metrics['run']['uri']}  (best epoch {metrics['best_epoch']} of {len(metrics['epochs'])}"
        + (f", restored from epoch(s) {metrics['restores']}" if metrics["restores"] else "")
        + ")"
    ]
    lines.append(f"  {'split':<11}{'n':>5}{'accuracy':>10}{'macro-F1':>10}{'ROC-AUC':>9}")
    for s in splits:
        m = metrics[s]
        auc = f"{m['roc_auc_ovr']:.3f}" if m["roc_auc_ovr"] is not None else "-"
        lines.append(f"  {s:<11}{m['n']:>5}{m['accuracy']:>10.3f}{m['macro_f1']:>10.3f}{auc:>9}")
    for s in splits[1:] or splits:
        m = metrics[s]
        lines.append(f"  {s}: {'class':<12}{'precision':>10}{'recall':>8}{'F1':>7}{'n':>5}")
        for name, c in m["per_class"].items():
            lines.append(
                f"  {'':<{len(s) + 2}}{name:<12}{c['precision']:>10.3f}{c['recall']:>8.3f}{c['f1']:>7.3f}{c['support']:>5}"
            )
    t = metrics.get("trust")
    if t:
        lines.append(
            f"  calibration: temperature {t['temperature']:.2f}; ECE before -> after: "
            + ", ".join(
                f"{s} {t[s]['ece_before']:.3f} -> {t[s]['ece_after']:.3f}" for s in splits if t.get(s, {}).get("n")
            )
        )
        lines.append(
            f"  review flags ({t['ood_detector']} OOD, confidence < {t['review_threshold']:.2f}): "
            + ", ".join(f"{s} {t[s]['flagged']:.0%}" for s in splits if t.get(s, {}).get("n"))
        )
        if t.get("conformal"):
            lines.append(
                f"  prediction sets (alpha {t['conformal']['alpha']:g}, class-conditional): coverage / mean size "
                + ", ".join(
                    f"{s} {t[s]['conformal']['coverage']:.3f} / {t[s]['conformal']['mean_set_size']:.2f}"
                    for s in splits
                    if (t.get(s, {}).get("conformal") or {}).get("n")
                )
                + " (val: the half that did not calibrate them)"
            )
    lines.append(f"  model: {metrics['model']['uri']} ({metrics['model']['model_id']})")
    if metrics.get("report"):
        lines.append(f"  report: {metrics['report']}")
    return "\n".join(lines)


def _data_uri(cfg: TrainConfig) -> str:
    if cfg.data is None:
        raise ConfigError("no data: give --data (the output folder of jobs/preprocess.py)")
    return cfg.data
