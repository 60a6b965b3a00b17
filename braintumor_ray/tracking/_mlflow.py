"""MLflow runs for training, search and scoring, logged by the driver (never a Ray worker).

Nothing here imports mlflow until a stage has a tracking URI: without one every function returns
at once and MLflow sees nothing. The run id of a training run or search is kept in its folder
(``mlflow_run_id``), so ``--resume`` continues the same MLflow run instead of opening another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..core import ConfigError, Location, resolve
from ._config import MLflowConfig

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
MODELS_SCHEME = "models:/"
MODEL_ARTIFACT = "model"
# Tune's bookkeeping columns: not metrics of a trial.
_TUNE_COLUMNS = {
    "epoch",
    "timestamp",
    "training_iteration",
    "pid",
    "time_this_iter_s",
    "time_since_restore",
    "iterations_since_restore",
    "done",
    "checkpoint_dir_name",
    "trial_id",
    "date",
    "hostname",
    "node_ip",
}


# MLflow's HTTP client retries a refused connection 7 times with a backoff factor of 2: minutes
# per call, then a traceback, after the rows were committed. The jobs' calls ask for 1 retry
# (0.04 s to give up on a refused connection, against 7 s at 3 retries, measured), then try the
# whole logging once more at the end of the job, RETRY_WAIT_S later; what still fails is a
# warning. Settings the user gave are kept.
_QUICK_HTTP = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
RETRY_WAIT_S = 10.0


@contextlib.contextmanager
def _quick_http() -> Iterator[None]:
    added = {k: v for k, v in _QUICK_HTTP.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _tolerant(what: str, fn: Callable[[], Any], *, retry: bool = True) -> tuple[Any, str | None]:
    """``fn()``, or, when it raises, once more ``RETRY_WAIT_S`` later (``retry``); then a warning
    and ``(None, reason)``: tracking is never what fails a job whose work is committed."""
    reason = None
    for attempt in range(2 if retry else 1):
        if attempt:
            time.sleep(RETRY_WAIT_S)
        try:
            with _quick_http():
                return fn(), None
        except Exception as e:  # the server down, a proxy's error page, a refused write: all the same here
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    logger.warning(
        "MLflow: %s was not logged (%s); the job's own outputs are complete. Log it again once the "
        "tracking server is up (rerun, or --resume a training run)",
        what,
        reason,
    )
    return None, reason


@dataclass
class PendingTracking:
    """A training run or search whose MLflow run could not be opened when it started (the
    server was down): opened at the end instead, when its results are logged (once: a retry
    of the logging reuses the run the first attempt opened)."""

    settings: MLflowConfig
    folder: Location
    stage: str
    name: str
    params: Mapping[str, Any]
    resume: bool
    reason: str
    opened: Tracking | None = None


@dataclass
class Tracking:
    """An open MLflow run: the client, its run id and the settings it was opened with."""

    client: Any
    run_id: str
    experiment_id: str
    settings: MLflowConfig


def _client(mc: MLflowConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mc.tracking_uri, registry_uri=mc.tracking_uri)


def _experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def _connect(mc: MLflowConfig) -> tuple[Any, str]:
    """A client of ``mc``'s server and the id of its experiment (created, or restored, as needed)."""
    client = _client(mc)
    return client, _experiment_id(client, mc.experiment)


def _new_run(client, experiment_id: str, mc: MLflowConfig, *, name: str, tags: Mapping[str, str]) -> Tracking:
    """A run created in the experiment (a child run: ``mlflow.parentRunId`` among ``tags``)."""
    run = client.create_run(experiment_id, run_name=name, tags=dict(tags))
    return Tracking(client, run.info.run_id, experiment_id, mc)


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings as one level of ``outer<sep>inner`` keys (lists kept as values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + sep, sep))
        else:
            out[key] = v
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and math.isfinite(float(v)):
        return float(v)
    try:  # numpy scalars
        import numpy as np

        if isinstance(v, np.generic) and np.isfinite(v):
            return float(v)
    except ImportError:  # pragma: no cover
        pass
    return None


def scalar_metrics(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers among the (nested) values of ``d``, as ``prefix + a_b_c`` metric names."""
    return {k: n for k, v in flatten(d, prefix, "_").items() if (n := _number(v)) is not None}


def _param_text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        v = ",".join(map(str, v))
    elif isinstance(v, Mapping):
        v = json.dumps(v, sort_keys=True, default=str)
    return str(v)[:6000]


def _log_params(t: Tracking, params: Mapping[str, Any]) -> None:
    """Parameters not logged yet (MLflow refuses to change a logged value; a resumed run keeps its own)."""
    from mlflow.entities import Param

    have = t.client.get_run(t.run_id).data.params
    new = [Param(k, _param_text(v)) for k, v in flatten(params).items() if k not in have]
    changed = [k for k, v in flatten(params).items() if k in have and have[k] != _param_text(v)]
    if changed:
        logger.warning("MLflow run %s keeps its first values of %s", t.run_id, ", ".join(changed))
    for i in range(0, len(new), 100):
        t.client.log_batch(t.run_id, params=new[i : i + 100])


def _log_metrics(client, run_id: str, rows: Iterable[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, int(step)) for k, v, step in rows]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


def _log_history(client, run_id: str, history: Iterable[Mapping[str, Any]]) -> None:
    """Per-epoch metrics (step = epoch), skipping the epochs this run already has (a resume)."""
    rows = [h for h in history if _number(h.get("epoch")) is not None]
    if not rows:
        return
    key = next((k for k in rows[0] if k != "epoch" and _number(rows[0][k]) is not None), None)
    done = {m.step for m in client.get_metric_history(run_id, key)} if key else set()
    _log_metrics(
        client,
        run_id,
        [
            (k, n, int(h["epoch"]))
            for h in rows
            if int(h["epoch"]) not in done
            for k, v in h.items()
            if k not in _TUNE_COLUMNS and (n := _number(v)) is not None
        ],
    )


def _local_dir(loc: Location, tmp: str) -> str:
    """A local folder with ``loc``'s files: the folder itself on disk, else a copy under ``tmp``."""
    if not loc.is_s3:
        return loc.path
    dst = os.path.join(tmp, posixpath.basename(loc.path.rstrip("/")))
    for p in loc.files():
        rel = posixpath.relpath(p, loc.path)
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        with open(os.path.join(dst, rel), "wb") as f:
            f.write(loc.fs.cat_file(p))
    return dst


def _log_files(t: Tracking, folder: Location, names: Iterable[str], patterns: Iterable[str] = ()) -> None:
    """Files directly in ``folder`` (by name, and those matching ``patterns``) as run artifacts."""
    found = list(names)
    for pat in patterns:
        found += [posixpath.basename(p) for p in folder.fs.glob(posixpath.join(folder.path, pat))]
    with tempfile.TemporaryDirectory() as tmp:
        for name in dict.fromkeys(found):
            f = folder.join(name)
            if not f.exists():
                continue
            local = f.path if not f.is_s3 else os.path.join(tmp, name)
            if f.is_s3:
                with open(local, "wb") as out:
                    out.write(f.read_bytes())
            t.client.log_artifact(t.run_id, local)


def _register(t: Tracking, package: Location, model_id: str, tags: Mapping[str, str]) -> str:
    """Log the package folder as the run's ``model`` artifacts and add it to the registered model as a
    new version tagged with its ``model_id`` (the version this run already registered for it, on a resume)."""
    from mlflow.exceptions import MlflowException

    name = t.settings.registered_model
    client = t.client
    try:
        client.create_registered_model(name, description="Brain-MRI tumour classifiers (braintumor-ray model packages)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    for mv in client.search_model_versions(f"name='{name}' and run_id='{t.run_id}'"):
        if mv.tags.get("model_id") == model_id:
            return str(mv.version)
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifacts(t.run_id, _local_dir(package, tmp), MODEL_ARTIFACT)
    source = f"{client.get_run(t.run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    mv = client.create_model_version(
        name, source, run_id=t.run_id, tags={"model_id": model_id, "package_uri": package.uri, **tags}
    )
    client.set_tag(t.run_id, "registered_model", f"{MODELS_SCHEME}{name}/{mv.version}")
    logger.info("MLflow: registered %s as %s%s/%s", package.uri, MODELS_SCHEME, name, mv.version)
    return str(mv.version)


# --- training and search ------------------------------------------------------------------------


def start_tracking(
    mc: MLflowConfig, folder: Location, *, stage: str, name: str, params: Mapping[str, Any], resume: bool
) -> Tracking | PendingTracking | None:
    """Open the MLflow run of a training run or search (None without a tracking URI). With ``resume``
    the run whose id ``folder/mlflow_run_id`` holds is continued; otherwise a new one is created and
    its id written there. A server that cannot be reached is a warning: the run is opened at the
    end (:class:`PendingTracking`), when the results are logged."""
    if not mc.enabled:
        return None
    t, reason = _tolerant(
        f"the start of the {stage} run",
        lambda: _start(mc, folder, stage=stage, name=name, params=params, resume=resume),
        retry=False,
    )
    if t is None:
        return PendingTracking(mc, folder, stage, name, dict(params), resume, reason or "")
    return t


def _open(t: Tracking | PendingTracking) -> Tracking:
    if isinstance(t, PendingTracking):
        if t.opened is None:
            t.opened = _start(t.settings, t.folder, stage=t.stage, name=t.name, params=t.params, resume=t.resume)
        return t.opened
    return t


def _start(
    mc: MLflowConfig, folder: Location, *, stage: str, name: str, params: Mapping[str, Any], resume: bool
) -> Tracking:
    from mlflow.exceptions import MlflowException

    client, exp = _connect(mc)
    marker = folder.join(RUN_ID_FILE)
    run_id = None
    if resume and marker.exists():
        run_id = marker.read_bytes().decode().strip()
        try:
            run = client.get_run(run_id)
            resumes = int(run.data.tags.get("resumes", "0")) + 1
            client.update_run(run_id, status="RUNNING")
            client.set_tag(run_id, "resumes", str(resumes))
            logger.info("MLflow: continuing run %s (resume %d)", run_id, resumes)
        except MlflowException as e:
            logger.warning("MLflow run %s of %s is gone (%s): starting a new one", run_id, folder.uri, e)
            run_id = None
    if run_id is None:
        t = _new_run(client, exp, mc, name=name, tags={"stage": stage, "folder": folder.uri})
        marker.write_bytes(t.run_id.encode())
        logger.info("MLflow: run %s in experiment %s at %s", t.run_id, mc.experiment, mc.tracking_uri)
    else:
        t = Tracking(client, run_id, exp, mc)
    _log_params(t, params)
    return t


def finish_training(t: Tracking | PendingTracking | None, metrics: Mapping[str, Any], run: Location) -> str | None:
    """Per-epoch and final metrics (val/test/test_clean, calibration and review flags), the plots,
    ``metrics.json`` and ``config.yaml``, and the model package registered; the run ends FINISHED.
    Never raises: a failure is retried once, then a warning; returns its reason (None: logged)."""
    if t is None:
        return None
    return _tolerant("the training run", lambda: _finish_training(_open(t), metrics, run))[1]


def _finish_training(t: Tracking, metrics: Mapping[str, Any], run: Location) -> None:
    c = t.client
    _log_history(c, t.run_id, metrics.get("epochs") or [])
    final = _model_metrics(metrics)
    final |= scalar_metrics({k: metrics.get(k) for k in ("best_epoch", "stopped_early")})
    final["restores"] = float(len(metrics.get("restores") or []))
    if (metrics.get("run") or {}).get("wall_s") is not None:
        final["wall_s"] = float(metrics["run"]["wall_s"])
    _log_metrics(c, t.run_id, [(k, v, 0) for k, v in final.items()])
    _log_files(t, run, ["metrics.json", "config.yaml"], ["*.png", "*.html"])
    _register_and_finish(
        t,
        metrics.get("model") or {},
        {"stage": "train", "run": run.uri},
        s3_endpoint_url=(metrics.get("run") or {}).get("config", {}).get("s3_endpoint_url"),
    )


def _model_metrics(d: Mapping[str, Any]) -> dict[str, float]:
    """A run's final figures of its model, per split (``final_val_accuracy``) and of its trust fit."""
    final: dict[str, float] = {}
    for split in ("val", "test", "test_clean"):
        if isinstance(d.get(split), Mapping):
            final |= scalar_metrics({k: v for k, v in d[split].items() if k != "confusion_matrix"}, f"final_{split}_")
    if isinstance(d.get("trust"), Mapping):
        final |= scalar_metrics(d["trust"], "trust_")
    return final


def _register_and_finish(
    t: Tracking, model: Mapping[str, Any], tags: Mapping[str, str], *, s3_endpoint_url: str | None
) -> None:
    """The run's model package (``model``: its ``uri`` and ``model_id``, if one was written)
    registered as a version, then the run ended FINISHED."""
    if model.get("model_id"):
        t.client.set_tag(t.run_id, "model_id", model["model_id"])
        _register(t, resolve(model["uri"], s3_endpoint_url=s3_endpoint_url), model["model_id"], tags)
    t.client.set_terminated(t.run_id, "FINISHED")


def finish_search(
    t: Tracking | PendingTracking | None,
    summary: Mapping[str, Any],
    results: Mapping[str, Any],
    root: Location,
    *,
    s3_endpoint_url: str | None = None,
) -> str | None:
    """A child run per trial (its sampled parameters, metrics per epoch, status, ASHA stop), then on
    the parent the best trial's final metrics, the leaderboard and plots, and the best model registered.
    ``results``: trial id -> Tune ``Result``. Children already logged (a resume) are reused. Never
    raises (as :func:`finish_training`)."""
    if t is None:
        return None
    return _tolerant(
        "the search", lambda: _finish_search(_open(t), summary, results, root, s3_endpoint_url=s3_endpoint_url)
    )[1]


def _finish_search(
    t: Tracking,
    summary: Mapping[str, Any],
    results: Mapping[str, Any],
    root: Location,
    *,
    s3_endpoint_url: str | None = None,
) -> None:
    c = t.client
    for row in summary.get("leaderboard") or []:
        _log_trial(t, row, results.get(str(row["trial"])))
    _log_metrics(c, t.run_id, [(k, v, 0) for k, v in _search_final_metrics(summary).items()])
    best = summary.get("best_trial") or {}
    if best.get("trial"):
        c.set_tag(t.run_id, "best_trial", str(best["trial"]))
    _log_files(t, root, ["leaderboard.csv", "leaderboard.md", "best.json", "search.json", "config.yaml"], ["*.png"])
    _register_and_finish(
        t,
        summary.get("model") or {},
        {"stage": "search", "search": root.uri, "trial": str(best.get("trial", ""))},
        s3_endpoint_url=s3_endpoint_url,
    )


def _log_trial(t: Tracking, row: Mapping[str, Any], result: Any) -> None:
    """One trial's child run of the search's run (the one already logged, on a resume): its
    sampled parameters, metrics per epoch, status and ASHA stop. ``result``: its Tune ``Result``."""
    c = t.client
    tid = str(row["trial"])
    found = c.search_runs(
        [t.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{t.run_id}' and tags.trial_id = '{tid}'"
    )
    if found:
        ct = Tracking(c, found[0].info.run_id, t.experiment_id, t.settings)
    else:
        tags = {"mlflow.parentRunId": t.run_id, "trial_id": tid, "stage": "trial"}
        ct = _new_run(c, t.experiment_id, t.settings, name=tid, tags=tags)
    child = ct.run_id
    config = dict(getattr(result, "config", None) or {})
    _log_params(
        ct,
        {k: v for k, v in config.items() if not isinstance(v, Mapping)}
        or {
            k: v
            for k, v in row.items()
            if k not in ("rank", "status", "error", "epochs_run", "best_epoch", "best_val_macro_f1", "time_s", "trial")
        },
    )
    df = getattr(result, "metrics_dataframe", None)
    if df is not None and len(df) and "epoch" in df:
        _log_history(c, child, df.drop_duplicates("epoch", keep="last").to_dict("records"))
    for k in ("status", "error"):
        if row.get(k):
            c.set_tag(child, k, str(row[k])[:5000])
    c.set_tag(child, "asha_stopped", str(row.get("status") == "stopped by ASHA").lower())
    figures = {k: row.get(k) for k in ("rank", "best_val_macro_f1", "best_epoch", "epochs_run", "time_s")}
    _log_metrics(c, child, [(k, v, 0) for k, v in scalar_metrics(figures).items()])
    c.set_terminated(child, "FAILED" if row.get("status") == "error" else "FINISHED")


def _search_final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The search run's own metrics: the best model's final figures per split, its trust, the
    search's counts and time."""
    counts = ("trials", "trial_epochs_run", "trial_epochs_budget", "asha_saved_fraction", "wall_s")
    return _model_metrics(summary) | scalar_metrics({k: summary.get(k) for k in counts})


# --- scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    """A version of a registered model as the registry describes it."""

    uri: str  # as given: models:/NAME/VERSION or models:/NAME@ALIAS
    name: str
    version: str
    source: str  # where the registry says the package's files are (a folder, s3://, mlflow-artifacts:/)
    model_id: str  # the model_id it is tagged with


def find_registered_version(uri: str, mc: MLflowConfig) -> RegisteredVersion:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` looked up in the registry at
    ``mc.tracking_uri``; a ConfigError for an unknown one or one without a ``model_id`` tag.
    Fetching its files is the models package's (:func:`braintumor_ray.models.resolve_registered_model`)."""
    if not mc.enabled:
        raise ConfigError(
            f"--model {uri} is a registered model: give --mlflow-tracking-uri (or MLFLOW_TRACKING_URI) of its registry"
        )
    from mlflow.exceptions import MlflowException

    spec = uri[len(MODELS_SCHEME) :]
    client = _client(mc)
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = spec.partition("/")
            if not name or not version.isdigit():
                raise ConfigError(f"--model {uri}: use models:/NAME/VERSION or models:/NAME@ALIAS")
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ConfigError(f"--model {uri}: {e.message}") from e
    tagged = mv.tags.get("model_id")
    if not tagged:
        raise ConfigError(
            f"{uri} has no model_id tag: register packages with jobs/train.py or jobs/tune.py, "
            "or tag the version with its model.json's model_id"
        )
    return RegisteredVersion(uri=uri, name=name, version=str(mv.version), source=mv.source, model_id=tagged)


def log_scoring(config: Any, summary: dict[str, Any], registered: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One MLflow run for a scoring job: counts, timings, the model_id and where it came from. Returns
    ``summary`` (with ``mlflow_run_id`` added when logged, ``mlflow_error`` when it could not be,
    after one retry: never an exception, the rows are committed by then)."""
    mc: MLflowConfig = config.mlflow
    if not mc.enabled:
        return summary
    run_id, reason = _tolerant("the scoring run", lambda: _log_scoring(config, summary, registered))
    return summary | ({"mlflow_run_id": run_id} if run_id else {"mlflow_error": reason})


def _log_scoring(config: Any, summary: dict[str, Any], registered: Mapping[str, str] | None) -> str:
    mc: MLflowConfig = config.mlflow
    client, exp = _connect(mc)
    tags = {
        "stage": "score",
        "model_id": str(summary.get("model_id")),
        "input": str(summary.get("input")),
        "output": str(summary.get("output")),
    }
    if summary.get("run_id"):
        tags["score_run_id"] = str(summary["run_id"])
    if registered:
        tags |= {
            "registered_model": registered["uri"],
            "registered_model_version": registered["version"],
            "registered_model_name": registered["name"],
        }
    t = _new_run(client, exp, mc, name=f"score {summary.get('run_id') or 'nothing new'}", tags=tags)
    params = config.to_dict() | ({"model": registered["uri"], "model_path": config.model} if registered else {})
    _log_params(t, params)
    counts = {k: v for k, v in summary.items() if k not in ("series",)}
    _log_metrics(
        client,
        t.run_id,
        [(k, v, 0) for k, v in scalar_metrics(counts).items()]
        + [(k, v, 0) for k, v in scalar_metrics(summary.get("series") or {}, "series_").items()],
    )
    client.set_terminated(t.run_id, "FINISHED")
    return t.run_id
