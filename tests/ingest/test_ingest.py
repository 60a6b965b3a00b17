"""The ingest end to end on generated folders: local disk and a real S3 server (moto)."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from braintumor_ray import CLASS_NAMES, InputError, StorageError, make_sample_dataset
from braintumor_ray.ingest import IngestConfig, run_ingest

from _images import bad_files, jpeg_bytes, odd_but_valid
from conftest import upload_tree

pytestmark = pytest.mark.ray

BAD = ["truncated.jpg", "corrupt_header.jpg", "header_only.jpg", "empty.jpg", "notes.jpg", "bomb.png"]
ODD = ["sixteen_bit.png", "rgba.png", "cmyk.jpg"]


def _reencode(path: str, dst: str, quality: int) -> None:
    Image.open(path).save(dst, format="JPEG", quality=quality)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A Sartaj-style tree with planted duplicates, leaks and every kind of bad file."""
    root = str(tmp_path_factory.mktemp("raw") / "mri")
    heads = make_sample_dataset(root, per_class=10, test_per_class=3, leaks=1, size=128, seed=1)
    tr, te = os.path.join(root, "Training"), os.path.join(root, "Testing")
    # Exact duplicate inside training, and a re-encoded (near) duplicate inside training.
    shutil.copyfile(f"{tr}/glioma_tumor/glioma_001.jpg", f"{tr}/glioma_tumor/glioma_001_copy.jpg")
    _reencode(f"{tr}/glioma_tumor/glioma_002.jpg", f"{tr}/glioma_tumor/glioma_002_q70.jpg", 70)
    # A test image that is a re-encoded copy of a training image: a near leak.
    _reencode(f"{tr}/meningioma_tumor/meningioma_005.jpg", f"{te}/meningioma_tumor/near_twin.jpg", 75)
    # Bad files among good ones; odd but valid formats; an unknown class; files to ignore.
    good = open(f"{tr}/no_tumor/no_tumor_000.jpg", "rb").read()
    for name, data in bad_files(good).items():
        with open(f"{tr}/no_tumor/{name}", "wb") as f:
            f.write(data)
    with open(os.path.join(os.fsencode(f"{tr}/no_tumor"), b"M\xfcller.jpg"), "wb") as f:  # a Latin-1 name (issue 35)
        f.write(good)
    for i, name in enumerate(ODD):  # three training images replaced by awkward-format versions
        src = f"{tr}/pituitary_tumor/pituitary_{7 + i:03d}.jpg"
        data = odd_but_valid(np.asarray(Image.open(src).convert("L")))[name]
        os.remove(src)
        with open(f"{tr}/pituitary_tumor/{name}", "wb") as f:
            f.write(data)
    os.makedirs(f"{tr}/astrocytoma")
    shutil.copyfile(f"{tr}/glioma_tumor/glioma_003.jpg", f"{tr}/astrocytoma/a.jpg")
    open(f"{root}/README.txt", "w").write("not an image")
    open(f"{tr}/glioma_tumor/.DS_Store", "wb").write(b"\x00")
    return root, heads


@pytest.fixture(scope="module")
def ingested(ray_session, raw, tmp_path_factory):
    root, heads = raw
    out = str(tmp_path_factory.mktemp("out") / "pre")
    report = run_ingest(IngestConfig(input=root, output=out, val_fraction=0.25, seed=3))
    return root, out, report, heads


def _split(out: str, split: str, filesystem=None):
    """Rows of one split, read the way users will: the hive-partitioned images/ dataset."""
    table = pads.dataset(f"{out}/images", format="parquet", partitioning="hive", filesystem=filesystem).to_table()
    rows = table.to_pylist()
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    return [r for r in rows if r["split"] == split]


def test_every_good_image_arrives_once(ingested):
    root, out, report, _ = ingested
    rows = _split(out, "train") + _split(out, "val") + _split(out, "test")
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths))
    # Planted: 40 train + 12 test + 4 leak copies + 2 train dups + 1 near twin (odd formats replace 3).
    c = report["counts"]
    assert c["images_ok"] == 40 + 12 + 4 + 2 + 1
    dropped = set(report["duplicates"]["dropped_from_training"])
    assert len(rows) == c["images_ok"] - len(dropped)
    for name in ODD:
        assert any(p.endswith(f"pituitary_tumor/{name}") for p in paths), name
    r = rows[0]
    assert set(r) >= {"path", "sha256", "label", "split", "image", "orig_width", "orig_height", "crop_x0", "leaked"}
    assert len(r["image"]) == r["image_height"] * r["image_width"] == 224 * 224
    assert {r["label"] for r in rows} == set(CLASS_NAMES)
    assert all(CLASS_NAMES[r["label_index"]] == r["label"] for r in rows)


def test_crop_box_in_the_shards_holds_the_head(ingested):
    root, out, _, heads = ingested
    rows = {r["path"]: r for r in _split(out, "train") + _split(out, "val")}
    checked = 0
    for path, head in heads.items():
        r = rows.get(path)
        if r is None:
            continue
        hx0, hy0, hx1, hy1 = head.box
        assert r["cropped"]
        assert r["crop_x0"] <= hx0 and r["crop_y0"] <= hy0 and r["crop_x1"] >= hx1 and r["crop_y1"] >= hy1
        assert (r["crop_x1"] - r["crop_x0"]) * (r["crop_y1"] - r["crop_y0"]) < 0.8 * 128 * 128, "border kept"
        img = np.frombuffer(r["image"], np.uint8).reshape(r["image_height"], r["image_width"])
        assert img[:, :3].max() < 60 or img[:3, :].max() < 60  # padding, not skull, at one edge
        checked += 1
    assert checked >= 30


def test_bad_files_are_reported_and_do_not_stop_the_job(ingested):
    root, out, report, _ = ingested
    errors = {os.path.basename(e["path"]): e["reason"] for e in report["errors"]}
    for name in BAD:
        assert name in errors, f"{name} not reported"
    assert "unknown class folder 'astrocytoma'" in errors["a.jpg"]
    assert "too large" in errors["bomb.png"] and "empty" in errors["empty.jpg"]
    assert "not an image" in errors["notes.jpg"] and "truncated" in errors["truncated.jpg"]
    # Issue 35: a name that is not UTF-8 failed the whole ingest; now it is its error row, escaped.
    assert "not valid UTF-8" in errors["M\\xfcller.jpg"]
    table = pq.read_table(os.path.join(out, "errors.parquet")).to_pylist()
    assert {os.path.basename(r["path"]) for r in table} == set(errors)
    assert len(errors) == len(BAD) + 2
    assert report["counts"]["ignored_files"] == 2  # README.txt and .DS_Store


def test_duplicates_dropped_from_training_and_grouped(ingested):
    root, out, report, _ = ingested
    dropped = {os.path.basename(p) for p in report["duplicates"]["dropped_from_training"]}
    # One of each planted pair stays; the first path in sort order is the one kept.
    assert {"glioma_001_copy.jpg", "glioma_002_q70.jpg"} <= dropped
    kept = [r["path"] for r in _split(out, "train") + _split(out, "val")]
    assert any(p.endswith("glioma_001.jpg") for p in kept) and any(p.endswith("glioma_002.jpg") for p in kept)
    kinds = {g["kind"] for g in report["duplicates"]["group_list"]}
    assert kinds == {"exact", "near"}


def test_validation_split_is_grouped_stratified_and_disjoint(ingested):
    root, out, report, _ = ingested
    train, val = _split(out, "train"), _split(out, "val")
    assert not {r["group_id"] for r in train} & {r["group_id"] for r in val}
    assert not {r["sha256"] for r in train} & {r["sha256"] for r in val}
    for label in CLASS_NAMES:
        n_val = sum(r["label"] == label for r in val)
        n_all = n_val + sum(r["label"] == label for r in train)
        assert n_val == int(np.floor(0.25 * n_all + 0.5)), label
    assert report["counts"]["output"]["val"] == {lab: sum(r["label"] == lab for r in val) for lab in CLASS_NAMES}


def test_test_split_kept_whole_and_leaks_flagged(ingested):
    root, out, report, _ = ingested
    test = {os.path.basename(r["path"]): r for r in _split(out, "test")}
    assert len(test) == 12 + 4 + 1
    for label in CLASS_NAMES:
        assert test[f"copy_of_{label}_000.jpg"]["leak"] == "exact"
    assert test["near_twin.jpg"]["leak"] == "near" and test["near_twin.jpg"]["leaked"]
    assert sum(r["leaked"] for r in test.values()) == 5
    lk = report["leakage"]["test"]
    assert (lk["total"], lk["leaked"], lk["exact"], lk["near"]) == (17, 5, 4, 1)
    assert lk["per_label"]["meningioma"]["leaked"] == 2


def test_report_is_json_with_counts(ingested):
    root, out, report, _ = ingested
    on_disk = json.load(open(os.path.join(out, "report.json")))
    assert on_disk["counts"] == report["counts"]
    assert on_disk["preprocess"]["image_size"] == 224
    assert on_disk["counts"]["input"]["test"]["meningioma"] == 3 + 1 + 1


def test_output_must_be_empty_unless_overwrite(ingested):
    root, out, _, _ = ingested
    with pytest.raises(StorageError, match="not empty.*--overwrite"):
        run_ingest(IngestConfig(input=root, output=out))


def test_class_only_layout_and_empty_input(ray_session, tmp_path):
    root = tmp_path / "flat"
    for label, folder in [("glioma", "glioma"), ("no_tumor", "notumor")]:
        (root / folder).mkdir(parents=True)
        for i in range(4):
            pixels = np.zeros((64, 64), np.uint8)
            pixels[8 + i : 56, 10:54] = 120 + 20 * i + (40 if label == "glioma" else 0)
            (root / folder / f"{i}.png").write_bytes(jpeg_bytes(pixels))
    report = run_ingest(IngestConfig(input=str(root), output=str(tmp_path / "o"), near_dup_distance=-1, val_fraction=0.25))
    assert report["layout"] == "<class>/<image>"
    assert report["counts"]["output"] == {"train": {"glioma": 3, "no_tumor": 3}, "val": {"glioma": 1, "no_tumor": 1}}
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no usable image files"):
        run_ingest(IngestConfig(input=str(tmp_path / "empty"), output=str(tmp_path / "o2")))


def test_s3_in_and_out(ray_session, raw, s3_endpoint, s3_bucket, tmp_path):
    import s3fs

    local = str(tmp_path / "small")
    make_sample_dataset(local, per_class=3, test_per_class=1, leaks=1, size=96, seed=5)
    with open(os.path.join(local, "Training", "glioma_tumor", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    upload_tree(local, s3_endpoint, s3_bucket, "raw")
    report = run_ingest(
        IngestConfig(
            input=f"s3://{s3_bucket}/raw", output=f"s3://{s3_bucket}/pre", s3_endpoint_url=s3_endpoint, val_fraction=0.34
        )
    )
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    assert fs.exists(f"{s3_bucket}/pre/report.json")
    on_s3 = json.loads(fs.cat_file(f"{s3_bucket}/pre/report.json"))
    assert on_s3["input"] == f"s3://{s3_bucket}/raw"
    rows = []
    for split in ("train", "val", "test"):
        rows += _split(f"{s3_bucket}/pre", split, filesystem=fs)
    assert len(rows) == report["counts"]["images_ok"] - len(report["duplicates"]["dropped_from_training"])
    assert report["counts"]["images_ok"] == 4 * (3 + 1 + 1)
    assert all(r["path"].startswith(f"s3://{s3_bucket}/raw/") for r in rows)
    assert report["errors"][0]["path"] == f"s3://{s3_bucket}/raw/Training/glioma_tumor/broken.jpg"
    assert report["leakage"]["test"]["exact"] == 4
    errors = pq.read_table(f"{s3_bucket}/pre/errors.parquet", filesystem=fs).to_pylist()
    assert [e["path"] for e in errors] == [report["errors"][0]["path"]]


def test_s3_missing_bucket_is_one_clear_error(ray_session, s3_endpoint):
    with pytest.raises(StorageError, match="s3://no-such-bucket-x/raw"):
        run_ingest(IngestConfig(input="s3://no-such-bucket-x/raw", output="/tmp/unused-bt", s3_endpoint_url=s3_endpoint))


def test_label_conflicts_are_left_out_of_training(ray_session, tmp_path):
    root = tmp_path / "conflict"
    make_sample_dataset(str(root), per_class=4, test_per_class=1, leaks=0, size=96, seed=9)
    src = root / "Training" / "glioma_tumor" / "glioma_000.jpg"
    shutil.copyfile(src, root / "Training" / "no_tumor" / "filed_twice.jpg")
    shutil.copyfile(src, root / "Testing" / "pituitary_tumor" / "also_here.jpg")
    report = run_ingest(IngestConfig(input=str(root), output=str(tmp_path / "o"), val_fraction=0.0))
    (conflict,) = report["duplicates"]["label_conflicts"]
    assert {os.path.basename(m["path"]) for m in conflict["members"]} == {"glioma_000.jpg", "filed_twice.jpg", "also_here.jpg"}
    dropped = {os.path.basename(p) for p in report["duplicates"]["dropped_from_training"]}
    assert {"glioma_000.jpg", "filed_twice.jpg"} <= dropped
    assert report["counts"]["output"]["train"] == {"glioma": 3, "meningioma": 4, "no_tumor": 4, "pituitary": 4}
    assert report["leakage"]["test"]["per_label"]["pituitary"]["exact"] == 1
