"""jobs/preprocess.py as users run it: real arguments, exit codes, messages; the end-to-end run and
the S3 errors in a subprocess, the other error paths through main(args) in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import load_job

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOB = os.path.join(REPO, "jobs", "preprocess.py")


def run_job(args, cwd, env=None, timeout=300):
    e = dict(os.environ, HOME=str(cwd), RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ADDRESS="local")  # its own Ray
    e.update(env or {})
    return subprocess.run([sys.executable, JOB, *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.mark.ray
def test_embedded_default_runs_end_to_end(tmp_path):
    r = run_job([], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.load(open(tmp_path / "demo" / "preprocessed" / "report.json"))
    assert report["counts"]["errors"] == 0 and report["counts"]["images_ok"] > 0
    assert report["leakage"]["test"]["exact"] >= 4  # the sample plants copies of training images
    assert "have a twin in training" in r.stdout and "train" in r.stdout


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [line for line in r.stderr.splitlines() if line.startswith("error: ")], r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def main_in_process(args, capsys):
    """The job's main(args) in this process (a subprocess costs ~10 s of imports here): its exit
    code and stderr, shaped like a CompletedProcess. Any exception other than the job's own clear
    error fails the test, as a traceback would."""
    code = load_job("preprocess").main(args)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_missing_input_is_one_clear_error(tmp_path, capsys):
    r = main_in_process(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")], capsys)
    _assert_clean_error(r, "does not exist")


def test_empty_input_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "in" / "Training" / "glioma").mkdir(parents=True)
    (tmp_path / "in" / "Training" / "glioma" / "notes.txt").write_text("x")
    r = main_in_process(["--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")], capsys)
    _assert_clean_error(r, "no usable image files")


def test_unsupported_scheme_is_one_clear_error(tmp_path, capsys):
    _assert_clean_error(main_in_process(["--input", "gs://bucket/x", "--output", str(tmp_path / "o")], capsys),
                        "unsupported URI scheme")


def test_bad_option_is_one_clear_error(tmp_path, capsys):
    r = main_in_process(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--val-fraction", "1.5"], capsys)
    _assert_clean_error(r, "val_fraction")


# The S3 errors stay a subprocess: the credentials come from the environment of a fresh process
# (s3fs caches its filesystems, with the credentials they were made with, for the life of one).
@pytest.mark.parametrize("case", ["no_credentials", "no_bucket"])
def test_s3_problems_are_one_clear_error(tmp_path, s3_endpoint, case):
    env = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    if case == "no_credentials":
        env.update(AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")
    args = ["--input", "s3://bt-missing-bucket/raw", "--output", str(tmp_path / "o"), "--s3-endpoint-url", s3_endpoint]
    r = run_job(args, tmp_path, env=env)
    _assert_clean_error(r, "s3://bt-missing-bucket/raw")
    if case == "no_credentials":
        assert "No AWS credentials were found" in r.stderr
