"""jobs/score.py and braintumor_ray.score on generated archives: local disk and S3 (moto)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from braintumor_ray import CLASS_NAMES, load_model_package, make_sample_dataset, prepare_input
from braintumor_ray.core import load_config
from braintumor_ray.score import OUTPUT_CONFIG_FILE, PROB_PREFIX, ScoreConfig, run_scoring

from _images import bad_files, odd_but_valid
from conftest import load_job, upload_tree

pytestmark = pytest.mark.ray

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAD = ["truncated.jpg", "corrupt_header.jpg", "header_only.jpg", "empty.jpg", "notes.jpg", "bomb.png"]


def make_archive(root: str, *, seed: int = 0, n: int = 4) -> list[str]:
    """An unsorted archive: nested folders, arbitrary names, bad and awkward files mixed in."""
    tmp = root + ".src"
    make_sample_dataset(tmp, per_class=n, test_per_class=0, leaks=0, size=96, seed=seed)
    paths = []
    for i, (dirpath, _, names) in enumerate(sorted(os.walk(tmp))):
        for j, name in enumerate(sorted(names)):
            dst = os.path.join(root, f"study{seed}-{i}", f"series{j % 2}", f"IMG_{seed}_{i}_{j}.jpeg")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(os.path.join(dirpath, name), dst)
            paths.append(dst)
    shutil.rmtree(tmp)
    return paths


def _rows(out: str, filesystem=None) -> list[dict]:
    return pads.dataset(out, format="parquet", filesystem=filesystem).to_table().to_pylist()


@pytest.fixture(scope="module")
def scored(ray_session, package, tmp_path_factory):
    base = tmp_path_factory.mktemp("score")
    archive = str(base / "archive")
    good = make_archive(archive)
    good_bytes = open(good[0], "rb").read()
    bad_dir = os.path.join(archive, "misc")
    os.makedirs(bad_dir)
    for name, data in bad_files(good_bytes).items():
        open(os.path.join(bad_dir, name), "wb").write(data)
    from PIL import Image

    pixels = np.asarray(Image.open(good[1]).convert("L"))
    for name, data in odd_but_valid(pixels).items():
        open(os.path.join(bad_dir, name), "wb").write(data)
    open(os.path.join(archive, "README"), "w").write("exported from PACS")
    out = str(base / "predictions")
    summary = run_scoring(ScoreConfig(model=package, input=archive, output=out, batch_size=8))
    return archive, out, summary, good


def test_one_row_per_file_and_probabilities(scored):
    archive, out, summary, good = scored
    rows = _rows(out)
    n_files = len(good) + len(BAD) + 3 + 1
    assert summary["files_seen"] == n_files and summary["scored"] + summary["errors"] == n_files
    assert len(rows) == n_files and len({r["path"] for r in rows}) == n_files
    by_name = {os.path.basename(r["path"]): r for r in rows}
    for name in BAD + ["README"]:
        assert by_name[name]["status"] == "error" and by_name[name]["error"], name
        assert by_name[name]["predicted_label"] is None
    for name in ["sixteen_bit.png", "rgba.png", "cmyk.jpg"]:
        assert by_name[name]["status"] == "ok", by_name[name]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(good) + 3 == summary["scored"]
    for r in ok:
        p = np.array([r[PROB_PREFIX + c] for c in CLASS_NAMES])
        assert abs(p.sum() - 1) < 1e-5 and r["predicted_label"] == CLASS_NAMES[int(p.argmax())]
        assert r["error"] is None and len(r["sha256"]) == 64
    assert {r["model_id"] for r in rows} == {load_model_package_meta_id(out, rows)}


def load_model_package_meta_id(out, rows):
    return rows[0]["model_id"]


def test_predictions_equal_a_plain_forward(scored, package):
    archive, out, _, good = scored
    pkg = load_model_package(package)
    rows = {r["path"]: r for r in _rows(out)}
    pixels = np.stack([pkg.preprocess(open(p, "rb").read()).pixels for p in good])
    with torch.no_grad():
        probs = torch.softmax(pkg.model(prepare_input(pixels, mean=pkg.data_config["mean"], std=pkg.data_config["std"])), 1).numpy()
    got = np.array([[rows[p][PROB_PREFIX + c] for c in CLASS_NAMES] for p in good])
    np.testing.assert_allclose(got, probs, atol=1e-5)
    assert rows[good[0]]["model_id"] == pkg.model_id


def test_rerun_scores_only_new_files(scored, package):
    archive, out, first, good = scored
    again = run_scoring(ScoreConfig(model=package, input=archive, output=out))
    assert again["scored"] == again["errors"] == 0 and again["skipped_already_scored"] == first["files_seen"]
    new = make_archive(os.path.join(archive, "new-arrivals"), seed=7, n=1)
    with open(good[0], "ab") as f:  # a changed file: new content, new sha256
        f.write(b"\x00")
    os.utime(good[1], (time.time() + 5, time.time() + 5))  # touched, content unchanged
    third = run_scoring(ScoreConfig(model=package, input=archive, output=out))
    assert third["scored"] == len(new) + 1
    assert third["skipped_already_scored"] == first["files_seen"] - 1
    rows = _rows(out)
    # The touched file: not scored again, its new version recorded in a copy of its row (the
    # next run then reads it no more).
    touched = [r for r in rows if r["path"] == good[1]]
    assert len(touched) == 2 and len({r["version"] for r in touched}) == 2
    assert len({(r["sha256"], r["predicted_label"], r["confidence"]) for r in touched}) == 1
    keys = [(r["path"], r["sha256"], r["model_id"]) for r in rows if r["path"] != good[1]]
    assert len(keys) == len(set(keys)), "a file was scored twice"
    assert len(rows) == first["files_seen"] + len(new) + 2  # the changed file's old and new row, the touched one's
    assert len({r["path"] for r in rows}) == first["files_seen"] + len(new)
    # Each run leaves its settings in OUTPUT/_config.yaml; dataset readers and the reruns above skip it.
    import pandas as pd

    assert load_config(ScoreConfig, os.path.join(out, OUTPUT_CONFIG_FILE)) == ScoreConfig(model=package, input=archive, output=out)
    assert len(pd.read_parquet(out)) == len(rows)


def test_killed_run_leaves_nothing_partial_and_the_next_run_completes(ray_session, package, tmp_path, capsys):
    archive = str(tmp_path / "archive")
    files = make_archive(archive, seed=3, n=6)
    out = str(tmp_path / "preds")
    env = dict(os.environ, HOME=str(tmp_path), RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_ADDRESS="local")  # its own Ray
    job = [sys.executable, os.path.join(REPO, "jobs", "score.py"), "--model", package, "--input", archive, "--output", out, "--batch-size", "2"]
    proc = subprocess.Popen(job, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    # Kill it as soon as it has started writing its staged rows (or, on a fast machine, later).
    while time.time() < deadline and proc.poll() is None and not os.path.exists(out + "._staging"):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Whatever the kill left, readers of the output see only whole files.
    if os.path.exists(out):
        for r in _rows(out):
            assert r["status"] == "ok"
    # The next run, as cron would start it, through the job's main() on the session's Ray (a second
    # subprocess would start a Ray of its own: ~30 s here, for nothing this test proves).
    code = load_job("score").main(job[2:])
    printed = capsys.readouterr().out
    assert code == 0
    rows = _rows(out)
    assert sorted(r["path"] for r in rows) == sorted(files), "every file exactly once"
    assert not os.path.exists(out + "._staging") or not os.listdir(out + "._staging")
    assert "files seen" in printed


def test_heat_maps_ride_the_runs_one_commit(ray_session, package, old_package, tmp_path, monkeypatch, caplog):
    """The maps (--explain) are staged by the replicas in the run's own folder and published by its
    one commit: a run cut off before it leaves no map listed (the next run, taking over its lease,
    drops it); OUTPUT/_manifest.json lists every map with its sha256 and OUTPUT_explain/ has no
    manifest of its own; a forged PNG under a listed name is not embedded in the report; a run cut
    off while committing is finished by the next, maps with rows; OUTPUT_explain/_manifest.json of
    the older layout is migrated (maps whose bytes match); a rerun with nothing new hashes no map
    and writes nothing; --rescore-all retires the replaced model's maps in its commit."""
    import base64
    import dataclasses
    import hashlib
    import json

    from braintumor_ray.core import Location, StagedWriter, lease_location, resolve
    from braintumor_ray.imaging import encode_png

    archive, out = str(tmp_path / "archive"), tmp_path / "preds"
    maps_dir = tmp_path / "preds_explain"
    make_archive(archive, seed=21, n=1)
    cfg = ScoreConfig(model=old_package, input=archive, output=str(out), explain="all", batch_size=4)

    def listed() -> dict:
        doc = json.loads((out / "_manifest.json").read_text())
        return {k.split("/", 1)[1]: e for k, e in doc.get("objects", {}).items() if k.startswith("_explain/")}

    def on_disk() -> list[str]:
        return sorted(p.name for p in maps_dir.glob("*.png"))

    def sha(p) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    # Cut off after the replicas wrote its maps, before its commit began.
    real_doc = StagedWriter._entries_doc

    def killed(self, *a, **k):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(StagedWriter, "_entries_doc", killed)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(cfg)
    monkeypatch.setattr(StagedWriter, "_entries_doc", real_doc)
    staged = sorted((tmp_path / "preds._staging").glob("*/_objects/_explain/*.png"))
    assert len(staged) == 4 and not on_disk() and not (out / "_manifest.json").exists()
    past = "2020-01-01T00:00:00+00:00"  # as a killed run leaves its lease: expired, its holder gone
    lease_location(resolve(str(out))).write_bytes(json.dumps({
        "owner": staged[0].parts[-4], "host": "node-gone", "pid": 4242, "started": past, "heartbeat": past,
        "expires": past, "ttl_s": 120.0}).encode())

    first = run_scoring(cfg)
    assert first["dropped_runs"] == 1 and first["heatmaps"] == 4
    named = sorted(os.path.basename(r["heatmap_path"]) for r in _rows(str(out)))
    assert named == on_disk() == sorted(listed()) and len(named) == 4
    assert all(listed()[n]["sha256"] == sha(maps_dir / n) for n in named)
    assert not (maps_dir / "_manifest.json").exists() and not os.path.exists(str(maps_dir) + "._staging")
    assert not list((tmp_path / "preds._staging").glob("*/_objects"))

    # A listed map forged in place; new files, and the run cut off while committing (its first map moved in).
    report = (out / "_report.html").read_text()
    forged = next(n for n in named if base64.b64encode((maps_dir / n).read_bytes()).decode() in report)
    bad = encode_png(np.full((64, 64, 3), 13, np.uint8))
    (maps_dir / forged).write_bytes(bad)
    make_archive(archive, seed=22, n=1)
    real_move = Location.move_to

    def cut(self, other):
        real_move(self, other)
        if other.path.startswith(str(maps_dir) + "/"):
            raise KeyboardInterrupt("killed while committing")

    monkeypatch.setattr(Location, "move_to", cut)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(cfg)
    monkeypatch.setattr(Location, "move_to", real_move)
    assert sorted(listed()) == named and len(on_disk()) == 5  # the moved map is not listed yet
    finished = run_scoring(cfg)
    assert finished["committed_runs"] == 1 and finished["scored"] == 0
    named = sorted(os.path.basename(r["heatmap_path"]) for r in _rows(str(out)))
    assert named == on_disk() == sorted(listed()) and len(named) == 8
    assert all(listed()[n]["sha256"] == sha(maps_dir / n) for n in named if n != forged)
    assert base64.b64encode(bad).decode() not in (out / "_report.html").read_text()
    assert "its bytes are not the ones committed" in caplog.text

    # The layout before: the maps named in OUTPUT_explain/_manifest.json (the forged one among them).
    doc = json.loads((out / "_manifest.json").read_text())
    old = {k.split("/", 1)[1]: e for k, e in doc["objects"].items() if k.startswith("_explain/")}
    doc["objects"] = {k: e for k, e in doc["objects"].items() if not k.startswith("_explain/")}
    (out / "_manifest.json").write_text(json.dumps(doc))
    (maps_dir / "_manifest.json").write_text(json.dumps({"format": 1, "files": old}))
    run_scoring(cfg)
    assert not (maps_dir / "_manifest.json").exists()
    assert sorted(listed()) == [n for n in named if n != forged]  # its bytes are not the listed ones

    # Nothing new: no map hashed, nothing written.
    import braintumor_ray.core._staging as staging_mod

    hashed = []
    real_sha = staging_mod.file_sha256
    monkeypatch.setattr(staging_mod, "file_sha256", lambda *a: hashed.append(a) or real_sha(*a))
    stamp = os.stat(out / "_manifest.json").st_mtime_ns
    assert run_scoring(cfg)["scored"] == 0
    assert hashed == [] and os.stat(out / "_manifest.json").st_mtime_ns == stamp
    monkeypatch.setattr(staging_mod, "file_sha256", real_sha)

    # Another model over every file: the replaced model's maps leave the manifest and the folder in
    # its commit; the one map that was not listed is not the job's to delete.
    again = run_scoring(dataclasses.replace(cfg, model=package, rescore_all=True))
    (new_id,) = {r["model_id"] for r in _rows(str(out))}  # the replaced model's rows are gone
    assert again["heatmaps"] == 8 and not any(n.endswith(f"-{new_id}.png") for n in named)
    now = listed()
    assert len(now) == 8 and all(n.endswith(f"-{new_id}.png") for n in now)
    assert on_disk() == sorted([*now, forged]) and all(now[n]["sha256"] == sha(maps_dir / n) for n in now)


def test_s3_in_and_out(ray_session, package, s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    archive = str(tmp_path / "archive")
    files = make_archive(archive, seed=5, n=1)
    upload_tree(archive, s3_endpoint, s3_bucket, "pacs/export")
    upload_tree(package, s3_endpoint, s3_bucket, "models/m1")
    cfg = ScoreConfig(model=f"s3://{s3_bucket}/models/m1", input=f"s3://{s3_bucket}/pacs", output=f"s3://{s3_bucket}/preds", s3_endpoint_url=s3_endpoint)
    summary = run_scoring(cfg)
    assert summary["scored"] == len(files)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    rows = _rows(f"{s3_bucket}/preds", filesystem=fs)
    assert len(rows) == len(files) and all(r["path"].startswith(f"s3://{s3_bucket}/pacs/export/") for r in rows)
    assert run_scoring(cfg)["skipped_already_scored"] == len(files)


def test_run_cut_off_while_committing_is_finished_by_the_next(ray_session, package, tmp_path, monkeypatch):
    from braintumor_ray.core import Location

    archive = str(tmp_path / "archive")
    files = make_archive(archive, seed=11, n=2)
    out = str(tmp_path / "preds")
    real_move, moves = Location.move_to, []

    def move_then_die(self, other):
        if not other.path.startswith(out + "/"):  # the heat maps and DICOM objects: moved after the rows' files
            return real_move(self, other)
        if moves:
            raise KeyboardInterrupt("killed while committing")  # what a SIGINT mid-commit looks like
        moves.append(other.path)
        real_move(self, other)

    monkeypatch.setattr(Location, "move_to", move_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_scoring(ScoreConfig(model=package, input=archive, output=out, batch_size=2))
    monkeypatch.setattr(Location, "move_to", real_move)
    # The run's rows are one file (moved in), its report the next move (cut): nothing listed yet.
    assert len(_rows(out)) == len(files) and len(moves) == 1 and moves[0].endswith(".parquet")
    assert not os.path.exists(os.path.join(out, "_manifest.json")) and not os.path.exists(os.path.join(out, "_report.html"))
    summary = run_scoring(ScoreConfig(model=package, input=archive, output=out))
    assert summary["committed_runs"] == 1 and summary["scored"] == 0
    assert sorted(r["path"] for r in _rows(out)) == sorted(files)
    assert os.path.exists(os.path.join(out, "_report.html")) and len(os.listdir(out)) == 5  # rows, report, manifest, ids, config


def test_the_tasks_and_replicas_layouts_write_the_same_rows(ray_session, package, tmp_path):
    """Issue 37: on CPUs with ONNX Runtime a run's default layout is tasks (each reads, decodes and
    scores its own files, the model kept per worker); the replicas layout (decode tasks feeding
    model actors) writes the same rows and maps for the same archive: images, a bad file, and a
    volume with more slices than a batch, which a task scores in batches."""
    from braintumor_ray.imaging import render_mri
    from generators.medical import nifti_bytes

    archive = str(tmp_path / "archive")
    make_archive(archive, seed=5, n=1)
    open(os.path.join(archive, "broken.jpg"), "wb").write(b"\xff\xd8\xff\xe0 not a jpeg")
    rng = np.random.default_rng(5)
    vol = np.stack([render_mri("glioma", rng, 64)[0].astype(np.float32) for _ in range(5)] + [np.zeros((64, 64), np.float32)], -1)
    open(os.path.join(archive, "vol.nii.gz"), "wb").write(nifti_bytes(vol, gz=True))
    runs = {}
    for layout in ("auto", "replicas"):
        out = str(tmp_path / f"out-{layout}")
        s = run_scoring(ScoreConfig(model=package, input=archive, output=out, batch_size=2, explain="all", layout=layout))
        rows = sorted(_rows(out), key=lambda r: (r["path"], r["slice_index"] or 0))
        runs[s["layout"]] = (s, rows)
    (tasks, t_rows), (replicas, r_rows) = runs["tasks"], runs["replicas"]
    assert tasks["replicas"] == int(ray_session.cluster_resources()["CPU"]) and tasks["cpus_per_replica"] == 1.0
    assert len(t_rows) == len(r_rows) == 4 + 1 + 6 and tasks["scored"] == replicas["scored"] == 4 + 5
    keep = ["path", "slice_index", "sha256", "size", "version", "status", "error", "predicted_label", "review_reason",
            "heatmap_peak_x", "heatmap_peak_y"] + [PROB_PREFIX + c for c in CLASS_NAMES]
    for a, b in zip(t_rows, r_rows):
        for k in keep:
            assert a[k] == pytest.approx(b[k], abs=1e-6) if isinstance(a[k], float) else a[k] == b[k], (k, a["path"])
    assert sum(bool(r["heatmap_path"]) for r in t_rows) == tasks["heatmaps"] == replicas["heatmaps"] == 9
    # A volume's six slices: five scored in batches of two within one task, the empty one skipped.
    assert [r["status"] for r in t_rows if r["path"].endswith("vol.nii.gz")] == ["ok"] * 5 + ["skipped"]
