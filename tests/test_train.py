"""Ray Train fine-tuning: the worker function under TorchTrainer (1 and 2 CPU workers), fault
tolerance, s3:// storage, and the run's outputs. Tiny random-init models on generated 64 px data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from braintumor_ray import MRIPreprocess, make_sample_dataset
from braintumor_ray.ingest import IngestConfig, run_ingest

from conftest import start_ray

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]

# The test hook that makes a worker fail (read by braintumor_ray.train's worker; nothing else sets it).
INJECT_FAILURE_ENV = "BRAINTUMOR_TEST_INJECT_FAILURE"
FAILING_RUN = "t"  # the run the hook is armed for: _cfg's name


@pytest.fixture(scope="module")
def failure_marker(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hook") / "failed-once")


@pytest.fixture(scope="module")
def ray_session(failure_marker):
    """conftest's session, with the failure hook in every Ray worker's environment (Ray Train's
    workers included): rank 1 of the run named "t" raises once at step 1 of epoch 2."""
    hook = {"marker": failure_marker, "epoch": 2, "rank": 1, "step": 1, "name": FAILING_RUN}
    ray = start_ray(runtime_env={"env_vars": {INJECT_FAILURE_ENV: json.dumps(hook)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    make_sample_dataset(str(root / "sample"), per_class=30, test_per_class=8, size=96, leaks=2, seed=1)
    out = str(root / "pre")
    run_ingest(IngestConfig(input=str(root / "sample"), output=out, preprocess=MRIPreprocess(image_size=64)))
    return out


@pytest.fixture(scope="module")
def train_data(data_dir):
    from braintumor_ray.train import load_train_data

    return load_train_data(data_dir)


def _cfg(tmp_path, **kw):
    from braintumor_ray.train import TrainConfig

    return TrainConfig.smoke_test(storage=str(tmp_path / "runs"), name=FAILING_RUN, **kw)


def _learned(result):
    """Loss falls and the easy task ends well classified; a model that learnt nothing has
    accuracy ~0.25 and ROC-AUC ~0.5."""
    hist = result["history"]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"], [h["train_loss"] for h in hist]
    for split in ("val", "test"):
        m = result[split]
        assert m["accuracy"] >= 0.7 and m["roc_auc_ovr"] >= 0.95, (split, m)


def test_two_workers_survive_a_failure_mid_epoch_2(train_data, failure_marker, tmp_path):
    """Rank 1 raises once in epoch 2 of 5: Ray Train restarts the group from the epoch-1 checkpoint."""
    from braintumor_ray.train import build_trainer

    marker = failure_marker  # the hook is armed by this module's ray_session
    cfg = _cfg(tmp_path, epochs=5, num_workers=2)
    result = build_trainer(cfg, data=train_data).fit()
    out = result.return_value
    assert os.path.exists(marker), "the failure hook never fired"
    assert out["world_size"] == 2
    assert out["restores"] == [1], out["restores"]  # resumed from the epoch-1 checkpoint, not from zero
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4, 5]
    _learned(out)
    # Every test image was scored once, although each worker only scored its own batches.
    assert out["test"]["n"] == train_data.counts["test"]
    assert out["test_clean"]["n"] < out["test"]["n"]


def test_one_worker_learns_with_s3_storage_and_resume(data_dir, s3_endpoint, s3_bucket):
    """One worker learns the easy task; checkpoints, metrics, plots and the model package land on
    s3:// and load back; a finished run is refused unless resumed."""
    import boto3

    from braintumor_ray import ConfigError, load_model_package
    from braintumor_ray.train import TrainConfig, run_training

    cfg = TrainConfig.smoke_test(
        data=data_dir, storage=f"s3://{s3_bucket}/runs", name="s3run", epochs=4, s3_endpoint_url=s3_endpoint
    )
    m = run_training(cfg)
    assert m["run"]["config"]["num_workers"] == 1 and m["restores"] == []
    _learned({"history": m["epochs"], "val": m["val"], "test": m["test"]})
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert any(k.startswith("runs/s3run/checkpoint_") and k.endswith("state.pt") for k in keys), keys
    for png in ("curves.png", "confusion_test.png", "confusion_test_clean.png"):
        body = client.get_object(Bucket=s3_bucket, Key=f"runs/s3run/{png}")["Body"].read()
        assert body[:4] == b"\x89PNG"
    saved = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/s3run/metrics.json")["Body"].read())
    page = client.get_object(Bucket=s3_bucket, Key="runs/s3run/report.html")["Body"].read().decode()
    assert saved["report"] == f"s3://{s3_bucket}/runs/s3run/report.html" and 'id="examples"' in page
    assert page.count("data:image/png;base64,") >= 2 + 2 * 4  # curves, reliability, scans and maps (read from s3://)
    for split in ("test", "test_clean"):
        assert 0 <= saved[split]["accuracy"] <= 1 and 0 <= saved[split]["macro_f1"] <= 1
        assert set(saved[split]["per_class"]) == {"glioma", "meningioma", "no_tumor", "pituitary"}
        assert np.asarray(saved[split]["confusion_matrix"]).sum() == saved[split]["n"]
    assert saved["test_clean"]["n"] < saved["test"]["n"]
    assert 0 <= saved["val"]["macro_f1"] <= 1 and len(saved["epochs"]) == 4
    pkg = load_model_package(f"s3://{s3_bucket}/runs/s3run/model", s3_endpoint_url=s3_endpoint)
    assert pkg.model_id == m["model"]["model_id"] and pkg.metrics["test_accuracy"] == m["test"]["accuracy"]
    assert pkg.preprocess.image_size == 64
    assert tuple(pkg.logits(np.zeros((2, 64, 64), np.uint8)).shape) == (2, 4)

    with pytest.raises(ConfigError, match="already exists"):
        run_training(cfg)
    # --resume of a finished run: no epoch is trained again; it restores epoch 4 and writes the outputs again.
    again = run_training(cfg, resume=True)
    assert [h["epoch"] for h in again["epochs"]] == [1, 2, 3, 4] and again["restores"] == [4]
    assert again["test"]["accuracy"] == m["test"]["accuracy"]
