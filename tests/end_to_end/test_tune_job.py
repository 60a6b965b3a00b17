"""jobs/tune.py as users run it: a search whose driver is killed, then resumed without running
finished trials again, and its clear errors. (`ray job submit` to a head started with `ray start`:
tests/end_to_end/test_train_job.py.)"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fixtures.ray_head import job_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(ROOT, "jobs", "tune.py")

pytestmark = pytest.mark.timeout(900)


def _no_onnx() -> str:
    # The smoke preset's fixed settings and no model.onnx (an export costs ~5 s; tests/end_to_end/test_train_job.py
    # checks the default); --fixed replaces the preset's mapping whole, so it is given in full.
    from braintumor_ray.tune import SearchConfig

    return json.dumps(dict(SearchConfig.SMOKE["fixed"], onnx=False))


def _own_ray(env: dict[str, str]) -> dict[str, str]:
    # A driver that must start its own Ray says so: with no address, ray.init() joins the latest
    # `ray start` cluster on the machine (/tmp/ray/ray_current_cluster), which a developer's or
    # another run's may be (seen here: a killed driver that joined another's head and failed on
    # its token).
    return dict(env, RAY_ADDRESS="local")


def _trial_results(search_dir) -> dict[str, list[dict]]:
    out = {}
    for f in glob.glob(os.path.join(search_dir, "trial_*", "result.json")):
        with open(f) as fh:
            out[os.path.basename(os.path.dirname(f))] = [json.loads(line) for line in fh if line.strip()]
    return out


def _finished(rows: list[dict], max_epochs: int) -> bool:
    return any(r.get("epoch") == max_epochs for r in rows)


@pytest.mark.ray
def test_killed_driver_then_resume_runs_only_unfinished_trials(train_data_dir, tmp_path, monkeypatch, caplog, capsys):
    """The session's ingested sample (read only) instead of the embedded demo data: the job's
    demo-data path is proven by tests/end_to_end/test_train_job.py and scripts/demo.sh. The killed driver is
    a real process with its own Ray; the resume is the job's ``main`` on the session's Ray (what
    it proves is the resume from the dead driver's files, not a second Ray start-up: ~20 s)."""
    home = tmp_path / "home"
    home.mkdir()
    env = job_env(home, ROOT)
    storage, name, epochs = tmp_path / "runs", "killed", 1
    args = [sys.executable, JOB, "--smoke-test", "--data", train_data_dir, "--storage", str(storage), "--name", name,
            "--num-samples", "2", "--models", "resnet10t", "--max-epochs", str(epochs),
            "--max-concurrent-trials", "1", "--grace-period", str(epochs), "--fixed", _no_onnx()]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, cwd=tmp_path, env=_own_ray(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    search = storage / name
    deadline = time.time() + 480
    try:
        # Kill the driver (and the local Ray it started) once one trial has finished.
        while time.time() < deadline and first.poll() is None:
            done = [t for t, rows in _trial_results(search).items() if _finished(rows, epochs)]
            if done:
                # At once: Tune's saved state then usually predates the trial's end, and the resumed
                # search starts that trial again (its result must survive that, see below).
                break
            time.sleep(0.5)
        assert first.poll() is None, "the search ended before it could be interrupted:\n" + open(tmp_path / "first.log").read()[-3000:]
        assert done, "no trial finished in time:\n" + open(tmp_path / "first.log").read()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started, at once
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        log.close()
    before = _trial_results(search)
    assert not (search / "leaderboard.md").exists()

    from conftest import load_job

    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="braintumor_ray")
    assert load_job("tune").main(["--storage", str(storage), "--name", name, "--resume"]) == 0
    after = _trial_results(search)
    assert len(after) == 2 and all(_finished(rows, epochs) for rows in after.values()), after
    for t in done:  # a finished trial was not trained again
        if len(after[t]) != len(before[t]):
            # Tune's state, saved every few seconds, may predate the trial's end: Tune then starts it
            # again, and it restores its final checkpoint and reports that epoch's result once more.
            assert [r["epoch"] for r in after[t]] == [epochs], (t, before[t], after[t])
            assert after[t][0]["val_macro_f1"] == before[t][-1]["val_macro_f1"], (t, before[t], after[t])
    rows = (search / "leaderboard.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and (search / "best_model" / "model.json").exists()
    assert "resuming search" in caplog.text
    # The job's output ends with the leaderboard; its files are the search's.
    out = capsys.readouterr().out
    assert "| rank | trial | backbone |" in out and "best: " in out
    assert (search / "leaderboard.md").exists()
    assert len(json.loads((search / "best.json").read_text())["best_trial"]) > 3
    # The search's effective settings, as `jobs/tune.py --config` takes them back.
    from braintumor_ray.core import load_config
    from braintumor_ray.tune import SearchConfig

    saved = load_config(SearchConfig, str(search / "config.yaml"))
    assert (saved.name, saved.models, saved.storage, saved.max_epochs) == (name, ("resnet10t",), str(storage), epochs)
    assert saved.space == SearchConfig.SMOKE["space"]  # the smoke preset under the options given
    assert saved.fixed["onnx"] is False and not (search / "best_model" / "model.onnx").exists()


def test_bad_options_are_clear_errors(tmp_path, capsys):
    from conftest import load_job

    job = load_job("tune")
    assert job.main(["--data", str(tmp_path / "nothing"), "--models", "resnet50,resnet50", "--storage", str(tmp_path)]) == 2
    assert "twice" in capsys.readouterr().err
    assert job.main(["--resume", "--storage", str(tmp_path), "--name", "never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no search" in err and "Traceback" not in err
    (tmp_path / "notdata").mkdir()
    assert job.main(["--data", str(tmp_path / "notdata"), "--storage", str(tmp_path / "r"), "--name", "x"]) == 2
    assert "report.json" in capsys.readouterr().err
