"""Ray Train fine-tuning: the worker function under TorchTrainer (2 CPU workers) and fault
tolerance (the 1-worker run on s3:// storage is in tests/tracking/test_mlflow.py, trained once for both). Tiny random-init models on generated 64 px data."""

from __future__ import annotations

import os

import pytest

from conftest import TRAIN_FAILING_RUN as FAILING_RUN  # the run the session's failure hook is armed for

pytestmark = [pytest.mark.timeout(600), pytest.mark.ray]


@pytest.fixture(scope="module")
def train_data(train_data_dir):
    """Through Ray Data (the path of outputs over DIRECT_READ_MAX_BYTES): every other test loads
    the small sample by the driver's direct read, so this module's training proves the other path."""
    from braintumor_ray.train import load_train_data

    return load_train_data(train_data_dir, direct_read_max_bytes=0)


def _rows(data) -> dict:
    import collections
    import hashlib

    return {split: collections.Counter((int(r["label"]), bool(r["leaked"]), r["image"].shape,
                                        hashlib.sha256(r["image"].tobytes()).hexdigest()) for r in ds.iter_rows())
            for split, ds in data.datasets.items()}


def test_the_direct_read_and_ray_data_load_the_same_rows(train_data, train_data_dir):
    """Small outputs are read by the driver, large ones by Ray Data: the same rows, schema, counts
    and class counts either way, and the training split shuffled (the ingest writes it by class)."""
    from braintumor_ray.train import load_train_data

    direct = load_train_data(train_data_dir)
    assert direct.counts == train_data.counts and direct.class_counts == train_data.class_counts
    assert direct.datasets["train"].schema() == train_data.datasets["train"].schema()
    assert _rows(direct) == _rows(train_data)
    labels = [int(r["label"]) for r in direct.datasets["train"].iter_rows()]
    assert labels != sorted(labels)
    assert labels == [int(r["label"]) for r in load_train_data(train_data_dir).datasets["train"].iter_rows()]  # seeded


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
    """Rank 1 raises once in epoch 2 of 5: Ray Train restarts the group from the epoch-1 checkpoint,
    the weight average (EMA) included: it has seen every optimizer step of the five epochs once."""
    import math

    import torch

    from braintumor_ray.train import STATE_FILE, build_trainer, read_checkpoint_state

    marker = failure_marker  # the hook is armed by conftest's ray_session
    cfg = _cfg(tmp_path, epochs=5, num_workers=2, ema_decay=0.5)  # a short average: the tiny task still ends learnt
    result = build_trainer(cfg, data=train_data).fit()
    with result.checkpoint.as_directory() as d:
        state = read_checkpoint_state(os.path.join(d, STATE_FILE))
    per_epoch = math.ceil(math.ceil(train_data.counts["train"] // 2 / cfg.batch_size) / cfg.grad_accum_steps)
    assert state["ema_steps"] == 5 * per_epoch
    assert state["ema"].keys() == state["model"].keys()
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"] if "weight" in k)
    out = result.return_value
    assert os.path.exists(marker), "the failure hook never fired"
    assert out["world_size"] == 2
    assert out["restores"] == [1], out["restores"]  # resumed from the epoch-1 checkpoint, not from zero
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4, 5]
    # EMA's effect is measured paired: each epoch validates the raw weights too.
    assert all(0 <= h["val_raw_macro_f1"] <= 1 and "val_raw_accuracy" in h for h in out["history"])
    _learned(out)
    # Every test image was scored once, although each worker only scored its own batches.
    assert out["test"]["n"] == train_data.counts["test"]
    assert out["test_clean"]["n"] < out["test"]["n"]


# The one-worker run on s3:// storage with --resume is trained once for this and the MLflow tests:
# tests/tracking/test_mlflow.py::test_one_worker_learns_with_s3_storage_and_resume.


def test_files_beside_the_parquet_are_not_read(train_data, train_data_dir, tmp_path):
    """A copied ingest output may carry a Finder or checksum file in a split folder: the listing
    both paths read keeps the Parquet files only, as Ray's reader does with a folder (the direct
    read is checked: the Ray Data path costs ~10 s more and reads the same list)."""
    import shutil

    from braintumor_ray.train import load_train_data

    copy = tmp_path / "pre"
    shutil.copytree(train_data_dir, copy)
    (copy / "images" / "split=train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (copy / "images" / "split=val" / "part-0.parquet.crc").write_bytes(b"crc")
    data = load_train_data(str(copy))
    assert data.counts == train_data.counts and data.class_counts == train_data.class_counts
