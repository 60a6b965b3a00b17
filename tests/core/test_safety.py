"""Data safety (issue 14): outputs never overlap inputs, --overwrite is a checked request, demo
defaults never fill a named output, checkpoints are never unpickled as code, and scoring runs
only the model it was told to. None of these tests starts Ray: every refusal comes first."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import types

import pytest

from braintumor_ray import ConfigError, MRIPreprocess, StorageError, make_sample_dataset
from braintumor_ray.core import BraintumorError, check_disjoint
from braintumor_ray.models import (
    ONNX_FILE,
    PACKAGE_JSON,
    WEIGHTS_FILE,
    create_model,
    export_model_package,
    load_model_package,
    verify_package,
)
from braintumor_ray.score import ScoreConfig, run_scoring

from conftest import load_job, upload_tree

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_job = load_job  # a job module from jobs/, imported as users run it (its main returns the exit code)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def _tree(root: str) -> dict[str, str]:
    """Every file under a local folder -> sha256 of its bytes."""
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# --- 1. input and output must not overlap ---------------------------------------------------------

# (input, output, siblings?, refused?) -- "{t}" is a fresh tmp folder with real/ and link -> real.
OVERLAP = [
    ("/a", "/a/preds", False, True),
    ("./a", "a", False, True),
    ("s3://x", "s3a://x/", False, True),
    ("s3://b/raw", "s3://b", False, True),  # the output holds the input (issue 14's --overwrite case)
    ("s3://b/raw", "s3://b/tmp/../raw/preds", False, True),
    ("{t}/data/raw/../raw", "{t}/data/raw/preds", False, True),
    ("file://{t}/a", "{t}/a/p", False, True),
    ("{t}/link", "{t}/real/preds", False, True),  # the input is a link to a folder holding the output
    ("{t}/real", "{t}/link/new/preds", False, True),  # an output that does not exist yet, below a link
    ("s3://b/preds_series", "s3://b/preds", True, True),  # OUTPUT_series is the input
    ("s3://b/preds._staging/x", "s3://b/preds", True, True),  # OUTPUT._staging holds the input
    # Look-alikes that must pass: components, not characters; other buckets, filesystems, names.
    ("/a/pre", "/a/prefix", False, False),
    ("/a/prefix", "/a/pre", False, False),
    ("s3://b/raw", "s3://b/raw2", True, False),
    ("s3://x/a", "s3://y/a", True, False),
    ("/data/x", "s3://data/x/preds", True, False),
    ("{t}/link", "{t}/other/preds", True, False),
    ("s3://b/archive", "s3://b/preds-old", True, False),
]


@pytest.mark.parametrize("inp, out, siblings, refused", OVERLAP, ids=[f"{i}->{o}" for i, o, _, _ in OVERLAP])
def test_overlapping_input_and_output_are_refused_after_normalising(tmp_path, monkeypatch, inp, out, siblings, refused):
    (tmp_path / "real").mkdir()
    (tmp_path / "data" / "raw").mkdir(parents=True)
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    inp, out = inp.format(t=tmp_path), out.format(t=tmp_path)
    sib = ("_series", "_explain", "._staging") if siblings else ()
    if refused:
        with pytest.raises(ConfigError) as e:
            check_disjoint(inp, out, siblings=sib)
        assert inp in str(e.value) and out in str(e.value) and "outside the input" in str(e.value)
        # Scoring's own check (the old one compared the two strings only).
        with pytest.raises(ConfigError, match="outside the input"):
            ScoreConfig(model="m", input=inp, output=out)
    else:
        check_disjoint(inp, out, siblings=sib)
        assert ScoreConfig(model="m", input=inp, output=out).output == out


def test_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="lies inside"):
        check_disjoint("~/archive", str(tmp_path / "archive" / "preds"))


def test_training_run_folder_inside_its_data_is_refused(tmp_path, capsys):
    data = tmp_path / "pre"
    data.mkdir()
    (data / "report.json").write_text("{}")
    before = _tree(str(data))
    assert _job("train").main(["--data", str(data), "--storage", str(data), "--name", "r1"]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "lies inside the data" in err and str(data) in err, err
    assert _tree(str(data)) == before


# --- 2. --overwrite is a checked request; demo defaults never fill a named output ------------------


def _raw(root) -> str:
    make_sample_dataset(str(root), per_class=2, test_per_class=1, leaks=0, size=64)
    return str(root)


def test_overwrite_of_the_inputs_parent_is_refused_locally(tmp_path, capsys):
    raw = _raw(tmp_path / "data" / "raw")
    (tmp_path / "data" / "keep.txt").write_text("someone's notes")
    before = _tree(str(tmp_path / "data"))
    code = _job("preprocess").main(["--input", raw, "--output", str(tmp_path / "data") + "/", "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and len(_error_lines(err)) == 1 and "contains the input" in err, err
    assert _tree(str(tmp_path / "data")) == before  # nothing deleted, nothing written


def test_overwrite_of_the_inputs_parent_is_refused_on_s3(tmp_path, s3_endpoint, s3_bucket, capsys):
    import boto3

    upload_tree(_raw(tmp_path / "raw"), s3_endpoint, s3_bucket, "raw")
    client = boto3.client("s3", endpoint_url=s3_endpoint)

    def keys():
        return sorted((o["Key"], o["ETag"]) for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", []))

    before = keys()
    assert len(before) > 8
    for output in (f"s3://{s3_bucket}", f"s3a://{s3_bucket}/raw/../"):
        args = ["--input", f"s3://{s3_bucket}/raw", "--output", output, "--overwrite", "--s3-endpoint-url", s3_endpoint]
        assert _job("preprocess").main(args) == 2
        err = capsys.readouterr().err
        assert len(_error_lines(err)) == 1 and "contains the input" in err, err
        assert keys() == before


def test_overwrite_replaces_only_an_earlier_ingest_output(tmp_path, capsys):
    raw = _raw(tmp_path / "raw")
    mine = tmp_path / "mine"
    (mine / "scans").mkdir(parents=True)
    (mine / "config.yaml").write_text("input: x\n")  # an ingest's name, but not only ingest files
    (mine / "scans" / "patient.dcm").write_bytes(b"DICM")
    assert _job("preprocess").main(["--input", raw, "--output", str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "scans/patient.dcm" in err and "not an earlier ingest output" in err, err
    assert (mine / "scans" / "patient.dcm").read_bytes() == b"DICM"
    # Files only deep down (a PACS export's patient/study/series/file) make a folder non-empty too.
    deep = tmp_path / "pacs" / "p1" / "s1" / "series1"
    deep.mkdir(parents=True)
    (deep / "1.dcm").write_bytes(b"DICM")
    assert _job("preprocess").main(["--input", raw, "--output", str(tmp_path / "pacs")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert os.listdir(tmp_path / "pacs") == ["p1"]
    # Ingest-shaped files without the ingest's config.yaml or report.json: not recognisable either.
    bare = tmp_path / "bare" / "images" / "split=train"
    bare.mkdir(parents=True)
    (bare / "x.parquet").write_bytes(b"PAR1")
    assert _job("preprocess").main(["--input", raw, "--output", str(tmp_path / "bare"), "--overwrite"]) == 2
    assert "neither config.yaml nor report.json" in capsys.readouterr().err
    assert (bare / "x.parquet").exists()
    # An earlier ingest's output is replaced: it is gone when the (empty) input is found wanting,
    # before Ray would start.
    old = tmp_path / "old"
    (old / "images" / "split=val").mkdir(parents=True)
    for name in ("config.yaml", "report.json", "errors.parquet", "images/split=val/0.parquet"):
        (old / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert _job("preprocess").main(["--input", str(tmp_path / "empty"), "--output", str(old), "--overwrite"]) == 2
    assert "no usable image files" in capsys.readouterr().err
    assert not old.exists()


def test_forgotten_input_never_fills_a_named_output(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "preprocessed"
    out.mkdir()
    (out / "report.json").write_text('{"precious": true}')
    assert _job("preprocess").main(["--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and "give --input" in err and str(out) in err, err
    assert (out / "report.json").read_text() == '{"precious": true}' and os.listdir(out) == ["report.json"]
    assert not (tmp_path / "demo").exists()
    # Training and search alike: a named --storage with no --data is refused, no demo run in it.
    for job in ("train", "tune"):
        assert _job(job).main(["--storage", str(tmp_path / "runs")]) == 2
        assert "give --data" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "demo").exists()


# --- 3. checkpoints are data, never code ------------------------------------------------------------


class _RunsCode:
    """Unpickling this creates a folder: what a planted checkpoint would do (or worse)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


class _Checkpoint:
    """The two things the restore paths use of a ray.train.Checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    import torch

    from braintumor_ray.train import TrainConfig
    from braintumor_ray.train._loop import STATE_FILE, _WorkerRunner
    from braintumor_ray.train._run import best_model

    marker = str(tmp_path / "pwned")
    ckpt = tmp_path / "runs" / "r1" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    state = {"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "best_model": None, "x": _RunsCode(marker)}
    torch.save(state, ckpt / STATE_FILE)
    # The payload is live: a full unpickle of a copy runs it.
    live = tmp_path / "live.pt"
    torch.save({"x": _RunsCode(str(tmp_path / "live-marker"))}, live)
    torch.load(live, weights_only=False)
    assert os.path.isdir(tmp_path / "live-marker")

    worker = types.SimpleNamespace(rank=0)  # fails before it touches a model
    for restore in (lambda: _WorkerRunner.load_checkpoint(worker, _Checkpoint(str(ckpt))),
                    lambda: best_model(TrainConfig(), _Checkpoint(str(ckpt)))):
        with pytest.raises(StorageError, match=rf"refusing to load the checkpoint {ckpt}/{STATE_FILE}.*could run code"):
            restore()
        assert not os.path.exists(marker)


# --- 4. the model that scores is the model that was asked for --------------------------------------


@pytest.fixture
def archive(tmp_path):
    root = str(tmp_path / "archive")
    make_sample_dataset(root, per_class=1, test_per_class=0, leaks=0, size=64)
    return root


def _meta(pkg: str) -> dict:
    return json.loads(open(os.path.join(pkg, PACKAGE_JSON)).read())


def test_expect_model_id_refuses_any_other_package(package, archive, tmp_path, capsys):
    real = _meta(package)["model_id"]
    other = "0123456789abcdef"
    out = str(tmp_path / "preds")
    with pytest.raises(ConfigError) as e:
        run_scoring(ScoreConfig(model=package, input=archive, output=out, expect_model_id=other))
    assert real in str(e.value) and other in str(e.value)
    assert not os.path.exists(out)
    assert _job("score").main(["--model", package, "--input", archive, "--output", out, "--expect-model-id", other]) == 2
    err = capsys.readouterr().err
    assert len(_error_lines(err)) == 1 and f"is model {real}, not the expected {other}" in err, err
    assert verify_package(package, expect_model_id=real.upper()).model_id == real
    with pytest.raises(ConfigError, match="not a model id"):
        ScoreConfig(model=package, input=archive, output=out, expect_model_id="latest")


def test_swapped_weights_under_an_untouched_model_json_are_refused(package, archive, tmp_path):
    import torch
    from safetensors.torch import save_file

    swapped = str(tmp_path / "swapped")
    shutil.copytree(package, swapped)
    torch.manual_seed(1)
    other = create_model("resnet10t", pretrained=False, drop_rate=0.0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, os.path.join(swapped, WEIGHTS_FILE))
    with pytest.raises(ConfigError, match=r"swapped/model\.safetensors does not match"):
        load_model_package(swapped)
    # Scoring checks it before any work, also where its engine (ONNX Runtime) never reads the weights.
    out = str(tmp_path / "preds")
    with pytest.raises(ConfigError, match=r"swapped/model\.safetensors does not match"):
        run_scoring(ScoreConfig(model=swapped, input=archive, output=out))
    assert not os.path.exists(out)


def test_another_models_onnx_is_refused_before_any_work(package, archive, tmp_path):
    """model.onnx's hash is part of model_id (issue 25): another network's file, its hash
    rewritten beside it, makes model.json read as edited, when the package is verified and when
    scoring is asked to run it, pinned or not."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    swapped = str(tmp_path / "onnx-swapped")
    shutil.copytree(package, swapped)
    proto = onnx.load(os.path.join(swapped, ONNX_FILE))
    head = next(t for t in proto.graph.initializer if len(t.dims) == 2 and t.dims[0] == 4)  # the classifier
    head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head).astype(np.float32), head.name))
    blob = proto.SerializeToString()
    open(os.path.join(swapped, ONNX_FILE), "wb").write(blob)
    meta = _meta(swapped)
    meta["onnx_sha256"] = hashlib.sha256(blob).hexdigest()  # the hash beside it, rewritten
    open(os.path.join(swapped, PACKAGE_JSON), "w").write(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"onnx-swapped/model\.json was edited after export"):
        verify_package(swapped)
    out = str(tmp_path / "preds")
    for pin in (None, meta["model_id"]):
        with pytest.raises(ConfigError, match=r"onnx-swapped/model\.json was edited after export"):
            run_scoring(ScoreConfig(model=swapped, input=archive, output=out, expect_model_id=pin))
    assert not os.path.exists(out)


def test_unknown_preprocessing_keys_in_a_package_are_an_error(tmp_path, archive, monkeypatch):
    """A package from a newer version (its model_id computed with the new key) is refused, not
    scored with other preprocessing."""
    import torch

    real = MRIPreprocess.to_dict
    monkeypatch.setattr(MRIPreprocess, "to_dict", lambda self: real(self) | {"gamma": 0.8})
    torch.manual_seed(0)
    pkg = str(tmp_path / "newer")
    export_model_package(create_model("resnet10t", pretrained=False), pkg, preprocess=MRIPreprocess(image_size=64),
                         onnx=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"newer/model\.json: unknown MRIPreprocess setting preprocess\.gamma"):
        load_model_package(pkg)
    with pytest.raises(BraintumorError, match=r"preprocess\.gamma"):
        run_scoring(ScoreConfig(model=pkg, input=archive, output=str(tmp_path / "preds")))
    assert not os.path.exists(tmp_path / "preds")


def test_calibration_out_of_range_is_refused_even_under_a_recomputed_id(trusted_package, tmp_path):
    """Issue 35: the model id covers the calibration, but an id can be recomputed after an edit:
    a negative temperature is still refused when the package is verified, one line naming the key."""
    from braintumor_ray.models import package_model_id as _identity

    edited = str(tmp_path / "edited")
    shutil.copytree(trusted_package, edited)
    meta = json.load(open(os.path.join(edited, PACKAGE_JSON)))
    assert verify_package(edited).model_id == meta["model_id"]
    meta["trust"]["temperature"] = -meta["trust"]["temperature"]
    meta["model_id"] = _identity(meta)
    with open(os.path.join(edited, PACKAGE_JSON), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ConfigError) as e:
        verify_package(edited)
    msg = str(e.value)
    assert "edited/model.json: trust.temperature = -" in msg and "export the package again" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="trust.temperature"):
        load_model_package(edited)
