"""MLflow tracking against a real `mlflow server` on loopback (SQLite backend, local artifact root):
training, a resumed training run, a search, scoring (by package folder and by models:/), and
nothing logged without a tracking URI. Tiny random-init models on generated 64 px data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from braintumor_ray import ConfigError, make_sample_dataset

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


class DriverKilled(BaseException):
    """The training driver dying (as from SIGKILL) after training, before its MLflow logging."""


@pytest.fixture(scope="module")
def client(mlflow_client):
    return mlflow_client


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
    # The server is the session's: compare with what it held before (other modules log to it too).
    experiments = {e.name for e in client.search_experiments()}
    runs = {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])}
    artifacts = sorted(mlflow_server[1].rglob("*"))
    s = run_scoring(ScoreConfig(model=package, input=archive, output=str(tmp_path / "p")))
    assert s.scored > 0 and s.mlflow_run_id is None
    assert {e.name for e in client.search_experiments()} == experiments and "Default" in experiments
    assert {r.info.run_id for e in client.search_experiments() for r in client.search_runs([e.experiment_id])} == runs
    assert not client.search_runs(["0"])
    assert sorted(mlflow_server[1].rglob("*")) == artifacts  # the artifact root stays as it was
    with pytest.raises(ConfigError, match="tracking"):
        run_scoring(ScoreConfig(model="models:/bt-model/1", input=archive, output=str(tmp_path / "q")))


@pytest.fixture(scope="module")
def trained(train_data_dir, s3_endpoint, mlflow_server, client):
    """One training run for the tracking tests and the s3:// storage test below (they used to train
    twice): one worker, storage on s3://, tracked to MLflow; its driver dies after training and
    after writing its outputs, before its MLflow logging; then --resume. Returns (config, the
    first run's metrics, the resumed run's metrics, the MLflow run id, the bucket)."""
    import boto3

    from braintumor_ray.tracking import RUN_ID_FILE
    from braintumor_ray.train import TrainConfig, _run, run_training

    bucket = "bt-mlflow-train"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    # No model.onnx: these tests score it with PyTorch (the export costs ~5 s; tests/end_to_end/test_train_job.py checks it).
    cfg = TrainConfig.smoke_test(data=train_data_dir, storage=f"s3://{bucket}/runs", name="s3run", epochs=4, onnx=False,
                                 s3_endpoint_url=s3_endpoint, mlflow=_tracking(mlflow_server[0], "bt-train"))
    first: list[dict] = []

    def killed(tracking, metrics, run):
        first.append(metrics)
        raise DriverKilled("driver killed")

    original = _run.finish_training
    _run.finish_training = killed
    try:
        with pytest.raises(DriverKilled):
            run_training(cfg)
    finally:
        _run.finish_training = original
    from braintumor_ray.core import resolve

    run_id = resolve(f"s3://{bucket}/runs/s3run", s3_endpoint_url=s3_endpoint).join(RUN_ID_FILE).read_bytes().decode().strip()
    started = client.get_run(run_id)
    assert started.info.status == "RUNNING" and started.data.params["model"] == "resnet10t"
    again = run_training(cfg, resume=True)
    return cfg, first[0], again, run_id, bucket


def _learned(history, result):
    """Loss falls and the easy task ends well classified; a model that learnt nothing has
    accuracy ~0.25 and ROC-AUC ~0.5 (as in tests/train/test_train.py)."""
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"], [h["train_loss"] for h in history]
    for split in ("val", "test"):
        m = result[split]
        assert m["accuracy"] >= 0.7 and m["roc_auc_ovr"] >= 0.95, (split, m)


def test_one_worker_learns_with_s3_storage_and_resume(trained, s3_endpoint):
    """(from tests/train/test_train.py) One worker learns the easy task; checkpoints, metrics, plots and
    the model package land on s3:// and load back; a finished run is refused unless resumed, and
    its --resume trains no epoch again."""
    import boto3
    import numpy as np

    from braintumor_ray import load_model_package
    from braintumor_ray.train import run_training

    cfg, m, again, _, bucket = trained
    assert m["run"]["config"]["num_workers"] == 1 and m["restores"] == []
    _learned(m["epochs"], m)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("runs/s3run/checkpoint_") and k.endswith("state.pt") for k in keys), keys
    assert "runs/s3run/model/model.safetensors" in keys and "runs/s3run/model/model.onnx" not in keys  # onnx=False
    for png in ("curves.png", "confusion_test.png", "confusion_test_clean.png"):
        body = s3.get_object(Bucket=bucket, Key=f"runs/s3run/{png}")["Body"].read()
        assert body[:4] == b"\x89PNG"
    saved = json.loads(s3.get_object(Bucket=bucket, Key="runs/s3run/metrics.json")["Body"].read())
    page = s3.get_object(Bucket=bucket, Key="runs/s3run/report.html")["Body"].read().decode()
    assert saved["report"] == f"s3://{bucket}/runs/s3run/report.html" and 'id="examples"' in page
    assert page.count("data:image/png;base64,") >= 2 + 2 * 4  # curves, reliability, scans and maps (read from s3://)
    for split in ("test", "test_clean"):
        assert 0 <= saved[split]["accuracy"] <= 1 and 0 <= saved[split]["macro_f1"] <= 1
        assert set(saved[split]["per_class"]) == {"glioma", "meningioma", "no_tumor", "pituitary"}
        assert np.asarray(saved[split]["confusion_matrix"]).sum() == saved[split]["n"]
    assert saved["test_clean"]["n"] < saved["test"]["n"]
    assert 0 <= saved["val"]["macro_f1"] <= 1 and len(saved["epochs"]) == 4
    pkg = load_model_package(f"s3://{bucket}/runs/s3run/model", s3_endpoint_url=s3_endpoint)
    assert pkg.model_id == again["model"]["model_id"] and pkg.metrics["test_accuracy"] == again["test"]["accuracy"]
    assert pkg.preprocess.image_size == 64
    assert tuple(pkg.logits(np.zeros((2, 64, 64), np.uint8)).shape) == (2, 4)

    with pytest.raises(ConfigError, match="already exists"):
        run_training(cfg)
    # --resume of a finished run (the fixture's second call): no epoch is trained again; it restores
    # epoch 4 and writes the outputs again.
    assert [h["epoch"] for h in again["epochs"]] == [1, 2, 3, 4] and again["restores"] == [4]
    assert again["test"]["accuracy"] == m["test"]["accuracy"]


def test_training_run_metrics_artifacts_and_registered_version(trained, client):
    cfg, _, metrics, run_id, _ = trained
    exp = client.get_experiment_by_name("bt-train")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the resumed run continued the same MLflow run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumes"] == "1"
    assert run.data.tags["model_id"] == metrics["model"]["model_id"]
    p = run.data.params
    assert p["epochs"] == "4" and p["augment.rotate"] == str(cfg.augment.rotate) and p["mlflow.experiment"] == "bt-train"
    steps = [m.step for m in client.get_metric_history(run_id, "val_macro_f1")]
    assert steps == [1, 2, 3, 4]
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

    cfg, _, metrics, run_id, _ = trained
    mv = next(v for v in client.search_model_versions("name='bt-model'") if v.run_id == run_id)
    client.set_registered_model_alias("bt-model", "champion", mv.version)
    mc = _tracking(mlflow_server[0], "bt-score")
    import tempfile

    temps = {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("braintumor-")}
    for i, ref in enumerate((f"models:/bt-model/{mv.version}", "models:/bt-model@champion")):
        s = run_scoring(ScoreConfig(model=ref, input=archive, output=str(tmp_path / f"p{i}"), mlflow=mc))
        assert s["model_id"] == metrics["model"]["model_id"] and s["scored"] == 8, s
        run = client.get_run(s["mlflow_run_id"])
        assert run.data.tags["model_id"] == s["model_id"] and run.data.tags["registered_model"] == ref
        assert run.data.metrics["scored"] == 8 and run.data.metrics["wall_s"] > 0 and "images_per_s" in run.data.metrics
        assert run.data.params["model"] == ref
        saved = yaml.safe_load((tmp_path / f"p{i}" / "_config.yaml").read_text())
        assert saved["model"] == ref  # the run's settings name the registered model, not a temp folder
        # Fetched from the server's artifact store under OUTPUT._staging/ (every node reads it), not a
        # driver-local temp folder; removed when the run ended (issue 26).
        staging = str(tmp_path / f"p{i}") + "._staging"
        assert run.data.params["model_path"].startswith(os.path.join(staging, "_models", s["run_id"]) + os.sep), run.data.params
        assert not os.path.exists(os.path.join(staging, "_models"))
    exp = client.get_experiment_by_name("bt-score")
    assert len(client.search_runs([exp.experiment_id])) == 2
    assert {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("braintumor-")} == temps  # no copy left

    # A version whose model_id tag is not the package's is refused; unknown versions are clear errors.
    bad = client.create_model_version("bt-model", mv.source, run_id=run_id, tags={"model_id": "0" * 16})
    with pytest.raises(ConfigError, match="model_id"):
        run_scoring(ScoreConfig(model=f"models:/bt-model/{bad.version}", input=archive, output=str(tmp_path / "x"),
                                mlflow=mc))
    with pytest.raises(ConfigError, match="models:/bt-model/99"):
        run_scoring(ScoreConfig(model="models:/bt-model/99", input=archive, output=str(tmp_path / "y"), mlflow=mc))


def test_a_run_whose_tracking_could_not_start_is_opened_at_the_end(mlflow_server, client, tmp_path):
    from braintumor_ray.core import resolve
    from braintumor_ray.tracking import RUN_ID_FILE, finish_training
    from braintumor_ray.tracking._mlflow import PendingTracking

    run = resolve(str(tmp_path / "run"))
    pending = PendingTracking(_tracking(mlflow_server[0], "bt-pending"), run, "train", "late", {"lr": 0.5}, False,
                              "the server was down")
    assert finish_training(pending, {"epochs": [{"epoch": 1, "val_loss": 0.5}], "model": {}}, run) is None
    logged = client.get_run(run.join(RUN_ID_FILE).read_bytes().decode())
    assert logged.info.status == "FINISHED" and logged.data.params["lr"] == "0.5"


# The search's MLflow runs (parent, children, leaderboard, best model, resume) are checked on the
# session's one search: tests/tune/test_tune.py::test_search_on_s3_asha_leaderboard_and_best_model.


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


def test_search_run_metrics_are_the_best_models_figures_and_the_search_counts():
    """The search run's own metrics (no server needed): final figures per split without the
    confusion matrix, the trust figures, the counts and time."""
    from braintumor_ray.tracking._mlflow import _search_final_metrics

    summary = {"val": {"accuracy": 0.9, "confusion_matrix": [[1]]}, "test": {"macro_f1": 0.8}, "trust": {"ece": 0.05},
               "trials": 4, "wall_s": 12.5, "asha_saved_fraction": 0.25, "leaderboard": [{"trial": "t1"}]}
    assert _search_final_metrics(summary) == {"final_val_accuracy": 0.9, "final_test_macro_f1": 0.8, "trust_ece": 0.05,
                                              "trials": 4.0, "wall_s": 12.5, "asha_saved_fraction": 0.25}


def test_a_registered_version_resolves_to_its_package_folder_checked_against_its_tag(tmp_path, monkeypatch):
    """models:/ resolution in models (no server: the registry's lookup stubbed): a version whose
    source is a folder is scored from there; a package whose model_id is not the version's tag
    is refused; a folder path is left alone."""
    from braintumor_ray import MRIPreprocess
    from braintumor_ray.models import _registry, create_model, export_model_package, resolve_registered_model
    from braintumor_ray.score import ScoreConfig
    from braintumor_ray.tracking import RegisteredVersion

    folder = str(tmp_path / "pkg")
    meta = export_model_package(create_model("resnet10t", pretrained=False), folder,
                                preprocess=MRIPreprocess(image_size=64), onnx=False)
    tag = {"id": meta.model_id}
    monkeypatch.setattr(_registry, "find_registered_version", lambda uri, mc: RegisteredVersion(
        uri=uri, name="bt", version="3", source=f"file://{folder}", model_id=tag["id"]))
    cfg = ScoreConfig(model="models:/bt/3", input="i", output="o", mlflow=_tracking("http://127.0.0.1:9", "x"))
    resolved, registered = resolve_registered_model(cfg)
    assert resolved.model == folder and registered["version"] == "3" and registered["model_id"] == meta.model_id
    tag["id"] = "0" * 16
    with pytest.raises(ConfigError, match="model_id"):
        resolve_registered_model(cfg)
    plain = ScoreConfig(model=folder, input="i", output="o")
    assert resolve_registered_model(plain) == (plain, None)
