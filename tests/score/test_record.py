"""A scoring record you can prove (issue 25), through run_scoring and jobs/score.py's main():
the package each replica loads, the manifest, freshness, one model per output, a full disk."""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from braintumor_ray import MRIPreprocess, create_model, export_model_package, make_sample_dataset
from braintumor_ray.core import MANIFEST_FILE, Manifest, resolve
from braintumor_ray.imaging import InputGuard, encode_png
from braintumor_ray.score import ScoreConfig, run_scoring

from conftest import upload_tree

pytestmark = pytest.mark.ray


def _archive(root: str, seed: int = 0) -> list[str]:
    make_sample_dataset(root, per_class=1, test_per_class=0, leaks=0, size=64, seed=seed)
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)


def _committed(out: str) -> list[dict]:
    """The rows the manifest names (what the job committed)."""
    names = sorted(Manifest(resolve(out)).read())
    return pa.concat_tables([pq.read_table(os.path.join(out, n)) for n in names],
                            promote_options="permissive").to_pylist()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_replica_refuses_a_package_rewritten_after_the_drivers_checks(ray_session, package, tmp_path, monkeypatch,
                                                                        where, request):
    """The driver verifies the package, then (before any replica starts) the folder is re-exported
    with another model: a consistent package that would pass every check on its own."""
    from braintumor_ray.score import _run

    import torch

    archive = str(tmp_path / "archive")
    _archive(archive)
    if where == "s3":
        endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
        upload_tree(package, endpoint, bucket, "models/m")
        cfg = ScoreConfig(model=f"s3://{bucket}/models/m", input=archive, output=str(tmp_path / "out"),
                          s3_endpoint_url=endpoint)
    else:
        shutil.copytree(package, str(tmp_path / "pkg"))
        cfg = ScoreConfig(model=str(tmp_path / "pkg"), input=archive, output=str(tmp_path / "out"))
    real = _run._execute

    def rewrite_then_execute(plan, *args, **kwargs):
        torch.manual_seed(5)
        export_model_package(create_model("resnet10t", pretrained=False), plan.pin.uri, onnx=False,
                             preprocess=MRIPreprocess(image_size=64), s3_endpoint_url=plan.s3_endpoint_url)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(_run, "_execute", rewrite_then_execute)
    with pytest.raises(Exception, match=r"model\.json is not the file verified for model"):
        run_scoring(cfg)
    out = str(tmp_path / "out")
    assert not os.path.exists(out) or not [n for n in os.listdir(out) if n.endswith(".parquet")]


def _plant(out: str, committed: str, path: str, secret_png: str) -> None:
    """A Parquet file dropped into OUTPUT by hand: it says ``path`` is scored (a glioma, with a map)."""
    t = pq.read_table(os.path.join(out, committed)).slice(0, 1).to_pylist()[0]
    t.update(path=path, predicted_label="glioma", review_reason="low_confidence", heatmap_path=secret_png,
             status="ok")
    pq.write_table(pa.Table.from_pylist([t], schema=pq.read_schema(os.path.join(out, committed))),
                   os.path.join(out, "part-planted.parquet"))


def test_freshness_withdrawn_rows_error_retries_and_a_planted_file(ray_session, package, tmp_path, caplog):
    archive = str(tmp_path / "archive")
    files = _archive(archive)
    open(files[0], "ab").write(b"\0" * 8)  # padding after the PNG's end: changed below, same size
    big = os.path.join(archive, "big.png")
    open(big, "wb").write(encode_png(np.random.default_rng(0).integers(0, 255, (128, 128), dtype=np.uint8)))
    out = str(tmp_path / "out")
    small = InputGuard(max_file_bytes=8192)
    cfg = dict(model=package, input=archive, output=out, explain="none")
    first = run_scoring(ScoreConfig(**cfg, guard=small))
    assert first["scored"] == len(files) and first["errors"] == 1
    manifest = Manifest(resolve(out)).read()
    assert sum(e["rows"] for e in manifest.values()) == len(files) + 1
    assert {m for e in manifest.values() for m in e["model_ids"]} == {first["model_id"]}

    # Between runs: one file rewritten at equal size and mtime (cp -p), one deleted, one new
    # scan arrives, and a planted Parquet file claims the new scan is scored.
    changed, gone = files[0], files[1]
    st = os.stat(changed)
    old = open(changed, "rb").read()
    open(changed, "wb").write(old[:-1] + b"\1")
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(changed).st_size == st.st_size and os.stat(changed).st_mtime_ns == st.st_mtime_ns
    os.remove(gone)
    new = os.path.join(archive, "new", "scan.png")
    os.makedirs(os.path.dirname(new))
    shutil.copyfile(files[3], new)
    open(new, "ab").write(b"\0")  # other bytes than the copy's source
    secret = str(tmp_path / "secret.png")
    open(secret, "wb").write(encode_png(np.full((8, 8), 7, np.uint8)))
    _plant(out, sorted(manifest)[0], new, secret)

    # The limit raised, retries off: the big file's error is final and stays recorded.
    with caplog.at_level("WARNING"):
        second = run_scoring(ScoreConfig(**cfg, retry_errors=0))
    # Said once: a run reads the committed files once, into the one table that its plan, its
    # commit, the series table, the DICOM step and the report share (they were read twice a run).
    assert caplog.text.count("part-planted.parquet is not in _manifest.json") == 1
    assert second["errors_final"] == 1 and second["withdrawn"] == 1
    assert second["scored"] == 2  # the rewritten file and the new scan (the planted row notwithstanding)
    rows = _committed(out)
    assert not any(r["heatmap_path"] == secret for r in rows)
    by_path: dict[str, list] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert sorted(r["status"] for r in by_path[gone]) == ["ok", "withdrawn"]  # kept, and marked
    assert len({r["sha256"] for r in by_path[changed]}) == 2
    assert [r["status"] for r in by_path[big]] == ["error"]
    html = open(os.path.join(out, "_report.html")).read()
    assert "withdrawn" in html and base64.b64encode(open(secret, "rb").read()).decode() not in html
    # The series table and the report read the manifest's files only: the planted file is in the
    # folder, and a plain dataset read of OUTPUT still sees it.
    assert any(r["path"] == new and r["predicted_label"] == "glioma" and r["heatmap_path"] == secret
               for r in pads.dataset(out, format="parquet").to_table().to_pylist())

    # Retries on: the big file is scored now.
    third = run_scoring(ScoreConfig(**cfg))
    assert third["errors_retried"] == 1 and third["scored"] == 1 and third["withdrawn"] == 0
    assert sorted(r["status"] for r in _committed(out) if r["path"] == big) == ["error", "ok"]


def test_one_model_per_output_and_the_model_on_every_card(ray_session, package, old_package, tmp_path, capsys):
    from jobs.score import main

    archive = str(tmp_path / "archive")
    files = _archive(archive)
    out = str(tmp_path / "out")
    first = run_scoring(ScoreConfig(model=old_package, input=archive, output=out, explain="none"))
    # An old package scores with PyTorch (its model.onnx is not covered by its id), and says so.
    assert first["engine"] == "torch" and "not covered by its model id" in first["notes"][0]
    rc = main(["--model", package, "--input", archive, "--output", out])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and f"holds rows of model {first['model_id']}" in err
    assert "--rescore-all" in err and "new output" in err
    assert main(["--model", package, "--input", archive, "--output", out, "--rescore-all", "--explain", "none"]) == 0
    rows = _committed(out)
    new_id = {r["model_id"] for r in rows}
    assert len(rows) == len(files) and len(new_id) == 1 and first["model_id"] not in new_id
    assert len(pads.dataset(out, format="parquet").to_table()) == len(files)  # the old model's files are gone
    html = open(os.path.join(out, "_report.html")).read()
    assert 'id="models"' in html and first["model_id"] not in html
    cards = html.count('<div class="card">')
    assert cards and html.count(f"<dt>model</dt><dd>{new_id.pop()}</dd>") == cards


def test_a_full_disk_is_one_line_and_the_next_run_continues(ray_session, package, tmp_path, monkeypatch, capsys):
    """Each small file beside the rows in turn meets a full disk (fsync raising ENOSPC for that
    file only); every run says so in one line, and the run after space is freed goes on."""
    from jobs.score import main

    archive = str(tmp_path / "archive")
    files = _archive(archive)
    out = str(tmp_path / "out")
    args = ["--model", package, "--input", archive, "--output", out, "--explain", "none"]
    real = os.fsync
    full = {"name": None}

    def fsync(fd):
        if full["name"] and os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(full["name"]):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("out._lease.json", "._identifiers.json", "._config.yaml", "._report.html"):
        full["name"] = name
        assert main(args) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: no space left on the device") and "\n" not in err, (name, err)
        left = os.listdir(out) if os.path.exists(out) else []
        assert not [n for n in left if n.endswith(".tmp")], left
        if os.path.exists(os.path.join(out, "_identifiers.json")):
            json.loads(open(os.path.join(out, "_identifiers.json")).read())  # never half-written
    full["name"] = None
    # The run cut off while staging its report committed nothing (the report and series table are
    # committed with the rows, in one manifest write): no row without its report.
    assert not Manifest(resolve(out)).read() and not os.path.exists(os.path.join(out, "_report.html"))
    assert main(args) == 0
    assert f"rows scored {len(files)}" in capsys.readouterr().out
    assert len(_committed(out)) == len(files) and os.path.exists(os.path.join(out, "_report.html"))
    assert MANIFEST_FILE in os.listdir(out)


def _snapshot(base: str, prefix: str) -> dict[str, int]:
    """Every file of the output and its siblings with its mtime (ns), the lease's files left out
    (each run takes and releases the lease)."""
    found = {}
    for entry in sorted(os.listdir(base)):
        if not entry.startswith(prefix) or "._lease" in entry:
            continue
        top = os.path.join(base, entry)
        paths = [top] if os.path.isfile(top) else [os.path.join(d, n) for d, _, names in os.walk(top) for n in names]
        found.update({p: os.stat(p).st_mtime_ns for p in paths})
    return found


def test_a_rerun_with_nothing_new_writes_nothing_and_restores_a_lost_report(ray_session, package, tmp_path):
    """The series table and report are committed with the rows (listed in the manifest's derived,
    with their sha256 and the rows' digest): a run with nothing new writes no file at all; a
    deleted report and a forged series table are each found by their bytes and committed again."""
    import hashlib

    from generators.medical import head12, nifti_bytes

    archive = tmp_path / "archive"
    archive.mkdir()
    for i, im in enumerate(np.random.default_rng(3).integers(0, 255, (2, 64, 64), dtype=np.uint8)):
        (archive / f"{i}.png").write_bytes(encode_png(im))
    vol = np.stack([head12(30 + k, label="meningioma") for k in range(3)], axis=-1)
    (archive / "brain.nii").write_bytes(nifti_bytes(vol.astype(np.int16)))
    out = str(tmp_path / "out")
    cfg = ScoreConfig(model=package, input=str(archive), output=out, explain="none")
    first = run_scoring(cfg)
    report, series = os.path.join(out, "_report.html"), out + "_series/series.parquet"
    assert first["series"] == 1 and first["report"] == report

    def listed() -> dict:
        return json.loads(open(os.path.join(out, MANIFEST_FILE)).read())

    def sha(path: str) -> str:
        return hashlib.sha256(open(path, "rb").read()).hexdigest()

    doc = listed()
    assert set(doc["derived"]) == {"_report.html", "_series/series.parquet"}
    assert doc["derived"]["_report.html"]["sha256"] == sha(report)
    assert doc["derived"]["_series/series.parquet"]["sha256"] == sha(series)
    true_series = open(series, "rb").read()

    before = _snapshot(str(tmp_path), "out")
    again = run_scoring(cfg)
    assert again["scored"] == 0 and again["series"] == 1 and again["report"] == report
    assert _snapshot(str(tmp_path), "out") == before, "a run with nothing new wrote or rewrote a file"

    os.remove(report)
    table = pq.read_table(series)
    forged = ["pituitary" if lb != "pituitary" else "glioma" for lb in table.column("predicted_label").to_pylist()]
    table = table.set_column(table.schema.get_field_index("predicted_label"), "predicted_label",
                             pa.array(forged, pa.string())).replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, series)
    third = run_scoring(cfg)
    assert third["scored"] == 0 and os.path.exists(report) and open(series, "rb").read() == true_series
    doc3 = listed()
    assert doc3["files"] == doc["files"], "no row file was committed"
    assert doc3["derived"]["_report.html"]["sha256"] == sha(report)
    assert doc3["derived"]["_series/series.parquet"]["sha256"] == sha(series)
    before = _snapshot(str(tmp_path), "out")
    run_scoring(cfg)
    assert _snapshot(str(tmp_path), "out") == before
