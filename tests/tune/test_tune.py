"""Ray Tune search: trials are Ray Train runs, ASHA stops a hopeless trial, the leaderboard and the
best model land on s3://; the search space and its YAML are validated. Tiny models, generated data."""

from __future__ import annotations

import json

import pytest

from braintumor_ray import ConfigError

pytestmark = pytest.mark.timeout(600)


def test_search_on_s3_asha_leaderboard_and_best_model(train_data_dir, s3_endpoint, s3_bucket, mlflow_server,
                                                     mlflow_client):
    """Two trials run one after the other: one learns (lr 3e-3), one cannot (lr 1e-7). ASHA
    compares them at its rungs and stops the second; the first runs its 3 epochs and is exported.
    The search is tracked to the session's MLflow server (the tracking test used to run a search
    of its own): a parent run, a child per trial, the best model registered; --resume adds none."""
    import boto3
    import pyarrow.parquet as pq

    from braintumor_ray import load_model_package
    from braintumor_ray.tracking import MLflowConfig
    from braintumor_ray.tune import SearchConfig, run_search

    cfg = SearchConfig.smoke_test(
        data=train_data_dir, storage=f"s3://{s3_bucket}/searches", name="s1", s3_endpoint_url=s3_endpoint,
        models=("resnet10t",), max_epochs=3, grace_period=1, reduction_factor=2, max_concurrent_trials=1,
        space={"lr": {"grid": [3e-3, 1e-7]}, "batch_size": 8, "drop_rate": 0.0, "augment_strength": 0.5,
               "weight_decay": 0.01},
        fixed=dict(SearchConfig.SMOKE["fixed"], onnx=False),  # a fixed setting reaches the export: no model.onnx
        ensemble=2,  # both trials in best_ensemble/ (issue 38)
        mlflow=MLflowConfig(tracking_uri=mlflow_server[0], experiment="bt-search", registered_model="bt-search-model"),
    )
    s = run_search(cfg)
    _check_search_runs(mlflow_client, s)
    rows = {r["lr"]: r for r in s["leaderboard"]}
    assert set(rows) == {3e-3, 1e-7}, rows
    good, bad = rows[3e-3], rows[1e-7]
    assert good["rank"] == 1 and good["status"] == "completed" and good["epochs_run"] == 3
    # Stopped at a rung (epoch 1 or 2: Tune's stop reaches a running trial a report or so late).
    assert bad["status"] == "stopped by ASHA" and bad["epochs_run"] < 3, bad
    assert good["best_val_macro_f1"] > bad["best_val_macro_f1"]
    assert s["trial_epochs_budget"] == 6 and s["trial_epochs_run"] == 3 + bad["epochs_run"]
    assert s["best_trial"]["trial"] == good["trial"]
    # The exported model is the good trial's best epoch: it scores the test split like the search says.
    n_test = pq.read_table(f"{train_data_dir}/images/split=test", columns=["label_index"]).num_rows
    assert s["test"]["n"] == n_test and s["test"]["accuracy"] >= 0.6, s["test"]
    assert s["test_clean"]["n"] < s["test"]["n"]

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="searches/s1/")["Contents"]}
    for name in ("leaderboard.csv", "leaderboard.md", "val_macro_f1.png", "best.json", "search.json", "report.html",
                 "best_model/model.json", "best_model/model.safetensors"):
        assert f"searches/s1/{name}" in keys, name
    assert "searches/s1/best_model/model.onnx" not in keys
    assert any(k.startswith(f"searches/s1/trials/{good['trial']}/checkpoint_") for k in keys)
    csv_text = s3.get_object(Bucket=s3_bucket, Key="searches/s1/leaderboard.csv")["Body"].read().decode()
    assert csv_text.splitlines()[0].startswith("rank,trial,backbone,lr")
    assert len(csv_text.strip().splitlines()) == 3
    best = json.loads(s3.get_object(Bucket=s3_bucket, Key="searches/s1/best.json")["Body"].read())
    assert best["report"] == "s3://" + s3_bucket + "/searches/s1/report.html"
    page = s3.get_object(Bucket=s3_bucket, Key="searches/s1/report.html")["Body"].read().decode()
    assert 'id="leaderboard"' in page and 'id="examples"' in page and good["trial"] in page
    assert best["model"]["model_id"] == s["model"]["model_id"]

    # --ensemble 2: both trials, in leaderboard order, one package with trust fitted on the ensemble.
    ens = load_model_package(f"s3://{s3_bucket}/searches/s1/best_ensemble", s3_endpoint_url=s3_endpoint)
    members = json.loads(s3.get_object(Bucket=s3_bucket, Key="searches/s1/best_ensemble/model.json")["Body"].read())
    assert [m["source"]["uri"].rsplit("/", 1)[1] for m in members["members"]] == [good["trial"], bad["trial"]]
    assert ens.model_id == s["ensemble"]["model"]["model_id"] == best["ensemble"]["model"]["model_id"]
    assert ens.trust is not None and ens.metrics["trials"] == [good["trial"], bad["trial"]]
    assert s["ensemble"]["test"]["n"] == n_test and "searches/s1/best_ensemble/model.onnx" not in keys

    pkg = load_model_package(f"s3://{s3_bucket}/searches/s1/best_model", s3_endpoint_url=s3_endpoint)
    assert pkg.metrics["trial"] == good["trial"]
    assert pkg.metrics["test_accuracy"] == pytest.approx(s["test"]["accuracy"])

    # The same name again is refused; --resume of a finished search only redoes the outputs.
    with pytest.raises(ConfigError, match="already exists"):
        run_search(cfg)
    again = run_search(cfg, resume=True)
    assert {r["trial"]: r["epochs_run"] for r in again["leaderboard"]} == {
        r["trial"]: r["epochs_run"] for r in s["leaderboard"]
    }
    _check_resumed_search_runs(mlflow_client, s, again)


def _check_search_runs(client, s) -> None:
    """(from tests/tracking/test_mlflow.py) The search's MLflow runs: one parent with the best trial and the
    test figures, a child per trial with its status, ASHA flag and per-epoch history, the search's
    files as artifacts, the best model registered with its model_id and trial."""
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


def _check_resumed_search_runs(client, s, again) -> None:
    """--resume of the finished search continues the same parent and children: no new runs. It
    exports best_model/ again: one version per distinct package, the current one among them."""
    exp = client.get_experiment_by_name("bt-search")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 3
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    versions = client.search_model_versions("name='bt-search-model'")
    ids = {v.tags["model_id"] for v in versions}
    assert ids == {s["model"]["model_id"], again["model"]["model_id"]} and len(versions) == len(ids)
    assert client.get_run(parent.info.run_id).data.tags["model_id"] == again["model"]["model_id"]


def test_space_and_config_validation(tmp_path):
    from braintumor_ray.core import read_yaml as load_yaml
    from braintumor_ray.tune import SearchConfig, to_tune_space

    cfg = SearchConfig(data=str(tmp_path))
    assert SearchConfig.from_dict(cfg.to_dict()) == cfg
    assert set(cfg.search_space()) == {"lr", "weight_decay", "batch_size", "drop_rate", "augment_strength", "transfer"}
    assert "transfer" not in SearchConfig(pretrained=False).search_space()  # random init trains everything
    t = cfg.trial_config({"model": "resnet50", "lr": 1e-3, "batch_size": 16.0, "transfer": "last-2"}, trial_id="t1")
    assert (t.model, t.batch_size, t.transfer, t.epochs, t.name) == ("resnet50", 16, "last-2", cfg.max_epochs, "t1")
    assert t.storage.endswith("/runs/tune/trials") and t.storage.startswith("/")  # absolute: trials run elsewhere
    g = SearchConfig(gpus_per_trial=0.25).trial_config({"model": "vgg16"})
    assert g.use_gpu and g.gpus_per_worker == 0.25

    space = to_tune_space(cfg.search_space() | {"batch_size": {"grid": [8, 16]}, "drop_rate": 0.2})
    assert space["drop_rate"] == 0.2 and "grid_search" in space["batch_size"]

    bad = [
        dict(models=()),
        dict(models=("resnet50", "resnet50")),
        dict(name="a/b"),
        dict(grace_period=9, max_epochs=8),
        dict(reduction_factor=1),
        dict(gpus_per_trial=3, workers_per_trial=2),
        dict(space={"lr": {"loguniform": [0, 1]}}),
        dict(space={"lr": {"between": [1, 2]}}),
        dict(space={"epochs": 3}),
        dict(space={"colour": {"choice": [1]}}),
        dict(space={"transfer": {"choice": ["half"]}}),
        dict(space={"batch_size": {"choice": []}}),
        dict(fixed={"storage": "x"}),
        dict(fixed={"lr": 0.1}, space={"lr": {"uniform": [0.1, 0.2]}}),
        dict(fixed={"label_smoothing": 2.0}),  # an impossible training setting fails here, not in a trial
    ]
    for kw in bad:
        with pytest.raises(ConfigError):
            SearchConfig(**kw)
    with pytest.raises(ConfigError, match="unknown SearchConfig setting modles"):
        SearchConfig.from_dict({"modles": ["x"]})

    y = tmp_path / "space.yaml"
    y.write_text("models: [resnet10t]\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n  transfer: null\nfixed:\n  label_smoothing: 0.05\n")
    loaded = SearchConfig.from_dict(load_yaml(str(y)))
    assert loaded.models == ("resnet10t",) and "transfer" not in loaded.search_space()
    assert loaded.trial_config({"model": "resnet10t", "lr": 1e-3}).label_smoothing == 0.05
    # Any training setting may be searched; a fixed setting replaces the default range; fixed wins over nothing searched.
    c2 = SearchConfig(space={"label_smoothing": {"choice": [0.0, 0.2]}}, fixed={"lr": 5e-4})
    assert "lr" not in c2.search_space()
    t2 = c2.trial_config({"model": "resnet50", "label_smoothing": 0.2})
    assert (t2.label_smoothing, t2.lr) == (0.2, 5e-4)
    for kw in (dict(fixed={"seed": 3}), dict(fixed={"colour": 1})):
        with pytest.raises(ConfigError):
            SearchConfig(**kw)
    (tmp_path / "bad.yaml").write_text("space: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(tmp_path / "bad.yaml"))


def test_missing_weights_fail_before_any_trial(train_data_dir, tmp_path):
    """Offline, a backbone without local weights is refused in the driver with the fix in the message."""
    from braintumor_ray.tune import SearchConfig, run_search

    cfg = SearchConfig(data=train_data_dir, storage=str(tmp_path), name="w", models=("resnet10t",), pretrained=True)
    with pytest.raises(ConfigError, match="--no-pretrained"):
        run_search(cfg)
    assert not (tmp_path / "w" / "trials").exists()
