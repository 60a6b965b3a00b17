"""What a scoring run trusts and deletes in its output: only what the job wrote and committed.

Through run_scoring / the job's CLI, on local disk and on S3 (moto) where storage is involved: a
planted or corrupt staged run, a forged manifest, a folder of someone else's Parquet, a
--rescore-all cut off mid-delete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from braintumor_ray.core import ConfigError, resolve
from braintumor_ray.score import ScoreConfig, run_scoring

from conftest import load_job, mri_like, upload_tree

pytestmark = pytest.mark.ray


def _archive(root, n: int, *, start: int = 0) -> list[str]:
    os.makedirs(root, exist_ok=True)
    names = []
    for i in range(start, start + n):
        p = os.path.join(root, f"img{i}.png")
        Image.fromarray(mri_like(1, seed=i)[0]).save(p)
        names.append(p)
    return names


def _manifest(out) -> dict:
    return json.loads(out.join("_manifest.json").read_bytes())["files"]


def _parquet_on_storage(out) -> set[str]:
    return {p.rsplit("/", 1)[-1] for p in out.files() if p.endswith(".parquet")}


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(input URI, output URI, s3 endpoint or None): the archive and the output on disk or on S3."""
    archive = str(tmp_path / "archive")
    _archive(archive, 2)
    if request.param == "local":
        return archive, str(tmp_path / "preds"), None
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    upload_tree(archive, endpoint, bucket, "archive")
    return f"s3://{bucket}/archive", f"s3://{bucket}/preds", endpoint


def test_recovery_publishes_only_the_run_cut_off_with_valid_entries(ray_session, package, where, caplog):
    """A planted staged run (marker, an entry list replacing everything) is left alone, named in
    a warning; a malformed entry list of the run named by the commit record is a warning, not a
    traceback. Before: the planted run was published and deleted the committed record."""
    src, out_uri, endpoint = where
    cfg = ScoreConfig(model=package, input=src, output=out_uri, s3_endpoint_url=endpoint)
    first = run_scoring(cfg)
    out = resolve(out_uri, s3_endpoint_url=endpoint)
    committed = _manifest(out)
    assert first["scored"] == 2 and committed
    staging = resolve(out_uri + "._staging", s3_endpoint_url=endpoint)
    planted = staging.join("20990101T000000-evil0000")
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"path": ["x"], "sha256": ["0" * 64], "model_id": ["m"]}), buf)
    data = buf.getvalue().to_pybytes()
    planted.join("rows.parquet").write_bytes(data)
    planted.join("_ENTRIES.json").write_bytes(json.dumps({"replace_all": True, "files": {
        "rows.parquet": {"sha256": hashlib.sha256(data).hexdigest()}}}).encode())
    planted.join("_SUCCESS").write_bytes(b"")
    corrupt = staging.join("20990101T000000-bad00000")
    corrupt.join("rows.parquet").write_bytes(data)
    corrupt.join("_ENTRIES.json").write_bytes(b"{not json")
    corrupt.join("_SUCCESS").write_bytes(b"")
    staging.join("_committing.json").write_bytes(json.dumps({"run": "20990101T000000-bad00000"}).encode())
    with caplog.at_level(logging.WARNING, logger="braintumor_ray"):
        again = run_scoring(cfg)
    assert again["skipped_already_scored"] == 2 and again.get("committed_runs", 0) == 0
    assert _manifest(out).keys() == committed.keys() and _parquet_on_storage(out) == set(committed)
    assert planted.join("rows.parquet").exists() and corrupt.join("rows.parquet").exists()  # left alone
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "20990101T000000-evil0000" in said and "left alone" in said
    assert "20990101T000000-bad00000" in said and "cannot be trusted" in said


def test_rescore_all_never_deletes_what_the_manifest_names_outside_the_output(ray_session, package, tmp_path):
    """A manifest naming ``../x`` or an absolute path: --rescore-all replaces the job's own files
    only. Before: it deleted both."""
    archive = str(tmp_path / "archive")
    _archive(archive, 2)
    out_path = str(tmp_path / "preds")
    run_scoring(ScoreConfig(model=package, input=archive, output=out_path))
    victims = [tmp_path / "victim.parquet", tmp_path / "elsewhere" / "abs.parquet"]
    for v in victims:
        v.parent.mkdir(exist_ok=True)
        v.write_bytes(b"not the job's")
    doc = json.loads(open(os.path.join(out_path, "_manifest.json")).read())
    doc["files"]["../victim.parquet"] = {"sha256": "0" * 64}
    doc["files"][str(victims[1])] = {"sha256": "0" * 64}
    with open(os.path.join(out_path, "_manifest.json"), "w") as f:
        json.dump(doc, f)
    summary = run_scoring(ScoreConfig(model=package, input=archive, output=out_path, rescore_all=True))
    assert summary["scored"] == 2
    assert all(v.read_bytes() == b"not the job's" for v in victims)
    out = resolve(out_path)
    assert set(_manifest(out)) == _parquet_on_storage(out)  # the replaced rows are gone, the new ones listed


def test_output_folder_of_foreign_parquet_is_refused(package, tmp_path, capsys):
    """--output at a folder of someone else's Parquet: refused, naming the fix, even with
    --rescore-all, and nothing there changes. Before: adopted, and --rescore-all deleted it."""
    archive = str(tmp_path / "archive")
    _archive(archive, 1)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    pq.write_table(pa.table({"patient": ["p1"], "volume_ml": [3.5]}), theirs / "study.parquet")
    before = (theirs / "study.parquet").read_bytes()
    for rescore in (False, True):
        with pytest.raises(ConfigError, match="not an output of this job.*new or empty folder"):
            run_scoring(ScoreConfig(model=package, input=archive, output=str(theirs), rescore_all=rescore))
    rc = load_job("score").main(["--model", package, "--input", archive, "--output", str(theirs), "--rescore-all"])
    err = capsys.readouterr().err
    assert rc == 2 and "study.parquet" in err and "--output" in err
    assert sorted(os.listdir(theirs)) == ["study.parquet"] and (theirs / "study.parquet").read_bytes() == before


def test_rescore_all_cut_off_mid_delete_is_finished_by_the_next_run(ray_session, package, tmp_path, monkeypatch):
    """Killed between deleting two replaced files: the next run deletes the rest. Before: the
    second file (the replaced model's rows) stayed in the folder for good."""
    from braintumor_ray.core import Location

    archive = str(tmp_path / "archive")
    _archive(archive, 1)
    out_path = str(tmp_path / "preds")
    run_scoring(ScoreConfig(model=package, input=archive, output=out_path))
    _archive(archive, 1, start=1)
    run_scoring(ScoreConfig(model=package, input=archive, output=out_path))
    out = resolve(out_path)
    old = set(_manifest(out))
    assert len(old) >= 2
    real_remove, removed = Location.remove, []

    def remove_then_die(self):
        if self.path.endswith(".parquet") and self.path.startswith(out_path + "/"):
            if removed:
                raise KeyboardInterrupt("killed while deleting the replaced rows")
            removed.append(self.path)
        return real_remove(self)

    monkeypatch.setattr(Location, "remove", remove_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(ScoreConfig(model=package, input=archive, output=out_path, rescore_all=True))
    monkeypatch.setattr(Location, "remove", real_remove)
    assert len(removed) == 1
    summary = run_scoring(ScoreConfig(model=package, input=archive, output=out_path))
    assert summary["committed_runs"] == 1 and summary["scored"] == 0
    now = set(_manifest(out))
    assert not now & old and _parquet_on_storage(out) == now


def test_a_deleted_manifest_does_not_make_planted_rows_committed(ray_session, package, tmp_path):
    """The manifest deleted and a Parquet file planted: the run refuses, naming the fix, and
    adopts nothing. Before: every Parquet file there, the planted one included, was adopted."""
    from braintumor_ray.core import StorageError

    archive = str(tmp_path / "archive")
    _archive(archive, 1)
    out_path = str(tmp_path / "preds")
    run_scoring(ScoreConfig(model=package, input=archive, output=out_path))
    os.remove(os.path.join(out_path, "_manifest.json"))
    rows = pq.read_table(out_path).to_pylist()
    pq.write_table(pa.Table.from_pylist([dict(rows[0], predicted_label="glioma")]), os.path.join(out_path, "x.parquet"))
    with pytest.raises(StorageError, match="_manifest.json is gone.*Restore _manifest.json"):
        run_scoring(ScoreConfig(model=package, input=archive, output=out_path))
    assert not os.path.exists(os.path.join(out_path, "_manifest.json"))


def test_reruns_read_only_what_changed(ray_session, package, tmp_path, monkeypatch):
    """Files touched with their bytes unchanged (a chmod, a restore) are read once, their new
    version recorded without scoring them; a folder that cannot be listed is one error row, once.
    The run after reads nothing and starts no Ray work. Before: both were read (and the folder
    got a new error row) on every run."""
    archive = tmp_path / "archive"
    names = _archive(str(archive), 2)
    locked = archive / "locked"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, str) and path == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # root reads any folder: refused as an unreadable one would be
    out_path = str(tmp_path / "preds")
    cfg = ScoreConfig(model=package, input=str(archive), output=out_path)
    first = run_scoring(cfg)
    assert first["scored"] == 2 and first["errors"] == 1
    for n in names:
        os.chmod(n, 0o600)  # a new version (the change time), the same bytes
    second = run_scoring(cfg)
    assert second["scored"] == 0 and second["errors"] == 0 and second["skipped_already_scored"] == 3
    rows = pq.read_table(out_path).to_pylist()
    latest = {r["path"]: r for r in sorted(rows, key=lambda r: r["scored_at"])}
    assert all(latest[n]["status"] == "ok" and latest[n]["predicted_label"] for n in names)
    third = run_scoring(cfg)
    assert third.run_id is None, "nothing to read, nothing to commit"
    assert third["skipped_already_scored"] == 3 and third["errors"] == 0
