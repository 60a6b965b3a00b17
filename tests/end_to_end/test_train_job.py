"""jobs/train.py as users run it: the embedded default submitted to a Ray head end to end, and clear errors."""

from __future__ import annotations

import json

import pytest


pytestmark = pytest.mark.timeout(600)


def test_smoke_training_submitted_to_a_head_end_to_end(ray_head, tmp_path, monkeypatch):
    """The embedded default (a generated sample, a tiny model) submitted as the runbook submits jobs:
    `ray job submit --working-dir .` to a head started with `ray start`, token auth on. The sample
    is written under the job's working directory on the head (./demo); the run goes to --storage."""
    code, out = ray_head["submit"](["python", "jobs/train.py", "--smoke-test", "--name", "smoke", "--epochs", "2",
                                    "--conformal-alpha", "0.2", "--storage", str(tmp_path / "runs")])
    assert code == 0, out[-4000:]
    assert "succeeded" in out
    run = tmp_path / "runs" / "smoke"
    m = json.loads((run / "metrics.json").read_text())
    assert len(m["epochs"]) == 2 and 0 <= m["test"]["accuracy"] <= 1 and "test_clean" in m
    assert (run / "model" / "model.json").exists() and (run / "curves.png").exists()
    # model.onnx by default (the tests that train for other reasons pass onnx=False: ~5 s an export).
    assert (run / "model" / "model.onnx").exists() and json.loads((run / "model" / "model.json").read_text())["onnx_in_id"]
    assert "test_clean" in out and "macro-F1" in out  # the final table
    assert "epoch 2/2" in out  # one line per epoch, from the rank-0 worker
    # Fitted after training: calibration and review flags, on val; test and test_clean report.
    t = m["trust"]
    assert t["temperature"] > 0 and t["ood_detector"] == "mahalanobis" and 0 <= t["review_threshold"] <= 1
    for split in ("val", "test", "test_clean"):
        assert {"ece_before", "ece_after", "nll_before", "nll_after", "flagged"} <= set(t[split]), split
    assert t["val"]["nll_after"] <= t["val"]["nll_before"] + 1e-9  # T minimises validation NLL
    assert (run / "reliability.png").exists() and (run / "model" / "trust.safetensors").exists()
    assert json.loads((run / "model" / "model.json").read_text())["trust"]["temperature"] == t["temperature"]
    assert "calibration: temperature" in out
    # The prediction sets (issue 28): class-conditional, at the alpha asked for, in the package (so in its id).
    conformal = json.loads((run / "model" / "model.json").read_text())["trust"]["conformal"]
    assert conformal["alpha"] == 0.2 and conformal["class_conditional"] and len(conformal["thresholds"]) == 4
    assert t["conformal"]["rows"] == sum(conformal["counts"]) and "coverage" in t["test"]["conformal"]
    assert "prediction sets (alpha 0.2" in out and 'id="sets"' in (run / "report.html").read_text()
    # The run's HTML report, with the validation grid's scans and heat maps embedded.
    report = (run / "report.html").read_text()
    assert m["report"] == str(run / "report.html") and f"report: {run / 'report.html'}" in out
    assert 'id="examples"' in report and report.count("data:image/png;base64,") >= 2 + 2 * 4

    # The run's saved config.yaml, fed back through the job's --config, is the TrainConfig it ran.
    from braintumor_ray.train import TrainConfig

    job = _load_job()
    ran = []
    monkeypatch.setattr(job, "run_training", lambda cfg, **kw: ran.append(cfg) or {})
    monkeypatch.setattr(job, "format_table", lambda metrics: "")
    assert job.main(["--config", str(run / "config.yaml")]) == 0
    assert ran == [TrainConfig.from_dict(m["run"]["config"])] and ran[0].name == "smoke" and ran[0].epochs == 2
    # Without --storage, the embedded default's run goes under ./demo/runs, beside its sample.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job, "join_ray", lambda address: None)
    monkeypatch.setattr(job, "demo_data", lambda small: "demo/pre")
    ran.clear()
    assert job.main(["--smoke-test", "--name", "d"]) == 0
    assert ran[0].storage == str(tmp_path / "demo" / "runs") and ran[0].data == "demo/pre"


def _load_job():
    from conftest import load_job

    return load_job("train")


def test_bad_data_is_a_clear_error(tmp_path, capsys):
    job = _load_job()
    (tmp_path / "notdata").mkdir()
    assert job.main(["--data", str(tmp_path / "notdata"), "--storage", str(tmp_path / "runs"), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "report.json" in err and "Traceback" not in err
    assert job.main(["--data", str(tmp_path / "missing"), "--name", "x", "--epochs", "0"]) == 2
    assert "epochs=0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_config_validation():
    from braintumor_ray import ConfigError
    from braintumor_ray.train import TrainConfig

    cfg = TrainConfig()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (dict(transfer="half"), dict(lr=0), dict(name="a/b"), dict(epochs=0), dict(amp=True),
                dict(backbone_lr_scale=2), dict(augment_strength=-1), dict(warmup_epochs=99)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({"learning_rate": 1})


def test_metrics_against_hand_counts():
    import numpy as np

    from braintumor_ray.train import classification_metrics, roc_auc

    labels = np.array([0, 0, 1, 1, 2, 3])
    probs = np.eye(4)[[0, 1, 1, 1, 2, 2]] * 0.9 + 0.025
    m = classification_metrics(labels, probs, ["a", "b", "c", "d"])
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3) and m["per_class"]["a"]["recall"] == 0.5
    # F1: a 2/3, b 0.8, c 2/3, d 0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 2 / 3 + 0) / 4)
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_augment_keeps_uint8_and_black_background():
    import torch

    from braintumor_ray.imaging import TrainAugment

    x = torch.zeros((3, 32, 32), dtype=torch.uint8)
    x[:, 8:24, 8:24] = 200
    g = torch.Generator().manual_seed(0)
    y = TrainAugment()(x, generator=g)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert int(y[:, 0, 0].max()) == 0  # corners stay black
    assert torch.equal(TrainAugment.none()(x), x) and TrainAugment().scaled(0).is_identity
