"""Identifiers in outputs: --path-mode full|relative|hashed and --uid-mode full|hashed.

PACS exports name folders after the patient ("DOE^JOHN_12345/..."): in hashed mode no output of
scoring or of the ingest may carry that name or a raw DICOM UID, while reruns still skip what is
done and a DICOM series still groups. Every file here is generated.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import generate_uid

from braintumor_ray import ConfigError, make_sample_dataset
from braintumor_ray.core import PATH_KEY_ENV, Identifiers
from braintumor_ray.ingest import IngestConfig, run_ingest
from braintumor_ray.score import SERIES_FILE, ScoreConfig, format_summary, run_scoring

from _images import head, jpeg_bytes
from generators.medical import dicom_bytes, head12, write_file

KEY = "4f1c" * 16  # 64 hex characters, as `openssl rand -hex 32` prints
OTHER_KEY = "9e07" * 16
PATIENT_DIR = "DOE^JOHN_73952468"
NAME_PARTS = ("DOE", "JOHN", "73952468")
TOKEN = re.compile(r"^hmac:[0-9a-f]{32}$")
UID = re.compile(r"^2\.25\.[1-9][0-9]*$")


def _hashed(root: str = "", key: str = KEY) -> Identifiers:
    return Identifiers.from_env("hashed", "hashed", root=root, env={PATH_KEY_ENV: key})


def _text(path: str) -> str:
    """A written file as text: Parquet cells (compressed pages hide strings from a byte search) or bytes."""
    if path.endswith(".parquet"):
        t = pq.read_table(path)
        return str(t.drop_columns([c for c in ("image",) if c in t.column_names]).to_pylist())
    return open(path, "rb").read().decode("latin-1")


def _assert_clean(text: str, secrets, where: str) -> None:
    for s in secrets:
        assert s not in text, f"{s!r} in {where}: {text[:300]}"


# --- the mapping (pure) -----------------------------------------------------------------------


def test_hashed_token_is_stable_keyed_and_carries_no_name():
    uri = f"s3://pacs/export/{PATIENT_DIR}/SER1/IM0001.dcm"
    a, b = _hashed("s3://pacs/export"), _hashed("s3://pacs/export")
    token = a.path(uri)
    assert token == b.path(uri) == a.path(uri), "same key, same file: same token in every run"
    assert TOKEN.match(token) and not any(p in token for p in NAME_PARTS + (".dcm", "IM0001"))
    assert _hashed("s3://pacs/export", OTHER_KEY).path(uri) != token, "another key names the file anew"
    assert a.path(uri.replace("IM0001", "IM0002")) != token
    # UIDs: a valid UID (2.25 root, at most 64 characters), equal for equal input, keyed.
    raw = "1.2.826.0.1.3680043.8.498.10371981276534"
    uid = a.uid(raw)
    assert UID.match(uid) and len(uid) <= 64 and uid == b.uid(raw) and raw not in uid
    assert _hashed(key=OTHER_KEY).uid(raw) != uid and a.uid(None) is None
    assert int(a.uid(uri)[5:]) != int(token[5:], 16), "paths and UIDs hash in separate domains"
    # The key is never shown: not in the repr, not in what outputs record (only a key id).
    assert KEY not in repr(a) and KEY not in json.dumps(a.describe())
    assert a.describe() == {"path_mode": "hashed", "uid_mode": "hashed", "key_id": a.key_id}
    assert a.key_id != _hashed(key=OTHER_KEY).key_id


def test_full_and_relative_modes():
    full = Identifiers.from_env("full", "full", root="/data/pacs", env={})  # no key needed
    assert full.path(f"/data/pacs/{PATIENT_DIR}/a.dcm") == f"/data/pacs/{PATIENT_DIR}/a.dcm" and full.uid("1.2.3") == "1.2.3"
    assert full.describe()["key_id"] is None
    rel = Identifiers.from_env("relative", root="s3://pacs/export/", env={})
    assert rel.path("s3://pacs/export/SER1/IM0001.dcm") == "SER1/IM0001.dcm"
    local = Identifiers("relative", root="/data/pacs")
    assert local.path("/data/pacs/SER1/x.dcm") == "SER1/x.dcm"
    assert local.path("/data/pacsX/y.dcm") == "y.dcm", "a sibling folder is not below the root: no folders shown"


@pytest.mark.parametrize("env, cause", [({}, "is not set"), ({PATH_KEY_ENV: "short-key"}, "9 characters")])
def test_hashed_mode_without_a_usable_key_says_how_to_set_one(env, cause):
    for modes in (("hashed", "full"), ("full", "hashed")):
        with pytest.raises(ConfigError, match=cause) as e:
            Identifiers.from_env(*modes, env=env)
        assert PATH_KEY_ENV in str(e.value) and "openssl rand" in str(e.value) and "short-key" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown"):
        Identifiers.from_env("hash", env={PATH_KEY_ENV: KEY})
    for cls, kw in ((ScoreConfig, dict(model="m")), (IngestConfig, {})):
        with pytest.raises(ConfigError, match="path_mode='salted'"):
            cls(input="a", output="b", path_mode="salted", **kw)
        with pytest.raises(ConfigError, match="uid_mode='relative'"):
            cls(input="a", output="b", uid_mode="relative", **kw)


def test_messages_lose_the_path_and_the_names_in_it():
    uri = f"/data/pacs/{PATIENT_DIR}/SER1/IM0001.dcm"
    msg = f"cannot read {uri}: gone; folder {PATIENT_DIR!r}, patient JOHN, see dcmread"
    ids = _hashed("/data/pacs")
    out = ids.scrub(msg, uri)
    _assert_clean(out, NAME_PARTS + (uri,), "a hashed message")
    assert ids.path(uri) in out and "dcmread" in out, "whole words only: other words survive"
    rel = Identifiers("relative", root="/data/pacs").scrub(msg, uri)
    assert "/data/pacs" not in rel and f"{PATIENT_DIR}/SER1/IM0001.dcm" in rel
    assert Identifiers().scrub(msg, uri) == msg


# --- scoring and the ingest on an export named after the patient -----------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An archive whose patient folder is named after the patient: JPEGs, a two-file DICOM series
    (with and without .dcm) and a broken DICOM file."""
    base = tmp_path_factory.mktemp("pathmode")
    root = str(base / "archive")
    study, series = generate_uid(), generate_uid()
    sops = []
    for i, name in enumerate(["IM0001.dcm", "IM0002"]):
        data = dicom_bytes(head12(i), series=series, study=study, instance=i + 1, window=(1500, 3000))
        write_file(f"{root}/{PATIENT_DIR}/SER1/{name}", data)
        sops.append(str(pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID))
    write_file(f"{root}/{PATIENT_DIR}/SER1/{PATIENT_DIR}_broken.dcm", dicom_bytes(head12(5), series=series, study=study)[:-900])
    for i in range(2):
        write_file(f"{root}/{PATIENT_DIR}/photos/DOE_JOHN_{i}.jpg", jpeg_bytes(head("glioma", seed=i, size=96)[0]))
    uids = (study, series, *sops)
    return base, root, uids


@pytest.fixture(scope="module")
def hashed_scoring(ray_session, package, export):
    base, root, uids = export
    out = str(base / "predictions")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PATH_KEY_ENV, KEY)
        cfg = ScoreConfig(model=package, input=root, output=out, batch_size=8, path_mode="hashed", uid_mode="hashed")
        first = run_scoring(cfg)
        again = run_scoring(cfg)
    return out, cfg, first, again


def test_hashed_scoring_writes_no_name_and_no_raw_uid(hashed_scoring, export):
    base, root, uids = export
    out, cfg, first, again = hashed_scoring
    secrets = NAME_PARTS + uids + (KEY,)
    rows = pads.dataset(out, format="parquet").to_table().to_pylist()
    assert len({r["path"] for r in rows}) == first["files_seen"] == 5 and first["errors"] == 1
    assert all(TOKEN.match(r["path"]) for r in rows), "every path is a token"
    dicom = [r for r in rows if r["sop_instance_uid"]]
    assert len(dicom) == 3 and all(UID.match(r[k]) for r in dicom for k in ("sop_instance_uid", "series_instance_uid", "study_instance_uid"))
    assert {r["series_instance_uid"] for r in dicom} == {_hashed().uid(uids[1])}, "the same key gives the same UID"
    _assert_clean(str(rows), secrets, "the predictions")
    series = pq.read_table(os.path.join(out + "_series", SERIES_FILE)).to_pylist()
    assert len(series) == 1 and series[0]["slices_scored"] == 2 and series[0]["slices_failed"] == 1, "the series still groups"
    _assert_clean(str(series), secrets, "the series table")
    # Every file the runs wrote beside the rows: _config.yaml, _identifiers.json, the series table.
    written = [p for p in glob.glob(f"{out}*/**/*", recursive=True) if os.path.isfile(p)]
    assert any(p.endswith("_config.yaml") for p in written) and any(p.endswith("_identifiers.json") for p in written)
    for p in written:
        _assert_clean(_text(p), secrets, p)
    _assert_clean(json.dumps(first, default=str) + format_summary(first), secrets, "the summary")
    # The rerun maps the listing the same way: nothing is scored twice.
    assert again["scored"] == again["errors"] == 0 and again["skipped_already_scored"] == 5
    assert pads.dataset(out, format="parquet").count_rows() == len(rows)


def test_another_mode_or_key_on_the_output_is_refused(hashed_scoring, package, monkeypatch):
    out, cfg, first, _ = hashed_scoring
    n = pads.dataset(out, format="parquet").count_rows()
    with pytest.raises(ConfigError, match="path_mode=hashed, uid_mode=hashed.*--path-mode hashed"):
        run_scoring(ScoreConfig(model=package, input=cfg.input, output=out))  # full: every file again
    monkeypatch.setenv(PATH_KEY_ENV, OTHER_KEY)
    with pytest.raises(ConfigError, match="another key") as e:
        run_scoring(cfg)
    assert OTHER_KEY not in str(e.value) and KEY not in str(e.value)
    assert pads.dataset(out, format="parquet").count_rows() == n, "nothing was added"


def test_hashed_ingest_names_no_file_and_keeps_series_together(ray_session, export, monkeypatch, tmp_path):
    base, _, _ = export
    root = str(base / "raw")
    make_sample_dataset(root, per_class=2, test_per_class=0, leaks=0, size=64, seed=3)
    series = generate_uid()
    for i in range(3):
        write_file(f"{root}/Training/glioma_tumor/{PATIENT_DIR}/SER1/IM{i}.dcm", dicom_bytes(head12(40 + i), series=series, instance=i + 1))
    write_file(f"{root}/Training/glioma_tumor/{PATIENT_DIR}/SER1/broken.dcm", dicom_bytes(head12(7))[:-900])
    # A folder where a class should be: the listing's error quotes the folder's name.
    write_file(f"{root}/Training/{PATIENT_DIR}/scan.jpg", jpeg_bytes(head("glioma", seed=8, size=64)[0]))
    monkeypatch.setenv(PATH_KEY_ENV, KEY)
    out = str(tmp_path / "pre")
    report = run_ingest(IngestConfig(input=root, output=out, val_fraction=0.5, near_dup_distance=-1, path_mode="hashed", uid_mode="hashed"))
    assert report["identifiers"] == _hashed().describe() and len(report["errors"]) == 2
    assert all(TOKEN.match(e["path"]) for e in report["errors"])
    rows = pads.dataset(f"{out}/images", format="parquet", partitioning="hive").to_table().to_pylist()
    dicom = [r for r in rows if r["series_instance_uid"] == _hashed().uid(series)]
    assert len(dicom) == 3 and len({r["split"] for r in dicom}) == 1, "the split grouped the series before hashing"
    assert all(TOKEN.match(r["path"]) for r in rows)
    secrets = NAME_PARTS + (series, KEY)
    written = [p for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.isfile(p)]
    assert any(p.endswith("errors.parquet") for p in written) and any(p.endswith("report.json") for p in written)
    for p in written:
        _assert_clean(_text(p), secrets, p)
    _assert_clean(json.dumps(report), secrets, "report.json")
