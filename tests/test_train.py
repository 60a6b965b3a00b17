"""Ray Train fine-tuning: the worker function under TorchTrainer (2 CPU workers) and fault
tolerance (the 1-worker run on s3:// storage is in tests/test_mlflow.py, trained once for both). Tiny random-init models on generated 64 px data."""

from __future__ import annotations

import os

import pytest

from conftest import TRAIN_FAILING_RUN as FAILING_RUN  # the run the session's failure hook is armed for

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


@pytest.fixture(scope="module")
def train_data(train_data_dir):
    from braintumor_ray.train import load_train_data

    return load_train_data(train_data_dir)


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

    marker = failure_marker  # the hook is armed by conftest's ray_session
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


# The one-worker run on s3:// storage with --resume is trained once for this and the MLflow tests:
# tests/test_mlflow.py::test_one_worker_learns_with_s3_storage_and_resume.
