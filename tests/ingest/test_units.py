"""Table-driven unit tests of the pure functions: split assignment (grouping, the validation carve,
leak flags), input planning, the LR schedule, class weights, the staged writer and the training
state's checkpoint form. No Ray: part of the fast subset (`pytest -m "not ray"`)."""

from __future__ import annotations

import hashlib
import json
import math
import os

import pytest
import torch

from braintumor_ray.core import DONE_MARKER, STAGING_SUFFIX, StagedWriter, resolve
from braintumor_ray.ingest import (
    ImageFacts,
    assign_splits,
    carve_validation,
    flag_leaks,
    format_summary,
    group_images,
    keep_one_per_group,
    plan_inputs,
    val_count,
)
from braintumor_ray.train import TrainingState, class_weights, lr_lambda


FAR = 0xFFFF_FFFF_0000_0000  # 32 bits from 0: never a near duplicate of a small pHash


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def img(key: str, label: str = "glioma", split: str = "train", *, h: int, ph: int | None = None,
        series: str | None = None) -> ImageFacts:
    """An image whose content is ``h`` (the sha256 of it) and whose pHash is ``ph`` (by default
    the first 64 bits of that sha256: far from any other's)."""
    digest = sha(h)
    ph = ph if ph is not None else int(digest[:16], 16)
    return ImageFacts(key=key, sha256=digest, phash=f"{ph:016x}", label=label, split=split, series=series)


CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")


def per_class(n: int, labels=CLASSES) -> list[ImageFacts]:
    """``n`` distinct training images per class (``<label>/<i>``)."""
    return [img(f"{lab}/{i}", lab, h=100 * CLASSES.index(lab) + i) for lab in labels for i in range(n)]


# --- grouping --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images, distance, groups",
    [
        # exact copies share a group, whatever their pHash
        ([img("a", h=1, ph=0), img("b", h=1, ph=FAR), img("c", h=2, ph=~FAR & 2**64 - 1)], 2, [["a", "b"], ["c"]]),
        # near copies: pHash within the distance (2 bits here)
        ([img("a", h=1, ph=0b000), img("b", h=2, ph=0b011), img("c", h=3, ph=FAR)], 2, [["a", "b"], ["c"]]),
        # 3 bits apart is not near at distance 2
        ([img("a", h=1, ph=0b000), img("b", h=2, ph=0b111)], 2, [["a"], ["b"]]),
        # -1 switches near matching off; exact matching stays
        ([img("a", h=1, ph=0), img("b", h=2, ph=0), img("c", h=1, ph=FAR)], -1, [["a", "c"], ["b"]]),
        # transitive: a~b and b~c put a and c together
        ([img("a", h=1, ph=0b0000), img("b", h=2, ph=0b0011), img("c", h=3, ph=0b1111)], 2, [["a", "b", "c"]]),
    ],
)
def test_group_images(images, distance, groups):
    g = group_images(images, near_dup_distance=distance)
    got = sorted(sorted(images[i].key for i in idx) for idx in g.members.values())
    assert got == sorted(groups)
    for gid, idx in g.members.items():  # the id is the smallest sha256 in the group, 16 digits
        assert g.group_id[gid] == min(images[i].sha256 for i in idx)[:16]


@pytest.mark.parametrize(
    "images, kept, dropped, conflicts",
    [
        # one copy of a training group is kept: the first path in sort order
        ([img("b", h=1), img("a", h=1), img("c", h=2)], {"glioma": ["a", "c"]}, ["b"], 0),
        # training copies that disagree on the label: none is kept, the group is a conflict
        ([img("a", "glioma", h=1), img("b", "pituitary", h=1), img("c", h=2)], {"glioma": ["c"]}, ["a", "b"], 1),
        # a disagreement with a test copy only: training keeps its image, the conflict is reported
        ([img("a", "glioma", h=1), img("t", "pituitary", "test", h=1)], {"glioma": ["a"]}, [], 1),
        # evaluation images are never kept for training
        ([img("t", split="test", h=1), img("v", split="val", h=2)], {}, [], 0),
    ],
)
def test_keep_one_per_group(images, kept, dropped, conflicts):
    k, d, c = keep_one_per_group(images, group_images(images, near_dup_distance=-1))
    assert {lab: sorted(images[g.index].key for g in gs) for lab, gs in k.items()} == kept
    assert sorted(d) == dropped and len(c) == conflicts


# --- the validation carve ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "units, fraction, n_val",
    [
        (0, 0.15, 0),
        (1, 0.15, 0),  # a single group or series cannot be split: it stays in training
        (1, 0.5, 0),
        (2, 0.15, 1),  # small classes still get one (the share alone rounds to 0)
        (3, 0.15, 1),
        (4, 0.15, 1),
        (10, 0.15, 2),  # 1.5 rounds half up
        (10, 0.25, 3),
        (20, 0.15, 3),
        (2, 0.85, 1),  # never all of a class: training keeps one
        (5, 0.0, 0),  # no validation split asked for
    ],
)
def test_val_count(units, fraction, n_val):
    assert val_count(units, fraction) == n_val


def _carve(images, fraction, seed=0):
    kept, _, _ = keep_one_per_group(images, group_images(images, near_dup_distance=-1))
    return carve_validation(images, kept, val_fraction=fraction, seed=seed)


@pytest.mark.parametrize(
    "n, fraction, val_per_class, missing",
    [
        (3, 0.15, 1, []),  # the case: 3 training images per class gave no val split at all
        (11, 0.15, 2, []),
        (40, 0.25, 10, []),
        (1, 0.15, 0, ["glioma", "meningioma", "no_tumor", "pituitary"]),  # one image: no validation possible
        (5, 0.0, 0, []),  # none asked for: nothing is missing
    ],
)
def test_carve_is_stratified_and_small_classes_get_validation(n, fraction, val_per_class, missing):
    images = per_class(n)
    decisions, got_missing = _carve(images, fraction)
    assert len(decisions) == len(images) and got_missing == missing
    for label in CLASSES:
        splits = [decisions[m.key].split for m in images if m.label == label]
        assert splits.count("val") == val_per_class and splits.count("train") == n - val_per_class


def test_carve_names_only_the_classes_that_cannot_have_validation():
    images = per_class(4, ("glioma", "meningioma")) + per_class(1, ("pituitary",))
    decisions, missing = _carve(images, 0.15)
    assert missing == ["pituitary"]
    assert decisions["pituitary/0"].split == "train"
    assert [decisions[f"glioma/{i}"].split for i in range(4)].count("val") == 1


def test_carve_keeps_a_series_whole_and_depends_on_the_seed_only():
    series = [img(f"vol#{i}", series="vol", h=900 + i) for i in range(5)]
    singles = [img(f"x{i}", h=i) for i in range(5)]
    for seed in range(6):
        decisions, _ = _carve(series + singles, 0.5, seed)
        assert len({decisions[m.key].split for m in series}) == 1, seed
        assert sum(d.split == "val" for d in decisions.values() if d.group_id) >= 1
        assert decisions == _carve(list(reversed(series + singles)), 0.5, seed)[0]  # input order does not matter


# --- leaks and the whole assignment -------------------------------------------------------------------


@pytest.mark.parametrize(
    "test_image, leak",
    [
        (img("t", split="test", h=1, ph=0), "exact"),  # the very file is in training
        (img("t", split="test", h=99, ph=0b01), "near"),  # a re-encoded copy
        (img("t", split="test", h=98, ph=FAR), None),  # no twin
    ],
)
def test_flag_leaks(test_image, leak):
    images = [img("a", h=1, ph=0), test_image]
    d = flag_leaks(images, group_images(images, near_dup_distance=2))
    assert list(d) == ["t"] and d["t"].split == "test" and d["t"].leak == leak


def test_assign_splits_end_to_end():
    images = per_class(4) + [
        img("glioma/copy", "glioma", h=0),  # an exact copy of glioma/0 in training: dropped
        img("test/leak", "glioma", "test", h=1),  # an exact copy of glioma/1 in test: kept, flagged
        img("test/clean", "pituitary", "test", h=5000),
    ]
    r = assign_splits(images, val_fraction=0.15, seed=0, near_dup_distance=-1)
    assert "glioma/copy" not in r.decisions and r.duplicates.dropped_from_training == ["glioma/copy"]
    assert r.decisions["test/leak"].leak == "exact" and r.decisions["test/clean"].leak is None
    assert r.decisions["test/leak"].group_size == 2
    assert sum(d.split == "val" for d in r.decisions.values()) == 4  # one per class
    assert (r.leakage["test"].total, r.leakage["test"].leaked, r.leakage["test"].exact) == (2, 1, 1)
    assert r.leakage["test"].files == ["test/leak"] and r.val_missing_classes == []
    assert (r.duplicates.groups, r.duplicates.exact_groups, r.duplicates.images_in_groups) == (2, 2, 4)


def test_summary_names_the_classes_without_validation():
    report = {
        "input": "in", "output": "out", "val_missing_classes": ["pituitary"],
        "counts": {"files_listed": 1, "images_read": 1, "images_ok": 1, "errors": 0, "ignored_files": 0, "output": {}},
        "duplicates": {"groups": 0, "exact_groups": 0, "near_groups": 0, "near_dup_distance": 2,
                       "dropped_from_training": [], "label_conflicts": []},
        "leakage": {}, "errors": [],
        "timing": {"wall_s": 1, "images_per_s": 1, "list_s": 0, "decode_s": 0, "dedup_s": 0, "write_s": 0},
    }
    assert "no validation images for pituitary" in format_summary(report)
    assert "no validation images" not in format_summary(report | {"val_missing_classes": []})


# --- input planning ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files, planned, errors, ignored, layout",
    [
        (
            ["/r/Training/glioma_tumor/a.jpg", "/r/Testing/notumor/b.png", "/r/Training/glioma_tumor/PAT/SER/IM1",
             "/r/Training/pituitary_tumor/vol.nii.gz"],
            [("/r/Training/glioma_tumor/a.jpg", "glioma", "train", "Training"),
             ("/r/Testing/notumor/b.png", "no_tumor", "test", "Testing"),
             ("/r/Training/glioma_tumor/PAT/SER/IM1", "glioma", "train", "Training"),  # DICOM exports nest
             ("/r/Training/pituitary_tumor/vol.nii.gz", "pituitary", "train", "Training")],
            [], [], "<split>/<class>/<image>",
        ),
        (
            ["/r/Training/astro/a.jpg", "/r/Training/glioma/sub/x.jpg", "/r/Other/glioma/x.jpg", "/r/Training/x.jpg"],
            [],
            [("/r/Training/astro/a.jpg", "unknown class folder 'astro'"),
             ("/r/Training/glioma/sub/x.jpg", "unexpected location"),  # a JPEG below its class folder
             ("/r/Other/glioma/x.jpg", "unknown split folder 'Other'"),
             ("/r/Training/x.jpg", "unexpected location")],
            [], "<split>/<class>/<image>",
        ),
        (
            ["/r/glioma/a.jpg", "/r/pituitary_tumor/b.JPG", "/r/README.txt", "/r/glioma/.DS_Store", "/r/glioma/notes.txt"],
            [("/r/glioma/a.jpg", "glioma", "train", ""), ("/r/pituitary_tumor/b.JPG", "pituitary", "train", "")],
            [], ["/r/README.txt", "/r/glioma/.DS_Store", "/r/glioma/notes.txt"], "<class>/<image>",
        ),
    ],
)
def test_plan_inputs(files, planned, errors, ignored, layout):
    plan = plan_inputs(files, "/r")
    assert [(p.path, p.label, p.split, p.source_split) for p in plan.images] == planned
    assert len(plan.errors) == len(errors)
    for e, (path, reason) in zip(plan.errors, errors):
        assert e.path == path and reason in e.reason, (e, reason)
    assert plan.ignored == ignored and plan.layout == layout


# --- the schedule and the loss weights ------------------------------------------------------------------


@pytest.mark.parametrize(
    "warmup, total, min_ratio, step, lr",
    [
        (0, 10, 0.01, 0, 1.0),  # no warm-up: the cosine starts at 1
        (0, 10, 0.01, 5, 0.01 + 0.99 * 0.5),  # half way down
        (0, 10, 0.01, 10, 0.01),  # ends at min_ratio
        (0, 10, 0.01, 50, 0.01),  # and stays there
        (4, 14, 0.0, 0, 1 / 5),  # linear warm-up from ~0
        (4, 14, 0.0, 3, 4 / 5),
        (4, 14, 0.0, 4, 1.0),  # then the cosine from 1
        (4, 14, 0.1, 9, 0.1 + 0.9 * 0.5),
        (4, 14, 0.1, 14, 0.1),
    ],
)
def test_lr_lambda(warmup, total, min_ratio, step, lr):
    assert lr_lambda(warmup, total, min_ratio)(step) == pytest.approx(lr)


@pytest.mark.parametrize(
    "counts, mode, weights",
    [
        ([10, 10, 10, 10], "inverse", [1, 1, 1, 1]),
        ([10, 10, 10, 10], "sqrt", [1, 1, 1, 1]),
        ([0, 5, 20, 0], "inverse", [0, 1.6, 0.4, 0]),  # 1/n, mean 1 over the classes present
        ([4, 16, 0, 64], "sqrt", [x / (0.875 / 3) for x in (0.5, 0.25, 0, 0.125)]),  # 1/sqrt(n)
    ],
)
def test_class_weights(counts, mode, weights):
    w = class_weights(counts, mode)
    assert w.tolist() == pytest.approx(weights)
    present = [x for x, c in zip(w.tolist(), counts) if c]
    assert math.isclose(sum(present) / len(present), 1.0, rel_tol=1e-6)


# --- the staged writer ----------------------------------------------------------------------------------


def test_staged_writer_commits_whole_files_and_recovers(tmp_path):
    out = resolve(str(tmp_path / "preds"))
    writer = StagedWriter(out)
    assert writer.root.path == out.path + STAGING_SUFFIX  # beside the output, never inside it
    assert writer.recover() == {"committed_runs": 0, "dropped_runs": 0}

    run = writer.stage("run1")
    run.join("a.parquet").write_bytes(b"a")
    run.join("b.parquet").write_bytes(b"b")
    assert writer.commit(run) == 2
    assert sorted(os.listdir(out.path)) == ["a.parquet", "b.parquet"] and not run.exists()

    done, cut = writer.stage("run2"), writer.stage("run3")
    done.join("c.parquet").write_bytes(b"c")
    done.join(DONE_MARKER).write_bytes(b"")  # complete, cut off before its commit
    cut.join("d.parquet").write_bytes(b"d")  # cut off while writing: no marker
    # Recovery finishes only the run cut off on the output: the one whose commit began, or whose
    # (dead) lease it was; anything else in the staging is left alone.
    assert writer.recover() == {"committed_runs": 0, "dropped_runs": 0}
    writer.root.join("_committing.json").write_bytes(b'{"run": "run2"}')
    assert writer.recover() == {"committed_runs": 1, "dropped_runs": 0}
    _dead_lease(out, "run3")
    assert writer.recover() == {"committed_runs": 0, "dropped_runs": 1}
    assert sorted(os.listdir(out.path)) == ["a.parquet", "b.parquet", "c.parquet"]
    assert not os.listdir(writer.root.path)


def test_staged_derived_files_publish_with_the_rows_and_only_their_own_keys(tmp_path, caplog):
    """Derived files (a report in the output, a table in a sibling) ride the rows' commit: listed in
    the manifest's ``derived`` with their sha256 and ``of``; a commit without them drops the entries;
    a staged run whose derived entries name another path, or other bytes, publishes nothing."""
    from braintumor_ray.core import Manifest, files_digest

    out = resolve(str(tmp_path / "preds"))
    keys = ("_report.html", "_series/series.parquet")
    writer = StagedWriter(out, manifest=True, derived=keys)
    run = writer.stage("run1")
    run.join("a.parquet").write_bytes(b"a")
    writer.commit(run, derived={"_report.html": (b"<html>", {"settings": "s"}), keys[1]: (b"table", {"rows": 2})})
    assert (tmp_path / "preds" / "_report.html").read_bytes() == b"<html>"
    assert (tmp_path / "preds_series" / "series.parquet").read_bytes() == b"table" and not run.exists()
    doc = Manifest(out).read_doc()
    assert sorted(doc["files"]) == ["a.parquet"] and sorted(doc["derived"]) == sorted(keys)
    report = doc["derived"]["_report.html"]
    assert report["sha256"] == hashlib.sha256(b"<html>").hexdigest() and report["settings"] == "s"
    assert report["of"] == doc["derived"][keys[1]]["of"] == files_digest(doc["files"])
    with pytest.raises(Exception, match="not a derived file"):
        writer.commit(writer.stage("run2"), derived={"_manifest.json": (b"{}", {})})

    # Staged by hand, marked and named by the commit record: entries naming another path or other bytes.
    for i, (key, blob, listed) in enumerate([("../victim", b"x", b"x"), ("_report.html", b"forged", b"other")]):
        bad = writer.stage(f"bad{i}")
        bad.join("_derived", *key.split("/")).write_bytes(blob)
        entries = {"files": {}, "replace_all": False, "derived": {key: {"sha256": hashlib.sha256(listed).hexdigest()}}}
        bad.join("_ENTRIES.json").write_bytes(json.dumps(entries).encode())
        bad.join(DONE_MARKER).write_bytes(b"")
        writer.root.join("_committing.json").write_bytes(json.dumps({"run": f"bad{i}"}).encode())
        assert writer.recover() == {"committed_runs": 0, "dropped_runs": 0}
        assert "cannot be trusted" in caplog.text and bad.exists()
    assert (tmp_path / "preds" / "_report.html").read_bytes() == b"<html>" and not (tmp_path / "victim").exists()

    # A commit without derived files (an older version's, or another writer's) drops the entries.
    plain = StagedWriter(out, manifest=True)
    more = plain.stage("run3")
    more.join("b.parquet").write_bytes(b"b")
    plain.commit(more)
    assert Manifest(out).read_doc()["derived"] == {}


def test_staged_objects_publish_in_the_one_manifest_write_and_retire_only_their_own(tmp_path, caplog):
    """Objects (files of a sibling, OUTPUT_dicom/NAME) ride a run's commit: listed in the manifest's
    ``objects`` with their sha256 and kept by later commits until one retires them, which unlists
    and then deletes them; a commit of objects alone keeps the derived entries built from the same
    files; a staged run whose objects name another path, or other bytes, publishes nothing."""
    from braintumor_ray.core import Manifest

    out = resolve(str(tmp_path / "preds"))
    writer = StagedWriter(out, manifest=True, derived=("_report.html",), objects=("_dicom",))
    run = writer.stage("run1")
    run.join("a.parquet").write_bytes(b"a")
    writer.commit(run, derived={"_report.html": (b"<html>", {})}, objects={"_dicom/x.dcm": b"x", "_dicom/y.dcm": b"y"})
    doc = Manifest(out).read_doc()
    assert sorted(doc["objects"]) == ["_dicom/x.dcm", "_dicom/y.dcm"] and sorted(doc["files"]) == ["a.parquet"]
    assert doc["objects"]["_dicom/x.dcm"]["sha256"] == hashlib.sha256(b"x").hexdigest()
    assert (tmp_path / "preds_dicom" / "x.dcm").read_bytes() == b"x" and not run.exists()

    more = writer.stage("run2")  # rows and a report again: the objects stay listed
    more.join("b.parquet").write_bytes(b"b")
    writer.commit(more, derived={"_report.html": (b"<html2>", {})})
    assert sorted(Manifest(out).read_doc()["objects"]) == ["_dicom/x.dcm", "_dicom/y.dcm"]
    writer.commit(writer.stage("run3"), objects={"_dicom/z.dcm": b"z"}, retire=("_dicom/x.dcm",))  # objects alone
    doc = Manifest(out).read_doc()
    assert sorted(doc["objects"]) == ["_dicom/y.dcm", "_dicom/z.dcm"] and "_report.html" in doc["derived"]
    assert sorted(os.listdir(tmp_path / "preds_dicom")) == ["y.dcm", "z.dcm"]
    for bad in ("../x.dcm", "_series/t.parquet", "_dicom/_sent.json"):
        with pytest.raises(Exception, match="not an object"):
            writer.commit(writer.stage("run4"), objects={bad: b"q"})

    # Staged by hand, marked and named by the commit record: objects naming another path or other bytes.
    (tmp_path / "victim").write_bytes(b"theirs")
    for i, (key, blob, listed) in enumerate([("_dicom/../../victim", b"x", b"x"), ("_dicom/y.dcm", b"forged", b"y")]):
        bad = writer.stage(f"bad{i}")
        bad.join("_objects", *key.split("/")).write_bytes(blob)
        entries = {"files": {}, "replace_all": False, "objects": {key: {"sha256": hashlib.sha256(listed).hexdigest()}},
                   "retire": ["_dicom/../../victim"] if i == 0 else []}
        bad.join("_ENTRIES.json").write_bytes(json.dumps(entries).encode())
        bad.join(DONE_MARKER).write_bytes(b"")
        writer.root.join("_committing.json").write_bytes(json.dumps({"run": f"bad{i}"}).encode())
        assert writer.recover() == {"committed_runs": 0, "dropped_runs": 0}
        assert "cannot be trusted" in caplog.text and bad.exists()
    assert (tmp_path / "preds_dicom" / "y.dcm").read_bytes() == b"y" and (tmp_path / "victim").read_bytes() == b"theirs"


def test_remove_child_deletes_only_plain_children_of_the_output_and_its_siblings(tmp_path, caplog):
    from braintumor_ray.core import StorageError, remove_child

    out = resolve(str(tmp_path / "preds"))
    victim = tmp_path / "victim.parquet"
    victim.write_bytes(b"theirs")
    (tmp_path / "preds").mkdir()
    (tmp_path / "preds" / "a.parquet").write_bytes(b"a")
    os.symlink(victim, tmp_path / "preds" / "link.parquet")
    # Refused, with a warning, nothing deleted: a way out of the folder, a link, an absolute name.
    for name in ("../victim.parquet", "..", ".", str(victim), "sub/../../victim.parquet", "", "link.parquet"):
        assert remove_child(out, out, name) is False, name
    assert victim.read_bytes() == b"theirs" and os.path.islink(tmp_path / "preds" / "link.parquet")
    # A folder that is neither the output nor one of its siblings: a bug, refused outright.
    for folder in (resolve(str(tmp_path)), resolve(str(tmp_path / "other")), resolve(str(tmp_path / "preds2"))):
        with pytest.raises(StorageError, match="neither"):
            remove_child(out, folder, "victim.parquet")
    # A sibling that is a link to elsewhere is not followed.
    os.symlink(tmp_path, tmp_path / "preds_series")
    assert remove_child(out, resolve(str(tmp_path / "preds_series")), "victim.parquet") is False
    assert victim.exists()
    # What it is for: a plain file of the output, a staged run's folder.
    assert remove_child(out, out, "a.parquet") and not (tmp_path / "preds" / "a.parquet").exists()
    run = StagedWriter(out).stage("run1")
    run.join("x.parquet").write_bytes(b"x")
    assert remove_child(out, StagedWriter(out).root, "run1", tree=True) and not run.exists()
    assert remove_child(out, out, "gone.parquet")  # already gone: nothing to do


def test_remove_child_keeps_to_the_outputs_bucket_and_prefix_on_s3():
    from braintumor_ray.core import StorageError, remove_child

    out = resolve("s3://bucket/preds", s3_endpoint_url="http://127.0.0.1:9")  # never reached: refused first
    for other in ("s3://other/preds", "s3://bucket/elsewhere", "s3://bucket", "s3://bucket/preds/../x",
                  "s3://bucket/predsX"):
        with pytest.raises(StorageError, match="neither"):
            remove_child(out, resolve(other, s3_endpoint_url="http://127.0.0.1:9"), "a.parquet")
    for name in ("../x.parquet", "/bucket/x.parquet", "a/b.parquet", ".."):
        assert remove_child(out, out, name) is False


@pytest.mark.parametrize("uri", ["LOCAL/preds", "LOCAL/preds/", "s3://bucket/runs/preds", "s3://bucket/runs/preds/"])
def test_location_sibling_is_named_beside_the_output_whatever_its_trailing_slash(tmp_path, uri):
    from braintumor_ray.core import Location

    base = resolve(uri.replace("LOCAL", str(tmp_path)).rstrip("/"), s3_endpoint_url="http://127.0.0.1:9")
    out = base.join("") if uri.endswith("/") else base  # join("") keeps the slash that resolve drops
    assert out.uri.endswith("/") == uri.endswith("/")
    side = out.sibling("_series")
    assert isinstance(side, Location) and (side.fs, side.is_s3) == (out.fs, out.is_s3)
    assert side.uri == base.uri + "_series" and side.path == base.path + "_series"
    assert out.sibling("._lease.json").uri == base.uri + "._lease.json"
    assert side.uri.startswith("s3://bucket/runs/preds_") == uri.startswith("s3://")
    for bad in ("", "/x", "_a/b"):
        with pytest.raises(ValueError, match="sibling suffix"):
            out.sibling(bad)


def test_errors_for_handled_cases_carry_their_fields_across_processes():
    """The subclasses callers handle keep their kind (a caller catching StorageError or
    ConfigError still catches them) and their fields, also pickled (Ray sends a task's error to
    the driver that way)."""
    import pickle

    from braintumor_ray.core import (ConfigError, LeaseError, LeaseHeldError, LeaseLostError, NoSpaceError,
                                     PackageIntegrityError, StorageError)

    full = NoSpaceError("s3://b/preds")
    assert isinstance(full, StorageError) and str(full).startswith("no space left on the device holding s3://b/preds")
    held = LeaseHeldError("held", output="/o", holder="run-a", host="h", pid=7, expires="2026-01-01T00:00:00", waited_s=1.5)
    lost = LeaseLostError("lost", output="/o", owner="run-b", reason="the lease now names run-c")
    bad = PackageIntegrityError("bad", file="/p/model.onnx", expected="a" * 64, actual=None)
    assert isinstance(held, LeaseError) and isinstance(lost, LeaseError) and isinstance(bad, ConfigError)
    for e in (full, held, lost, bad):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and vars(back) == vars(e), e


def test_an_input_file_that_cannot_be_read_is_an_error_with_its_path_and_the_rows_cause(tmp_path):
    """Location.read_limited's failure is an UnreadableInputError (a StorageError) carrying the
    path it was asked for and the cause the file's error row gives; the message is that cause,
    which never quotes the path (a hashed path mode's rows and logs name no file); the fields
    survive pickling."""
    import pickle

    from braintumor_ray.core import StorageError, UnreadableInputError

    (tmp_path / "folder.dcm").mkdir()
    causes = {
        str(tmp_path / "gone.dcm"): "vanished: listed, then gone before it was read",
        str(tmp_path / "folder.dcm"): "unreadable: no longer a file (a folder now)",
    }
    for path, cause in causes.items():
        with pytest.raises(UnreadableInputError) as caught:
            resolve(str(tmp_path)).read_limited(path, 100)
        e = caught.value
        assert isinstance(e, StorageError) and e.path == path and e.cause.startswith(cause), e.cause
        assert str(e) == e.cause and path not in str(e)
        back = pickle.loads(pickle.dumps(e))
        assert (type(back), back.path, back.cause, str(back)) == (UnreadableInputError, path, e.cause, e.cause)


def test_objects_staged_as_files_are_hashed_one_by_one_published_by_the_commit_and_checked_on_recovery(
        tmp_path, monkeypatch, caplog):
    """Objects that others wrote into a run's folder (scoring's heat maps, by Ray actors):
    ``staged_objects`` hashes each file alone, the commit lists them with its rows in one manifest
    write and moves them into the sibling; a run cut off before its marker is dropped with them (none
    listed), one cut off mid-commit is finished by recovery, which checks each staged object's bytes
    first (a staged map rewritten meanwhile: nothing published)."""
    from braintumor_ray.core import Location, Manifest, StorageError

    out = resolve(str(tmp_path / "preds"))
    writer = StagedWriter(out, manifest=True, objects=("_explain",))
    run = writer.stage("run1")
    run.join("a.parquet").write_bytes(b"a")
    maps = writer.object_stage(run, "_explain")
    assert maps.path == str(tmp_path / "preds._staging" / "run1" / "_objects" / "_explain")
    for n in ("m1.png", "m2.png"):
        maps.join(n).write_bytes(n.encode())
    entries = writer.staged_objects(run, "_explain")
    assert {k: e["sha256"] for k, e in entries.items()} == {
        f"_explain/{n}": hashlib.sha256(n.encode()).hexdigest() for n in ("m1.png", "m2.png")}
    writer.commit(run, staged=entries)
    doc = Manifest(out).read_doc()
    assert sorted(doc["files"]) == ["a.parquet"] and sorted(doc["objects"]) == ["_explain/m1.png", "_explain/m2.png"]
    assert sorted(os.listdir(tmp_path / "preds_explain")) == ["m1.png", "m2.png"] and not run.exists()

    # Cut off before its marker: dropped whole by the run that takes over its lease, its map never listed.
    cut = writer.stage("run2")
    cut.join("b.parquet").write_bytes(b"b")
    writer.object_stage(cut, "_explain").join("m3.png").write_bytes(b"m3")
    _dead_lease(out, "run2")
    assert writer.recover() == {"committed_runs": 0, "dropped_runs": 1}
    assert sorted(Manifest(out).read_doc()["objects"]) == ["_explain/m1.png", "_explain/m2.png"]
    assert not (tmp_path / "preds_explain" / "m3.png").exists() and not cut.exists()

    # Cut off mid-commit (its first map moved in, the manifest not yet written).
    late = writer.stage("run3")
    late.join("c.parquet").write_bytes(b"c")
    for n in ("m4.png", "m5.png"):
        writer.object_stage(late, "_explain").join(n).write_bytes(n.encode())
    real_move = Location.move_to

    def killed(self, other):
        real_move(self, other)
        if other.path.endswith("m4.png"):
            raise KeyboardInterrupt("killed while committing")

    monkeypatch.setattr(Location, "move_to", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.commit(late, staged=writer.staged_objects(late, "_explain"))
    monkeypatch.setattr(Location, "move_to", real_move)
    assert "_explain/m4.png" not in Manifest(out).read_doc()["objects"]
    staged_m5 = writer.object_stage(late, "_explain").join("m5.png")
    staged_m5.write_bytes(b"forged")  # rewritten while it waited: recovery publishes nothing
    assert writer.recover() == {"committed_runs": 0, "dropped_runs": 0}
    assert "m5.png's bytes do not match its sha256" in caplog.text
    staged_m5.write_bytes(b"m5.png")
    assert writer.recover() == {"committed_runs": 1, "dropped_runs": 0}
    doc = Manifest(out).read_doc()
    assert sorted(doc["objects"]) == [f"_explain/m{i}.png" for i in (1, 2, 4, 5)] and "c.parquet" in doc["files"]
    assert doc["objects"]["_explain/m5.png"]["sha256"] == hashlib.sha256(b"m5.png").hexdigest()

    # Only plain names of the writer's own siblings are staged objects.
    odd = writer.stage("run4")
    writer.object_stage(odd, "_explain").join("sub", "x.png").write_bytes(b"x")
    with pytest.raises(StorageError, match="not an object"):
        writer.staged_objects(odd, "_explain")
    with pytest.raises(StorageError, match="not an object sibling"):
        writer.object_stage(odd, "_series")


def test_a_manifest_is_parsed_once_while_its_bytes_stay_the_same(tmp_path, monkeypatch):
    """A run reads OUTPUT/_manifest.json four or five times before its plan; with 100,000 maps
    listed each parse was 0.25 s. Parsed again only when its bytes change (a commit, a hand edit)."""
    import braintumor_ray.core._staging as staging_mod
    from braintumor_ray.core import Manifest

    out = resolve(str(tmp_path / "preds"))
    (tmp_path / "preds").mkdir()
    m = Manifest(out)
    m.write({"a.parquet": {"sha256": "1"}}, objects={"_explain/m.png": {"sha256": "2"}})
    parses = []
    real = staging_mod.json.loads
    monkeypatch.setattr(staging_mod.json, "loads", lambda raw: parses.append(1) or real(raw))
    assert m.read_doc()["objects"] == {"_explain/m.png": {"sha256": "2"}}
    assert m.read() == {"a.parquet": {"sha256": "1"}} and m.read_doc()["files"] == m.read() and len(parses) == 1
    m.write({"b.parquet": {"sha256": "3"}})
    assert m.read_doc() == {"files": {"b.parquet": {"sha256": "3"}}, "derived": {}, "objects": {}} and len(parses) == 2


def _dead_lease(output, owner: str) -> None:
    """The lease a killed run left behind: expired, its holder on no known machine."""
    from braintumor_ray.core import lease_location

    past = "2020-01-01T00:00:00+00:00"
    lease_location(output).write_bytes(json.dumps({"owner": owner, "host": "node-gone", "pid": 4242, "started": past,
                                                   "heartbeat": past, "expires": past, "ttl_s": 120.0}).encode())


# --- the training state ------------------------------------------------------------------------------------


def test_training_state_checkpoint_loads_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(1, 4, 0.1))
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched.step()
    state = TrainingState(epoch=2, history=[{"epoch": 1, "val_macro_f1": 0.5, "stopped_early": False}], best_f1=0.5,
                          best_epoch=1, best_model={k: v.clone() for k, v in model.state_dict().items()}, restores=[1])
    path = tmp_path / "state.pt"
    torch.save({**state.to_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": None}, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for k in ("model", "optimizer", "scheduler", "scaler"):
        saved.pop(k)
    back = TrainingState.from_dict(saved)
    assert back.epoch == 2 and back.history == state.history and back.restores == [1]
    assert torch.equal(back.best_model["weight"], state.best_model["weight"])


def test_train_one_epoch_updates_the_weight_average_after_each_optimizer_step():
    """EMA follows optimizer steps, not micro-batches: 5 batches at 2 micro-batches a step are 3
    updates (the last one partial), and the average then differs from the trained weights."""
    from timm.utils import ModelEmaV3

    from braintumor_ray.imaging import TrainAugment
    from braintumor_ray.train import train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
    ema = ModelEmaV3(model, decay=0.9, use_warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = [{"image": torch.randint(0, 255, (2, 4, 4), dtype=torch.uint8), "label": torch.tensor([0, 3])}
               for _ in range(5)]
    steps = []

    def update():
        steps.append(len(steps) + 1)
        ema.update(model, step=steps[-1])

    out = train_one_epoch(model, batches, criterion=torch.nn.CrossEntropyLoss(), optimizer=opt, scheduler=None,
                          prepare=lambda p: p.float() / 255, augment=TrainAugment(), generator=torch.Generator(),
                          device=torch.device("cpu"), grad_accum_steps=2, on_update=update)
    assert out["steps"] == 3 and steps == [1, 2, 3]
    trained, averaged = model.state_dict(), ema.module.state_dict()
    assert not torch.equal(trained["1.weight"], averaged["1.weight"])


# The training failure hook rides in every worker of the session's one Ray (tests/conftest.py), so
# it must stay inert for every run but the one it is armed for: (run, epoch, rank, world) -> fires?
HOOK = {"epoch": 2, "rank": 1, "step": 1, "name": "t"}
HOOK_CASES = [
    ("t", 2, 1, 2, True),
    ("t", 2, 0, 2, False),  # another rank
    ("t", 1, 1, 2, False),  # another epoch
    ("s3run", 2, 1, 2, False),  # another run: the MLflow/S3 training, the trials of a search
    ("trial_0001", 2, 0, 1, False),
    ("t", 2, 0, 1, True),  # one worker: the hook's rank is capped at the last rank
]


@pytest.mark.parametrize("run, epoch, rank, world, fires", HOOK_CASES)
def test_failure_hook_is_armed_for_one_run_only(tmp_path, monkeypatch, run, epoch, rank, world, fires):
    import json

    from braintumor_ray.train._loop import INJECT_FAILURE_ENV, _failure_hook

    marker = tmp_path / "fired"
    monkeypatch.setenv(INJECT_FAILURE_ENV, json.dumps(HOOK | {"marker": str(marker)}))
    hook = _failure_hook(epoch, rank, world, run)
    assert (hook is not None) == fires
    if fires:
        hook(0)  # not its step
        with pytest.raises(RuntimeError, match="injected failure"):
            hook(1)
        hook(1)  # once only: the marker now exists
        assert marker.exists()
    monkeypatch.delenv(INJECT_FAILURE_ENV)
    assert _failure_hook(epoch, rank, world, run) is None  # unset: never armed
