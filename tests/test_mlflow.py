"""MLflow tracking against a real `mlflow server` on loopback (SQLite backend, local artifact root):
training, a resumed training run, a search, scoring (by package folder and by models:/), and
nothing logged without a tracking URI. Tiny random-init models on generated 64 px data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from braintumor_ray import ConfigError, MRIPreprocess, make_sample_dataset
from braintumor_ray.ingest import IngestConfig, run_ingest

pytest.importorskip("mlflow")
pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


class DriverKilled(BaseException):
    """The training driver dying (as from SIGKILL) after training, before its MLflow logging."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1: SQLite in tmp, artifacts proxied to a local folder; yields
    (tracking URI, artifact folder)."""
    root = tmp_path_factory.mktemp("mlflow")
    artifacts = root / "artifacts"
    artifacts.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(artifacts)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("mlflow server did not start: " + (root / "server.log").read_text()[-2000:])
        time.sleep(0.5)
    yield uri, artifacts
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server[0], registry_uri=mlflow_server[0])


@pytest.fixture(scope="module")
def ray_session():
    """With the dashboard, as in test_tune.py (Ray Train's placement-group cleaner needs the State API)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-data")
    make_sample_dataset(str(root / "sample"), per_class=20, test_per_class=4, size=96, leaks=1, seed=5)
    out = str(root / "pre")
    run_ingest(IngestConfig(input=str(root / "sample"), output=out, preprocess=MRIPreprocess(image_size=64)))
    return out


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-archive")
    make_sample_dataset(str(root / "a"), per_class=2, test_per_class=0, leaks=0, size=96, seed=9)
    return str(root / "a")


def _tracking(uri, experiment, model="bt-model"):
    from braintumor_ray.tracking import MLflowConfig

    return MLflowConfig(tracking_uri=uri, experiment=experiment, registered_model=model)


def test_no_tracking_uri_logs_nothing(ray_session, package, archive, mlflow_server, client, tmp_path, monkeypatch):
    """Without a tracking URI (and none in the environment) scoring opens no MLflow run."""
    from braintumor_ray.score import ScoreConfig, run_scoring

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    s = run_scoring(ScoreConfig(model=package, input=archive, output=str(tmp_path / "p")))
    assert s["scored"] > 0 and "mlflow_run_id" not in s
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert not client.search_runs(["0"])
    assert not any(mlflow_server[1].iterdir())  # the artifact root stays empty
    with pytest.raises(ConfigError, match="tracking"):
        run_scoring(ScoreConfig(model="models:/bt-model/1", input=archive, output=str(tmp_path / "q")))


@pytest.fixture(scope="module")
def trained(data_dir, mlflow_server, client, tmp_path_factory):
    """A training run whose driver dies after training, before its MLflow logging, then --resume."""
    from braintumor_ray.train import TrainConfig, _run, run_training
    from braintumor_ray.tracking import RUN_ID_FILE

    storage = tmp_path_factory.mktemp("mlflow-runs")
    cfg = TrainConfig.smoke_test(data=data_dir, storage=str(storage), name="r1", model="resnet10t", epochs=2,
                                 num_workers=1, batch_size=8, mlflow=_tracking(mlflow_server[0], "bt-train"))

    def killed(*a, **k):
        raise DriverKilled("driver killed")

    original = _run.finish_training
    _run.finish_training = killed
    try:
        with pytest.raises(DriverKilled):
            run_training(cfg)
    finally:
        _run.finish_training = original
    run_id = (storage / "r1" / RUN_ID_FILE).read_text().strip()
    first = client.get_run(run_id)
    assert first.info.status == "RUNNING" and first.data.params["model"] == "resnet10t"
    metrics = run_training(cfg, resume=True)
    return cfg, metrics, run_id


def test_training_run_metrics_artifacts_and_registered_version(trained, client):
    cfg, metrics, run_id = trained
    exp = client.get_experiment_by_name("bt-train")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resumed run continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert run.data.tags["model_id"] == metrics["model"]["model_id"]
    p = run.data.params
    assert p["epochs"] == "2" and p["augment.rotate"] == str(cfg.augment.rotate) and p["mlflow.experiment"] == "bt-train"
    steps = [m.step for m in client.get_metric_history(run_id, "val_macro_f1")]
    assert steps == [1, 2]
    m = run.data.metrics
    assert m["final_test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert m["final_test_clean_macro_f1"] == pytest.approx(metrics["test_clean"]["macro_f1"])
    assert m["best_epoch"] == metrics["best_epoch"]
    if metrics.get("trust"):
        assert m["trust_temperature"] == pytest.approx(metrics["trust"]["temperature"])
        assert any(k.startswith("trust_test_ece") for k in m) and any(k.endswith("_flagged") for k in m)
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "config.yaml", "curves.png", "model"} <= files, files
    assert "model/model.json" in {a.path for a in client.list_artifacts(run_id, "model")}
    versions = client.search_model_versions("name='bt-model'")
    mine = [v for v in versions if v.run_id == run_id]
    assert len(mine) == 1 and mine[0].tags["model_id"] == metrics["model"]["model_id"]


def test_scoring_by_registered_model(trained, archive, client, mlflow_server, tmp_path):
    from braintumor_ray.score import ScoreConfig, run_scoring

    cfg, metrics, run_id = trained
    mv = next(v for v in client.search_model_versions("name='bt-model'") if v.run_id == run_id)
    client.set_registered_model_alias("bt-model", "champion", mv.version)
    mc = _tracking(mlflow_server[0], "bt-score")
    for i, ref in enumerate((f"models:/bt-model/{mv.version}", "models:/bt-model@champion")):
        s = run_scoring(ScoreConfig(model=ref, input=archive, output=str(tmp_path / f"p{i}"), mlflow=mc))
        assert s["model_id"] == metrics["model"]["model_id"] and s["scored"] == 8, s
        run = client.get_run(s["mlflow_run_id"])
        assert run.data.tags["model_id"] == s["model_id"] and run.data.tags["registered_model"] == ref
        assert run.data.metrics["scored"] == 8 and run.data.metrics["wall_s"] > 0 and "images_per_s" in run.data.metrics
        assert run.data.params["model"] == ref
        saved = yaml.safe_load((tmp_path / f"p{i}" / "_config.yaml").read_text())
        assert saved["model"] == ref  # the run's settings name the registered model, not a temp folder
    exp = client.get_experiment_by_name("bt-score")
    assert len(client.search_runs([exp.experiment_id])) == 2

    # A version whose model_id tag is not the package's is refused; unknown versions are clear errors.
    bad = client.create_model_version("bt-model", mv.source, run_id=run_id, tags={"model_id": "0" * 16})
    with pytest.raises(ConfigError, match="model_id"):
        run_scoring(ScoreConfig(model=f"models:/bt-model/{bad.version}", input=archive, output=str(tmp_path / "x"),
                                mlflow=mc))
    with pytest.raises(ConfigError, match="models:/bt-model/99"):
        run_scoring(ScoreConfig(model="models:/bt-model/99", input=archive, output=str(tmp_path / "y"), mlflow=mc))


def test_search_parent_children_leaderboard_and_best_model(data_dir, mlflow_server, client, tmp_path):
    from braintumor_ray.tune import SearchConfig, run_search

    cfg = SearchConfig.smoke_test(
        data=data_dir, storage=str(tmp_path / "searches"), name="s1", models=("resnet10t",), max_epochs=2,
        grace_period=1, reduction_factor=2, max_concurrent_trials=1,
        space={"lr": {"grid": [3e-3, 1e-7]}, "batch_size": 8, "drop_rate": 0.0, "augment_strength": 0.5,
               "weight_decay": 0.01},
        mlflow=_tracking(mlflow_server[0], "bt-search", model="bt-search-model"),
    )
    s = run_search(cfg)
    exp = client.get_experiment_by_name("bt-search")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["model_id"] == s["model"]["model_id"]
    assert parent.data.tags["best_trial"] == s["best_trial"]["trial"]
    assert parent.data.metrics["final_test_accuracy"] == pytest.approx(s["test"]["accuracy"])
    rows = {r["trial"]: r for r in s["leaderboard"]}
    for c in children:
        tid = c.data.tags["trial_id"]
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert c.data.tags["status"] == rows[tid]["status"]
        assert c.data.tags["asha_stopped"] == str(rows[tid]["status"] == "stopped by ASHA").lower()
        assert float(c.data.params["lr"]) in (3e-3, 1e-7) and c.data.params["model"] == "resnet10t"
        hist = client.get_metric_history(c.info.run_id, "val_macro_f1")
        assert [m.step for m in hist] == list(range(1, rows[tid]["epochs_run"] + 1))
    files = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "leaderboard.md", "best.json", "val_macro_f1.png", "model"} <= files, files
    (v,) = client.search_model_versions("name='bt-search-model'")
    assert v.tags["model_id"] == s["model"]["model_id"] and v.tags["trial"] == s["best_trial"]["trial"]

    # --resume of the finished search continues the same parent and children: no new runs. It
    # exports best_model/ again: one version per distinct package, the current one among them.
    again = run_search(cfg, resume=True)
    assert len(client.search_runs([exp.experiment_id])) == 3
    versions = client.search_model_versions("name='bt-search-model'")
    ids = {v.tags["model_id"] for v in versions}
    assert ids == {s["model"]["model_id"], again["model"]["model_id"]} and len(versions) == len(ids)
    assert client.get_run(parent.info.run_id).data.tags["model_id"] == again["model"]["model_id"]


def test_mlflow_is_not_imported_without_a_tracking_uri():
    """The stages and the no-URI paths of the tracking hooks never import mlflow."""
    code = (
        "import sys\n"
        "from braintumor_ray.tracking import MLflowConfig, finish_training, log_scoring, start_tracking\n"
        "import braintumor_ray.train, braintumor_ray.tune, braintumor_ray.score\n"
        "from braintumor_ray.core import resolve\n"
        "from braintumor_ray.score import ScoreConfig\n"
        "assert start_tracking(MLflowConfig(), resolve('x'), stage='train', name='x', params={}, resume=False) is None\n"
        "assert log_scoring(ScoreConfig(model='m', input='i', output='o'), {'a': 1}) == {'a': 1}\n"
        "assert 'mlflow' not in sys.modules, 'mlflow imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
