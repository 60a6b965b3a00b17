"""jobs/tune.py as users run it: submitted with `ray job submit` to a head started with `ray start`,
and a search whose driver is killed, then resumed without running finished trials again."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from _net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(ROOT, "jobs", "tune.py")
BIN = os.path.dirname(sys.executable)

pytestmark = pytest.mark.timeout(900)

NO_AGENT_YET = "No available agent to submit job"  # Ray's job server, while its agent is not up


def _no_onnx() -> str:
    # The smoke preset's fixed settings and no model.onnx (an export costs ~5 s; tests/end_to_end/test_train_job.py
    # checks the default); --fixed replaces the preset's mapping whole, so it is given in full.
    from braintumor_ray.tune import SearchConfig

    return json.dumps(dict(SearchConfig.SMOKE["fixed"], onnx=False))


def _env(home) -> dict[str, str]:
    # A temporary HOME: `ray start` writes its auth token to ~/.ray/auth_token, and `ray job
    # submit` reads it from there; a stray token in the real HOME must not leak in.
    env = dict(os.environ, HOME=str(home), RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONPATH=ROOT,
               PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)
    return env


def _own_ray(env: dict[str, str]) -> dict[str, str]:
    # A driver that must start its own Ray says so: with no address, ray.init() joins the latest
    # `ray start` cluster on the machine (/tmp/ray/ray_current_cluster), which a developer's or
    # another run's may be (seen here: a killed driver that joined another's head and failed on
    # its token).
    return dict(env, RAY_ADDRESS="local")


STARTED = "Ray runtime started."  # what `ray start` prints once its node has registered
# Ray's own 30 s wait for the head's raylet to register (hard-coded in ray._private.node); seen
# running out once when two suites shared this 2-core machine (CI of 6d7e027).
SLOW_START = "timed out during startup"


def _wait_for_head(address: str, proc, log_path, timeout: float = 300) -> None:
    """Until the head says it started and its dashboard answers: the dashboard alone answers before
    the raylet has registered, and a head that then times out takes the dashboard down with it."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ray start --head exited with {proc.returncode}")
        if STARTED in log_path.read_text(errors="replace"):
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return  # it answers (a token-protected endpoint says 401)
            except OSError:
                pass
        time.sleep(1)
    raise AssertionError(f"no started head with a dashboard at {address} after {timeout} s")


def _start_head(env: dict[str, str], log_path):
    """`ray start --head --block` on free ports, in a process group of its own; returns (process,
    dashboard address, temp dir) once it has started, or raises with the head's log."""
    port, dash = free_port(), free_port()
    # The agents' ports too: the dashboard agent's default (52365) belongs to the first Ray on the
    # machine that has a dashboard (the session's, see conftest.py), and a head whose agent cannot
    # bind it refuses every submission ("No available agent to submit job").
    agents = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
              f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    # Short: Ray's socket paths live under it and must stay under 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [os.path.join(BIN, "ray"), "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", *agents, "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
             "--disable-usage-stats", f"--temp-dir={temp_dir}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_head(address, head, log_path)
    except AssertionError as e:
        _kill_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise AssertionError(f"{e}\n{log_path.read_text(errors='replace')[-3000:]}") from None
    return head, address, temp_dir


@pytest.fixture
def ray_head(tmp_path):
    """A head started as the runbook does, with the dashboard (what `ray job submit` talks to); the
    fixture kills its process group afterwards: `ray stop` would stop every Ray on the machine."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
    # Token auth on, as the docs tell users: a token in ~/.ray/auth_token and RAY_AUTH_MODE=token
    # for both the head and the `ray job submit` client.
    gen = subprocess.run([os.path.join(BIN, "ray"), "get-auth-token", "--generate"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0 and (home / ".ray" / "auth_token").exists(), gen.stdout + gen.stderr
    env["RAY_AUTH_MODE"] = "token"
    try:
        head, address, temp_dir = _start_head(env, tmp_path / "head.log")
    except AssertionError as e:
        # Only Ray's start-up timeout earns a second start (a loaded machine, not a fault of ours).
        if SLOW_START not in str(e):
            raise
        head, address, temp_dir = _start_head(env, tmp_path / "head2.log")
    try:
        yield {"env": env, "address": address, "home": home}
    finally:
        _kill_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_group(proc) -> None:
    # `ray start --block` took more than 20 s to stop on SIGTERM here (the suite's slowest teardown),
    # and then got SIGKILL anyway: the head's processes are all in this group, and its temp dir goes.
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 20)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def test_ray_job_submit_smoke_search(ray_head, train_data_dir, tmp_path):
    """The smoke search submitted as the runbook does. It proves the submission and the job's
    wiring, not the search (tests/tune/test_tune.py does that): one backbone, one epoch, so one trial,
    on the session's ingested sample (read only; the job's demo-data path is proven by
    tests/end_to_end/test_train_job.py and scripts/demo.sh)."""
    storage = tmp_path / "runs"
    submit = [os.path.join(BIN, "ray"), "job", "submit", "--address", ray_head["address"], "--working-dir", ROOT,
              "--", "python", "jobs/tune.py", "--smoke-test", "--data", train_data_dir, "--storage", str(storage),
              "--name", "e2e", "--models", "resnet10t", "--max-epochs", "1", "--fixed", _no_onnx()]
    deadline = time.time() + 120
    while True:
        p = subprocess.run(submit, env=ray_head["env"], capture_output=True, text=True, timeout=600, cwd=ROOT)
        out = p.stdout + p.stderr
        # The dashboard answers before the head's job agent has registered with it (seen on a loaded
        # machine); until then the job server refuses the submission, and nothing was submitted.
        if p.returncode == 0 or NO_AGENT_YET not in out or time.time() > deadline:
            break
        time.sleep(2)
    assert p.returncode == 0, out[-4000:]
    assert "succeeded" in out
    # The job's logs (streamed back by `ray job submit`) end with the leaderboard.
    assert "| rank | trial | backbone |" in out and "best: " in out
    assert (storage / "e2e" / "leaderboard.md").exists()
    assert (storage / "e2e" / "best_model" / "model.json").exists()
    assert len(json.loads((storage / "e2e" / "best.json").read_text())["best_trial"]) > 3
    # The search's effective settings, as `jobs/tune.py --config` takes them back.
    from braintumor_ray.core import load_config
    from braintumor_ray.tune import SearchConfig

    saved = load_config(SearchConfig, str(storage / "e2e" / "config.yaml"))
    assert (saved.name, saved.models, saved.storage, saved.max_epochs) == ("e2e", ("resnet10t",), str(storage), 1)
    assert saved.space == SearchConfig.SMOKE["space"]  # the smoke preset under the options given
    assert saved.fixed["onnx"] is False and not (storage / "e2e" / "best_model" / "model.onnx").exists()


def _trial_results(search_dir) -> dict[str, list[dict]]:
    out = {}
    for f in glob.glob(os.path.join(search_dir, "trial_*", "result.json")):
        with open(f) as fh:
            out[os.path.basename(os.path.dirname(f))] = [json.loads(line) for line in fh if line.strip()]
    return out


def _finished(rows: list[dict], max_epochs: int) -> bool:
    return any(r.get("epoch") == max_epochs for r in rows)


@pytest.mark.ray
def test_killed_driver_then_resume_runs_only_unfinished_trials(train_data_dir, tmp_path, monkeypatch, caplog):
    """The session's ingested sample (read only) instead of the embedded demo data: the job's
    demo-data path is proven by tests/end_to_end/test_train_job.py and scripts/demo.sh. The killed driver is
    a real process with its own Ray; the resume is the job's ``main`` on the session's Ray (what
    it proves is the resume from the dead driver's files, not a second Ray start-up: ~20 s)."""
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
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
