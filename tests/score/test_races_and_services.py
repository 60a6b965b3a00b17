"""Races between the listing and the read, the listing's depth, and the services around a run
(issue 26): a file swapped for a link or another file after it was listed, an S3 object
replaced, a folder chain deeper than Python's recursion limit."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from braintumor_ray import MRIPreprocess
from braintumor_ray.core import ConfigError, load_config, resolve
from braintumor_ray.imaging import InputGuard, encode_png
from braintumor_ray.score import decode_batch

from conftest import mri_like

PRE = MRIPreprocess(image_size=64)


def _decode(source, listed, paths, guard=InputGuard()):
    batch = pa.table({"path": paths, "size": [listed[p][0] for p in paths], "version": [listed[p][1] for p in paths]})
    return {r["path"]: r for r in decode_batch(batch, preprocess=PRE, guard=guard, source=source).to_pylist()}


def test_a_file_swapped_after_the_listing_is_an_error_row_not_read(tmp_path):
    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    px = mri_like(4, seed=3)
    for i, name in enumerate(["good.png", "to_link.png", "replaced.png"]):
        (root / name).write_bytes(encode_png(px[i]))
    (root / "sub").mkdir()
    (root / "sub" / "target.png").write_bytes(encode_png(px[3]))
    os.symlink(root / "sub" / "target.png", root / "inside_link.png")  # listed, read through
    (outside / "secret.png").write_bytes(encode_png(px[3]))
    source = resolve(str(root))
    listed = source.listing().files
    # After the listing: a link to a file outside the input; another file renamed over one.
    os.remove(root / "to_link.png")
    os.symlink(outside / "secret.png", root / "to_link.png")
    (root / "other.tmp").write_bytes(encode_png(px[0]))
    os.replace(root / "other.tmp", root / "replaced.png")
    paths = [str(root / n) for n in ("good.png", "to_link.png", "replaced.png", "inside_link.png")]
    rows = _decode(source, listed, paths)
    assert rows[paths[0]]["status"] == rows[paths[3]]["status"] == "ok"
    for p in paths[1:3]:
        assert rows[p]["status"] == "error" and rows[p]["sha256"] is None, rows[p]
        assert rows[p]["error"].startswith("unreadable: changed since it was listed"), rows[p]
    assert "links outside --input" in rows[paths[1]]["error"]
    # A link retargeted inside the folder, at another file: not the listed inode either.
    os.remove(root / "inside_link.png")
    os.symlink(root / "good.png", root / "inside_link.png")
    assert _decode(source, listed, paths[3:])[paths[3]]["error"].startswith("unreadable: changed since it was listed")


def test_an_s3_object_replaced_after_the_listing_is_an_error_row(s3_endpoint, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    px = mri_like(3, seed=5)
    for i, name in enumerate(["keep.png", "swap.png"]):
        client.put_object(Bucket=s3_bucket, Key=f"arc/{name}", Body=encode_png(px[i]))
    source = resolve(f"s3://{s3_bucket}/arc", s3_endpoint_url=s3_endpoint)
    listed = source.listing().files
    client.put_object(Bucket=s3_bucket, Key="arc/swap.png", Body=encode_png(px[2]))  # a new ETag
    paths = [f"{s3_bucket}/arc/keep.png", f"{s3_bucket}/arc/swap.png"]
    rows = _decode(source, listed, paths)
    assert rows[paths[0]]["status"] == "ok"
    assert rows[paths[1]]["status"] == "error" and "ETag differs" in rows[paths[1]]["error"], rows[paths[1]]
    assert rows[paths[1]]["error"].startswith("unreadable: changed since it was listed")


def _chain(base: str, levels: int) -> str:
    """``levels`` nested folders ``d/d/...`` under ``base``, made through folder fds (no long
    absolute paths, no recursion); returns the deepest folder's path."""
    fd = os.open(base, os.O_RDONLY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            nxt = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    return os.path.join(base, *["d"] * levels)


def _unchain(deepest: str, base: str) -> None:
    # shutil.rmtree (pytest's tmp_path cleanup) recurses once per level, past Python's limit.
    for name in os.listdir(deepest):
        os.remove(os.path.join(deepest, name))
    while os.path.abspath(deepest) != os.path.abspath(base):
        os.rmdir(deepest)
        deepest = os.path.dirname(deepest)


def test_a_folder_chain_deeper_than_the_recursion_limit_is_one_error_row(tmp_path):
    from braintumor_ray.core import MAX_FOLDER_DEPTH, ConfigError
    from braintumor_ray.score import ScoreConfig

    base = str(tmp_path / "in")
    os.mkdir(base)
    (tmp_path / "in" / "top.png").write_bytes(b"x")
    deepest = _chain(base, 1100)
    try:
        with open(os.path.join(deepest, "deep.png"), "wb") as f:
            f.write(b"y")
        listed = resolve(base).listing()  # os.walk: RecursionError, the whole run failed
        folder = os.path.join(base, *["d"] * (MAX_FOLDER_DEPTH + 1))
        assert set(listed.files) == {os.path.join(base, "top.png"), folder}
        assert listed.refused[folder].startswith(f"refused: a folder {MAX_FOLDER_DEPTH + 1} levels below the input")
        assert f"max_folder_depth={MAX_FOLDER_DEPTH}" in listed.refused[folder]
        deep = resolve(base).listing(max_depth=1000)  # a loop: 1,000 levels down, no recursion
        assert os.path.join(base, *["d"] * 1001) in deep.refused and len(deep.files) == 2
    finally:
        _unchain(deepest, base)
    for bad in (0, 1001, True, "3"):
        try:
            ScoreConfig(model="m", input="i", output="o", max_folder_depth=bad)
        except ConfigError as e:
            assert "max_folder_depth" in str(e) and "\n" not in str(e)
        else:
            raise AssertionError(f"max_folder_depth={bad!r} was accepted")


def test_a_deep_chain_on_s3_is_one_error_row(s3_endpoint, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_object(Bucket=s3_bucket, Key="arc/a.png", Body=b"x")
    client.put_object(Bucket=s3_bucket, Key="arc/" + "d/" * 5 + "deep.png", Body=b"y")
    listed = resolve(f"s3://{s3_bucket}/arc", s3_endpoint_url=s3_endpoint).listing(max_depth=3)
    folder = f"{s3_bucket}/arc/d/d/d/d"
    assert set(listed.files) == {f"{s3_bucket}/arc/a.png", folder} and "4 levels below" in listed.refused[folder]


# --- --config YAML: bounded before it is loaded, nested types checked ----------------------------

LAUGHS = "".join(f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + LAUGHS


def test_a_billion_laughs_config_is_refused_quickly_in_one_line(tmp_path, capsys):
    from conftest import load_job

    path = tmp_path / "laughs.yaml"
    path.write_text(f"model: m\ninput: {tmp_path}/in\noutput: {tmp_path}/out\n{LAUGHS}guard: {{modalities: *i}}\n")
    assert len(LAUGHS) < 455  # 9**9 = 387 million strings once expanded
    # Refused by the alias count (the message says so), not by running out of time or memory.
    assert load_job("score").main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "aliases" in err and str(path) in err
    # Aliases within the bound still load (a shared list of names).
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: m\ninput: i\noutput: o\nselect: {modalities: &m [MR]}\nguard: {modalities: *m}\n")
    from braintumor_ray.score import ScoreConfig

    assert load_config(ScoreConfig, str(ok)).guard.modalities == ("MR",)
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="nests more than"):
        load_config(ScoreConfig, str(deep))


@pytest.mark.parametrize("yaml_text,message", [
    ("guard: {modalities: [[MR]]}", "guard.modalities[0]: expected a string, found list"),
    ("batch_size: '32'", "batch_size: expected a whole number, found str"),
    ("batch_size: true", "batch_size: expected a whole number, found bool"),
    ("review_threshold: [0.5]", "review_threshold: expected a number, found list"),
    ("explain: [all]", "explain: found list ['all']: use one of none, flagged, positive, all"),
    ("guard: {follow_links_outside_input: 'yes'}", "guard.follow_links_outside_input: expected true or false"),
    ("select: {modalities: {MR: 1}}", "select.modalities: expected a list, found dict"),
])
def test_a_wrong_nested_type_in_a_config_is_one_line_naming_the_key(tmp_path, yaml_text, message):
    from braintumor_ray.score import ScoreConfig

    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\ninput: i\noutput: o\n{yaml_text}\n")
    with pytest.raises(ConfigError) as e:
        load_config(ScoreConfig, str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


# --- tracking never fails a committed run ---------------------------------------------------------

def _dead_tracking():
    from _net import free_port

    from braintumor_ray.tracking import MLflowConfig

    return MLflowConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="bt-down")  # nothing listens


def test_a_tracking_server_that_is_down_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    import time

    from braintumor_ray.score import ScoreConfig, format_summary
    from braintumor_ray.tracking import _mlflow, finish_training, log_scoring, start_tracking

    monkeypatch.setattr(_mlflow, "RETRY_WAIT_S", 0.0)
    mc = _dead_tracking()
    t0 = time.perf_counter()
    summary = log_scoring(ScoreConfig(model="m", input="i", output="o", mlflow=mc), {"scored": 3, "model_id": "x"})
    assert summary["scored"] == 3 and "mlflow_run_id" not in summary and "Max retries" in summary["mlflow_error"], summary
    # What jobs/score.py prints (then exit 0: log_scoring is the last step after the commit and never raises).
    done = {"input": "i", "output": "o", "model_id": "x", "files_seen": 3, "skipped_already_scored": 0, "errors": 0,
            "wall_s": 1.0, "images_per_s": 3.0}
    assert "MLflow: not logged, the rows are committed" in format_summary(done | summary)
    run = resolve(str(tmp_path / "run"))
    pending = start_tracking(mc, run, stage="train", name="r", params={"lr": 0.1}, resume=False)
    assert isinstance(pending, _mlflow.PendingTracking)  # opened at the end instead
    reason = finish_training(pending, {"epochs": [], "model": {}}, run)
    # MLflow's own retries alone took ~2 minutes a call; a minute is far from that even under load.
    assert reason and time.perf_counter() - t0 < 60
    assert any("was not logged" in r.getMessage() for r in caplog.records)
