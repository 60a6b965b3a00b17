"""Driver side of a search: Tune runs one Ray Train run per trial, then the leaderboard and the best model.

storage/name/
    search.json            the SearchConfig (``--resume`` reads it back)
    config.yaml            the same settings as YAML, for ``jobs/tune.py --config``
    trials/<trial id>/     each trial's Ray Train run (checkpoints), as in jobs/train.py
    <Tune's own state>     tuner.pkl, experiment_state-*.json, one folder per trial
    leaderboard.csv, leaderboard.md, val_macro_f1.png, best.json
    report.html            the search in one page (leaderboard, curves, the best model's figures)
    best_model/            the best trial's model package
    best_ensemble/         with --ensemble K: the top K trials' models as one package
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from typing import Any

from ..core import CONFIG_FILE, BraintumorError, ConfigError, Location, resolve
from ..report import write_search_report
from ..tracking import finish_search, start_tracking
from ..train import TrainData
from ._config import SEARCHABLE, SearchConfig, to_tune_space

logger = logging.getLogger(__name__)

SCORE = "val_macro_f1"
SEARCH_FILE = "search.json"
BEST_DIR = "best_model"
ENSEMBLE_DIR = "best_ensemble"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback adds


class SearchError(BraintumorError):
    """No trial of the search produced a usable result."""


def search_location(cfg: SearchConfig) -> Location:
    return resolve(cfg.storage, s3_endpoint_url=cfg.s3_endpoint_url).join(cfg.name)


def load_search_config(storage: str, name: str, *, s3_endpoint_url: str | None = None) -> SearchConfig:
    """The settings an earlier search was started with (for ``--resume``)."""
    loc = resolve(storage, s3_endpoint_url=s3_endpoint_url).join(name)
    f = loc.join(SEARCH_FILE)
    if not f.exists():
        raise ConfigError(f"--resume: there is no search at {loc.uri} (no {SEARCH_FILE}); check --storage and --name")
    d = json.loads(f.read_bytes())
    d["s3_endpoint_url"] = s3_endpoint_url
    return SearchConfig.from_dict(d)


def trial_driver(params: dict[str, Any], *, data: TrainData, search: dict[str, Any]) -> None:
    """One trial: a Ray Train run launched from inside the Tune function (Ray's guidance since Train V2).

    Its reports reach Tune (and ASHA) through ``TuneReportCallback``. A trial that Tune restarts
    (a resumed search, a lost node) runs the same storage/name again, so Ray Train continues it
    from its latest checkpoint.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train import build_trainer

    cfg = SearchConfig.from_dict(search)
    trial_id = tune.get_context().get_trial_id()
    tcfg = cfg.trial_config(params, trial_id=trial_id)
    build_trainer(tcfg, data=data, callbacks=[TuneReportCallback()]).fit()


DRIVER_RESOURCE = "trial_driver"  # cluster.yaml gives the on-demand head node this custom resource


def driver_resources() -> dict[str, float]:
    """What one trial function (a Ray Train driver, no training) asks for: no CPU, so a trial's
    CPUs all go to its workers; on a cluster whose safe node offers ``trial_driver``, a sliver of
    that, so the drivers live there and not on spot GPU nodes (Ray's guidance for Train in Tune).
    Tune refuses an empty request, hence the 64 MiB of logical memory otherwise."""
    import ray

    if ray.cluster_resources().get(DRIVER_RESOURCE):
        return {"CPU": 0, DRIVER_RESOURCE: 0.01}
    return {"CPU": 0, "memory": 64 * 1024**2}


def max_concurrent(cfg: SearchConfig) -> int:
    """As many trials as the cluster's CPUs and GPUs hold at once (at least one; an autoscaling
    cluster that has no GPU node yet gets one trial until ``max_concurrent_trials`` says more)."""
    import ray

    total = len(cfg.models) * cfg.num_samples
    if cfg.max_concurrent_trials:
        return min(cfg.max_concurrent_trials, total)
    res = ray.cluster_resources()
    n = math.floor(res.get("CPU", 0) / cfg.cpus_per_trial + 1e-9)
    if cfg.gpus_per_trial:
        n = min(n, math.floor(res.get("GPU", 0) / cfg.gpus_per_trial + 1e-9))
    if n < 1:
        logger.warning(
            "the cluster has %s CPUs and %s GPUs now, less than one trial's %s CPUs / %s GPUs: running one trial "
            "at a time (an autoscaler may add nodes; set --max-concurrent-trials for more)",
            res.get("CPU", 0),
            res.get("GPU", 0),
            cfg.cpus_per_trial,
            cfg.gpus_per_trial,
        )
    return max(1, min(n, total))


def check_backbones(cfg: SearchConfig) -> None:
    """Build every backbone once in the driver: a wrong name or missing weights fail before any trial."""
    from ..models import create_model

    for name in cfg.models:
        create_model(
            name,
            pretrained=cfg.pretrained,
            weights=cfg.fixed.get("weights"),
            weights_sha256=cfg.fixed.get("weights_sha256"),
            s3_endpoint_url=cfg.s3_endpoint_url,
        )


def run_search(cfg: SearchConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or with ``resume`` continue) the search; write the leaderboard, plot and best model.

    Returns the summary written to ``best.json`` plus the leaderboard rows.
    """
    from ray import tune

    from ..train import load_train_data, start_run

    t0 = time.time()
    root = search_location(cfg)
    start_run(root, what="search", resume=resume, data=cfg.data, s3_endpoint_url=cfg.s3_endpoint_url)
    check_backbones(cfg)
    if not resume:
        root.join(SEARCH_FILE).write_bytes(json.dumps(cfg.to_dict() | {"s3_endpoint_url": None}, indent=2).encode())
        cfg.save_yaml(root.join(CONFIG_FILE))  # the effective settings: `jobs/tune.py --config` takes them back

    # Loaded once: every trial's Ray Train run reads the same materialised blocks.
    timing = {"prepare_s": time.time() - t0}
    if cfg.data is None:
        raise ConfigError("no data: give --data (the output folder of jobs/preprocess.py)")
    data = load_train_data(cfg.data, s3_endpoint_url=cfg.s3_endpoint_url, seed=cfg.seed)
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, data=data, search=cfg.to_dict()), driver_resources()
    )
    tuner = _tuner(cfg, trainable, root, resume=resume)
    tracking = start_tracking(cfg.mlflow, root, stage="search", name=cfg.name, params=cfg.to_dict(), resume=resume)
    t_fit = time.time()
    timing["load_data_s"] = t_fit - t0 - timing["prepare_s"]
    results = tuner.fit()
    timing["trials_s"] = time.time() - t_fit

    rows = leaderboard_rows(results, cfg)
    if not any(r["best_val_macro_f1"] is not None for r in rows):
        errors = [f"{r['trial']}: {r['error']}" for r in rows if r["error"]]
        raise SearchError("no trial reported a validation score. " + "; ".join(errors[:3]))
    write_leaderboard(rows, root)
    plot_trials(results, root, cfg)
    summary = export_best(rows, results, cfg, data, root)
    if cfg.ensemble:
        summary["ensemble"] = export_top_ensemble(rows, results, cfg, data, root)
    budget = len(rows) * cfg.max_epochs
    run_epochs = sum(r["epochs_run"] for r in rows)
    summary.update(
        search=root.uri,
        trials=len(rows),
        trial_epochs_run=run_epochs,
        trial_epochs_budget=budget,
        asha_saved_fraction=round(1 - run_epochs / budget, 4) if budget else 0.0,
        wall_s=round(time.time() - t0, 1),
        timing={k: round(v, 1) for k, v in timing.items()}
        | {"results_s": round(time.time() - t_fit - timing["trials_s"], 1)},
        resumed=resume,
    )
    summary["report"] = write_report(summary, rows, results, data, root, cfg)
    root.join("best.json").write_bytes(json.dumps(summary, indent=2, allow_nan=False).encode())
    summary["leaderboard"] = rows
    finish_search(tracking, summary, {_trial_id(r): r for r in results}, root, s3_endpoint_url=cfg.s3_endpoint_url)
    return summary


def _tuner(cfg: SearchConfig, trainable: Any, root: Location, *, resume: bool) -> Any:
    """A new search's Tuner (the grid of backbones x samples, ASHA, concurrency cap), or the
    saved one of ``root`` to continue."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    storage = resolve(cfg.storage, s3_endpoint_url=cfg.s3_endpoint_url)
    fs = storage.pyarrow_fs if storage.is_s3 else None
    concurrency = max_concurrent(cfg)
    if resume:
        path = root.path
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise ConfigError(f"--resume: {root.uri} holds no Tune state to restore (was it started by jobs/tune.py?)")
        logger.info("resuming search %s: finished trials are kept, unfinished ones continue", root.uri)
        return tune.Tuner.restore(
            path, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        param_space = to_tune_space(cfg.search_space()) | {"model": tune.grid_search(list(cfg.models))}
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                num_samples=cfg.num_samples,
                scheduler=ASHAScheduler(
                    time_attr="epoch",
                    metric=SCORE,
                    mode="max",
                    max_t=cfg.max_epochs,
                    grace_period=cfg.grace_period,
                    reduction_factor=cfg.reduction_factor,
                    # A trial at its last epoch ends by itself: stopping it there would kill its Ray
                    # Train run before the run shuts down its workers (left to Train's cleaner).
                    stop_last_trials=False,
                ),
                # The generator itself caps the trials in flight (Tune ignores max_concurrent_trials with it).
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency),
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=storage.path,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                verbose=1,
            ),
        )
        logger.info(
            "search %s: %d backbone(s) x %d sample(s), up to %d epochs, %d trial(s) at a time",
            root.uri,
            len(cfg.models),
            cfg.num_samples,
            cfg.max_epochs,
            concurrency,
        )
    return tuner


def _trial_dirname(trial) -> str:
    # Tune's default name lists every hyperparameter (and is cut at 128 characters).
    return f"trial_{trial.trial_id}"


# --- results -------------------------------------------------------------------------------------


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    return str(result.path).rstrip("/").rsplit("/", 1)[-1]


def leaderboard_rows(results, cfg: SearchConfig) -> list[dict[str, Any]]:
    """One row per trial, best validation macro-F1 first."""
    rows = []
    for r in results:
        df = r.metrics_dataframe
        has = df is not None and len(df) and SCORE in df
        params = {k: r.config.get(k) for k in SEARCHABLE if k in r.config}
        epochs_run = int(df["epoch"].max()) if has else 0
        if r.error:
            status = "error"
        elif not has:
            status = "no result"
        elif epochs_run >= cfg.max_epochs:
            status = "completed"
        elif int(df["stopped_early"].iloc[-1]):
            status = "early-stopped"
        else:
            status = "stopped by ASHA"
        best = df.loc[df[SCORE].idxmax()] if has else None
        rows.append(
            {
                "trial": _trial_id(r),
                "backbone": params.pop("model", None),
                **{k: _round(v) for k, v in params.items()},
                "best_val_macro_f1": round(float(best[SCORE]), 4) if best is not None else None,
                "best_epoch": int(best["epoch"]) if best is not None else None,
                "epochs_run": epochs_run,
                "status": status,
                "time_s": round(float(df["time_total_s"].max()), 1) if has else None,
                "error": (str(r.error).splitlines() or [""])[0][:300] if r.error else None,
            }
        )
    rows.sort(key=lambda x: (x["best_val_macro_f1"] is None, -(x["best_val_macro_f1"] or 0)))
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows


def _round(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float) else v


COLUMNS = (
    "rank",
    "trial",
    "backbone",
    "lr",
    "weight_decay",
    "batch_size",
    "transfer",
    "drop_rate",
    "augment_strength",
    "best_val_macro_f1",
    "best_epoch",
    "epochs_run",
    "status",
    "time_s",
)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    return [c for c in COLUMNS if any(c in r for r in rows)]


def format_leaderboard(rows: list[dict[str, Any]]) -> str:
    """The leaderboard as a Markdown table."""
    cols = _columns(rows)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        out.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |")
    return "\n".join(out)


def write_leaderboard(rows: list[dict[str, Any]], root: Location) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows) + ["error"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    root.join("leaderboard.csv").write_bytes(buf.getvalue().encode())
    root.join("leaderboard.md").write_bytes((format_leaderboard(rows) + "\n").encode())


def plot_trials(results, root: Location, cfg: SearchConfig) -> str:
    """Validation macro-F1 over each trial's time, one line per trial (``val_macro_f1.png``)."""
    from ..train import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(8, 4.5))
    for r in results:
        df = r.metrics_dataframe
        if df is None or not len(df) or SCORE not in df:
            continue
        ax.plot(df["time_total_s"], df[SCORE], "-o", ms=3, label=f"{_trial_id(r)} {r.config.get('model')}")
    ax.set_xlabel("trial time (s)")
    ax.set_ylabel("validation macro-F1")
    ax.set_title(f"search {cfg.name}: {len(results)} trials (ASHA)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, root.join("val_macro_f1.png"))


def write_report(
    summary: dict[str, Any], rows: list[dict[str, Any]], results, data: TrainData, root: Location, cfg: SearchConfig
) -> str:
    """``report.html``: the leaderboard, each trial's curves per epoch, the best model's figures
    and validation examples with their heat maps (from the exported package, as scoring sees it)."""
    from ..models import load_model_package
    from ..train import validation_examples

    histories = {}
    for r in results:
        df = r.metrics_dataframe
        if df is not None and len(df) and "epoch" in df:
            keep = [c for c in ("epoch", SCORE, "val_loss", "train_loss") if c in df]
            histories[f"{_trial_id(r)} {r.config.get('model')}"] = df[keep].sort_values("epoch").to_dict("records")
    pkg = load_model_package(summary["model"]["uri"], s3_endpoint_url=cfg.s3_endpoint_url)
    examples = validation_examples(pkg.model, data.datasets["val"], trust=pkg.trust, class_names=pkg.class_names)
    return write_search_report(
        summary, root, leaderboard=rows, columns=_columns(rows), histories=histories, examples=examples
    )


def export_best(
    rows: list[dict[str, Any]], results, cfg: SearchConfig, data: TrainData, root: Location
) -> dict[str, Any]:
    """The best trial's best epoch, evaluated on val/test here and exported to ``best_model/``."""
    from ..imaging import MRIPreprocess
    from ..train import (
        best_model,
        export_package,
        fit_model_trust,
        output_metrics,
        package_metrics,
        split_outputs,
        write_reliability,
    )

    best_row = rows[0]
    result = next(r for r in results if _trial_id(r) == best_row["trial"])
    tcfg = cfg.trial_config(dict(result.config), trial_id=best_row["trial"])
    checkpoint = _best_checkpoint(result, cfg)
    model = best_model(tcfg, checkpoint)
    # Every split through the model once: the metrics and the trust fit share the outputs.
    outs = split_outputs(model, data, batch_size=tcfg.eval_batch_size)
    metrics = output_metrics(outs)
    trust, trust_report = fit_model_trust(
        model, data, tcfg.trust, seed=tcfg.seed, batch_size=tcfg.eval_batch_size, outputs=outs
    )
    write_reliability(trust_report, root)
    uri = root.join(BEST_DIR).uri
    meta = export_package(
        model,
        uri,
        preprocess=MRIPreprocess.from_dict(data.report["preprocess"]),
        trust=trust,
        metrics=package_metrics(metrics, trial=best_row["trial"], best_epoch=best_row["best_epoch"]),
        s3_endpoint_url=cfg.s3_endpoint_url,
        onnx=tcfg.onnx,
    )
    logger.info(
        "best trial %s (%s): val macro-F1 %.3f; model %s",
        best_row["trial"],
        best_row["backbone"],
        best_row["best_val_macro_f1"],
        uri,
    )
    return {
        "best_trial": {k: v for k, v in best_row.items() if k != "error"},
        "config": tcfg.to_dict(),
        "model": {"uri": uri, "model_id": meta.model_id},
        "class_names": metrics["val"]["class_names"],
        **metrics,
        "trust": trust_report,
    }


def export_top_ensemble(
    rows: list[dict[str, Any]], results, cfg: SearchConfig, data: TrainData, root: Location
) -> dict[str, Any] | None:
    """The top ``cfg.ensemble`` trials' best epochs (leaderboard order: validation macro-F1) as one
    package in ``best_ensemble/``, through the builder ``jobs/ensemble.py`` uses (trust refitted
    on the ensemble's outputs); None, with a warning, when fewer than 2 trials reported a score."""
    from ..core import CLASS_NAMES
    from ..imaging import MRIPreprocess
    from ..models import data_config
    from ..train import Member, best_model, export_ensemble

    top = [r for r in rows if r["best_val_macro_f1"] is not None][: cfg.ensemble]
    if len(top) < 2:
        logger.warning(
            "--ensemble %d: only %d trial(s) reported a validation score, so no %s/ was written",
            cfg.ensemble,
            len(top),
            ENSEMBLE_DIR,
        )
        return None
    if len(top) < cfg.ensemble:
        logger.warning(
            "--ensemble %d: only %d trials reported a validation score: the ensemble has %d members",
            cfg.ensemble,
            len(top),
            len(top),
        )
    preprocess = MRIPreprocess.from_dict(data.report["preprocess"]).to_dict()
    members, tcfgs = [], []
    for row in top:
        result = next(r for r in results if _trial_id(r) == row["trial"])
        tcfg = cfg.trial_config(dict(result.config), trial_id=row["trial"])
        model = best_model(tcfg, _best_checkpoint(result, cfg))
        meta = {
            "class_names": list(CLASS_NAMES),
            "preprocess": preprocess,
            "data_config": dict(data_config(model)),
            "model_id": None,
        }
        members.append(Member(name=f"{root.uri}/trials/{row['trial']}", model=model, meta=meta))
        tcfgs.append(tcfg)
    first = tcfgs[0]
    out = export_ensemble(
        members,
        data,
        root.join(ENSEMBLE_DIR).uri,
        trust=first.trust,
        seed=first.seed,
        batch_size=first.eval_batch_size,
        s3_endpoint_url=cfg.s3_endpoint_url,
        onnx=first.onnx,
        extra_metrics={"trials": [r["trial"] for r in top]},
    )
    return out | {"trials": [r["trial"] for r in top]}


def _best_checkpoint(result, cfg: SearchConfig):
    """The trial's checkpoint of its best reported epoch that still exists (each holds the best
    weights so far, so any later one would do as well)."""
    import ray.train

    storage = resolve(cfg.storage, s3_endpoint_url=cfg.s3_endpoint_url)
    fs = storage.pyarrow_fs
    df = result.metrics_dataframe
    if CHECKPOINT_PATH_KEY in df:
        df = df[df[CHECKPOINT_PATH_KEY].notna()].sort_values([SCORE, "epoch"], ascending=[False, False])
        for path in df[CHECKPOINT_PATH_KEY]:
            info = fs.get_file_info(str(path))
            if info.type.name == "Directory":
                return ray.train.Checkpoint(str(path), filesystem=fs)
    raise SearchError(f"trial {_trial_id(result)} has no checkpoint left in {cfg.storage}: cannot export its model")
