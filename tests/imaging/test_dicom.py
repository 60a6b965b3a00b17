"""DICOM and NIfTI input: pixel handling, series selection, scoring slice by slice with the
per-series table, the ingest, and that no identifying tag value leaves through any output.

Every file is generated (tests/generators/medical.py, pydicom and nibabel); no real patient data is involved.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from braintumor_ray import ConfigError, MRIPreprocess, make_sample_dataset
from braintumor_ray.imaging import SeriesSelector, percentile_window, read_medical, sniff_kind, voi_window
from braintumor_ray.score import SERIES_FILE, series_location, series_verdict, top_slice
from braintumor_ray.ingest import IngestConfig, run_ingest
from braintumor_ray.score import PROB_PREFIX, ScoreConfig, run_scoring
from braintumor_ray.core import resolve

from _images import jpeg_bytes
from conftest import load_job
from generators.medical import (
    CORONAL,
    PATIENT_ID,
    PATIENT_NAME,
    SAGITTAL,
    SECRETS,
    dicom_bytes,
    head12,
    make_pacs,
    nifti_bytes,
    undecodable,
    write_file,
)

import pydicom  # noqa: E402  (a core dependency: a missing one fails, never skips)
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid  # noqa: E402

BIG = 10**8  # max_pixels for the unit tests


def grey(data: bytes, **kw) -> list:
    return read_medical(data, sniff_kind(data, kw.pop("name", "")), max_pixels=BIG, **kw)


# --- pixels, against values computed by hand ---------------------------------------------------


def test_rescale_then_window_16_bit():
    # Stored 0, 100, 200, 300, 4095 -> slope 2, intercept -1024 -> -1024, -824, -624, -424, 7166.
    # Window centre -700, width 400 (PS3.3 C.11.2.1.2.1): black at <= -900, white above -501,
    # between: ((x + 700.5) / 399 + 0.5) * 255:
    #   -824 -> (-123.5 / 399 + 0.5) * 255 = 48.57 -> 49;  -624 -> (76.5 / 399 + 0.5) * 255 = 176.39 -> 176.
    stored = np.array([[0, 100, 200, 300, 4095]] * 4, np.uint16)
    (s,) = grey(dicom_bytes(stored, bits_stored=16, rescale=(2, -1024), window=(-700, 400)))
    assert s.gray.dtype == np.uint8 and s.mode == "DICOM MONOCHROME2 16-bit"
    assert s.gray[0].tolist() == [0, 49, 176, 255, 255]


def test_signed_16_bit_with_rescale():
    # Signed stored -2000, -1000, 0, 1000 -> slope 1, intercept 1000 -> -1000, 0, 1000, 2000;
    # window centre 500.5, width 2001: ((x - 500) / 2000 + 0.5) * 255 -> 0, 63.75, 191.25, 255.
    stored = np.array([[-2000, -1000, 0, 1000]] * 4, np.int16)
    (s,) = grey(dicom_bytes(stored, bits_stored=16, signed=True, rescale=(1, 1000), window=(500.5, 2001)))
    assert s.gray[0].tolist() == [0, 64, 191, 255]


def test_monochrome1_is_inverted_after_the_window():
    # Window 100.5/201: ((x - 100) / 200 + 0.5) * 255 -> 0:0, 50:63.75, 100:127.5, 200:255;
    # rounded half up 0, 64, 128, 255; MONOCHROME1 (high = dark) then 255 - y.
    stored = np.array([[0, 50, 100, 200]] * 4, np.uint16)
    (m2,) = grey(dicom_bytes(stored, window=(100.5, 201)))
    (m1,) = grey(dicom_bytes(stored, window=(100.5, 201), photometric="MONOCHROME1"))
    assert m2.gray[0].tolist() == [0, 64, 128, 255]
    assert m1.gray[0].tolist() == [255, 191, 127, 0]


def test_12_bit_without_a_window_uses_the_percentile_window():
    # A ramp 0..4095 over 4096 pixels: the 0.5 and 99.5 percentiles are 20.475 and 4074.525,
    # so 0 -> 0, 2048 -> (2048 - 20.475) * 255 / 4054.05 = 127.53 -> 128, 4095 -> 255.
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    (s,) = grey(dicom_bytes(ramp))
    assert s.gray.flat[0] == 0 and s.gray.flat[2048] == 128 and s.gray.flat[4095] == 255
    assert s.gray.flat[20] == 0 and s.gray.flat[4075] == 255  # clipped outside the window
    assert np.array_equal(percentile_window(ramp.astype(float)), s.gray)


def test_window_functions():
    x = np.array([-10.0, 0.0, 10.0])
    assert voi_window(x, 0, 20, "LINEAR_EXACT").tolist() == [0, 128, 255]  # (x/20 + 0.5) * 255
    assert voi_window(x, 0, 20, "SIGMOID").tolist() == [30, 128, 225]  # 255 / (1 + e^(-4x/20))
    assert voi_window(np.array([0.0, 1.0]), 1, 1).tolist() == [0, 255]  # width 1: a threshold


def test_compressed_syntaxes_decode_to_the_same_pixels():
    pixels = head12(3)
    plain = grey(dicom_bytes(pixels))[0].gray
    for syntax in (RLELossless, JPEG2000Lossless):
        data = dicom_bytes(pixels, syntax=syntax)
        assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(grey(data)[0].gray, plain), syntax.name


def test_multi_frame_file_is_one_slice_per_frame():
    frames = np.stack([head12(i) for i in range(3)])
    slices = grey(dicom_bytes(frames))
    assert [s.info.slice_index for s in slices] == [0, 1, 2]
    assert len({s.info.sop_instance_uid for s in slices}) == 1


def test_bad_dicom_files_name_their_cause_and_keep_their_uids():
    pre = MRIPreprocess(image_size=32)
    good = dicom_bytes(head12(1), series="1.2.3.4", instance=7)
    r = pre.try_slices(undecodable(head12(1)))
    assert "1.2.840.10008.1.2.4.100" in r.error and "MPEG2" in r.error and "cannot be decoded" in r.error
    r = pre.try_slices(dicom_bytes(head12(1), with_pixels=False, series="1.2.3.4"))
    assert "no pixel data" in r.error and r.info.series_instance_uid == "1.2.3.4"
    r = pre.try_slices(good[:-500])
    assert "truncated" in r.error and r.info.instance_number == 7
    r = pre.try_slices(good[:300])  # cut inside the header
    assert "truncated or corrupt DICOM" in r.error
    r = pre.try_slices(good[:600])  # cut before the pixels: read, but an image object without them
    assert "no pixel data" in r.error and "truncated" in r.error
    assert sniff_kind(good[:300]) == "dicom" and sniff_kind(b"", "x.dcm") == "dicom"


def test_malformed_uid_values_are_not_copied_out():
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(head12(1))))
    ds.SeriesInstanceUID = PATIENT_NAME  # garbage where a UID belongs
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    (s,) = grey(buf.getvalue())
    assert s.info.series_instance_uid is None and s.info.sop_instance_uid


def test_nifti_volume_slices_along_the_last_axis_in_display_orientation():
    # RAS voxel axes (identity affine): slice k is data[:, :, k]; shown axial with anterior up
    # and the patient's right on the left, i.e. rows = -y, columns = -x.
    vol = np.zeros((40, 30, 5), np.int16)
    vol[5:35, 5:25, :] = 100
    vol[30:35, 20:25, :] = 1000  # the right (high x), anterior (high y) corner
    data = nifti_bytes(vol)
    slices = grey(data, name="v.nii")
    assert [s.info.slice_index for s in slices] == [0, 1, 2, 3, 4] and slices[0].gray.shape == (30, 40)
    bright = np.argwhere(slices[2].gray == slices[2].gray.max())
    assert bright[:, 0].max() < 10 and bright[:, 1].max() < 10, "the anterior-right corner shows top left"
    assert sniff_kind(data) == "nifti" and sniff_kind(gzip.compress(data)) == "nifti"
    gz = grey(gzip.compress(data), name="v.nii.gz")
    assert all(np.array_equal(a.gray, b.gray) for a, b in zip(slices, gz))
    # cal_min/cal_max is the window when the header sets it: 0..200 -> 100 is mid-grey.
    (s,) = grey(nifti_bytes(np.full((8, 8, 1), 100, np.int16), cal=(0, 200)))
    assert s.gray[0, 0] == 128


def test_nifti_4d_and_garbage_are_errors():
    pre = MRIPreprocess(image_size=32)
    assert "4-D NIfTI" in pre.try_slices(nifti_bytes(np.zeros((8, 8, 4, 3), np.float32)), name="f.nii").error
    assert "corrupt NIfTI" in pre.try_slices(b"not a volume" * 50, name="x.nii").error
    truncated = nifti_bytes(np.ones((32, 32, 8), np.float32), gz=True)
    assert "NIfTI" in pre.try_slices(truncated[: len(truncated) // 2], name="x.nii.gz").error


def test_selector_validates_and_selects():
    for bad in (dict(orientations=("oblique",)), dict(series_description="("), dict(modalities=("M R",))):
        with pytest.raises(ConfigError):
            SeriesSelector(**bad)
    with pytest.raises(ConfigError, match="SeriesSelector"):
        ScoreConfig(model="m", input="i", output="o", select="axial")
    sel = SeriesSelector(modalities=("mr",), series_description="t1", orientations=("Axial",))
    assert sel.modalities == ("MR",) and sel.orientations == ("axial",)
    assert sel.describe() == "modality=MR;series_description=t1;orientation=axial"
    pre = MRIPreprocess(image_size=32)
    assert len(pre.try_slices(dicom_bytes(head12(1)), select=sel).slices) == 1
    assert "orientation sagittal" in pre.try_slices(dicom_bytes(head12(1), orientation=SAGITTAL), select=sel).skipped
    assert "orientation coronal" in pre.try_slices(dicom_bytes(head12(1), orientation=CORONAL), select=sel).skipped
    assert "modality CT" in pre.try_slices(dicom_bytes(head12(1), modality="CT"), select=sel).skipped
    r = pre.try_slices(dicom_bytes(head12(1), description="FLAIR"), select=sel)
    assert "does not match" in r.skipped and "FLAIR" not in r.skipped
    assert len(pre.try_slices(jpeg_bytes(np.full((32, 32), 99, np.uint8)), select=sel).slices) == 1  # images always pass
    sag = np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # slice axis along x
    assert "orientation sagittal" in pre.try_slices(nifti_bytes(np.ones((8, 8, 3), np.int16), affine=sag), select=sel).skipped


_job = load_job


def test_job_options_build_the_selector_and_refuse_bad_ones(capsys):
    from braintumor_ray.cli import build_config
    from braintumor_ray.score import ScoreConfig

    score = _job("score")
    parse = score.get_args_parser().parse_args
    args = parse(["--model", "m", "--input", "i", "--output", "o", "--orientation", "axial,Coronal", "--dicom-modality", "mr,CT", "--series-description", "T1"])
    assert build_config(ScoreConfig, args).select == SeriesSelector(modalities=("MR", "CT"), series_description="T1", orientations=("axial", "coronal"))
    assert build_config(ScoreConfig, parse(["--model", "m", "--input", "i", "--output", "o"])).select == SeriesSelector()
    assert score.main(["--model", "m", "--input", "i", "--output", "o", "--orientation", "oblique"]) == 2
    assert "orientation 'oblique' is not one of axial, coronal, sagittal" in capsys.readouterr().err
    assert _job("preprocess").main(["--input", "i", "--output", "o", "--series-description", "(T1"]) == 2
    assert "not a valid regular expression" in capsys.readouterr().err


def test_series_label_is_the_most_confident_tumour_slice():
    # classes: glioma, meningioma, no_tumor, pituitary
    p = np.array([[0.05, 0.05, 0.85, 0.05], [0.60, 0.10, 0.25, 0.05], [0.10, 0.70, 0.15, 0.05], [0.02, 0.02, 0.95, 0.01]])
    assert top_slice(p, 2) == (2, 1)  # meningioma at 0.70 on slice 2, though no_tumor reaches 0.95
    assert top_slice(p[[0, 3]], 2) == (1, 2)  # no tumour slice at all: the surest no_tumor slice
    assert top_slice(p, None) == (3, 2)


# --- scoring and ingest end to end ------------------------------------------------------------


def _rows(folder: str) -> list[dict]:
    return pads.dataset(folder, format="parquet").to_table().to_pylist()


def _series_rows(out: str) -> list[dict]:
    return pq.read_table(os.path.join(out + "_series", SERIES_FILE)).to_pylist()


def _ray_logs() -> list[str]:
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    return [p for p in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True) if os.path.isfile(p)]


def assert_no_patient_data(paths: list[str], *texts: str) -> None:
    """No planted value in any file's bytes, any Parquet cell, or the given texts."""
    for path in paths:
        blob = open(path, "rb").read()
        for secret in SECRETS:
            assert secret.encode() not in blob, f"{secret!r} in {path}"
        if path.endswith(".parquet"):
            cells = str(pq.read_table(path).to_pylist())
            assert not any(s in cells for s in SECRETS), path
    for text in texts:
        assert not any(s in text for s in SECRETS), text[:300]


@pytest.fixture(scope="module")
def scored(ray_session, package, tmp_path_factory):
    base = tmp_path_factory.mktemp("dicom")
    archive, out = str(base / "pacs"), str(base / "predictions")
    pacs = make_pacs(archive)
    summary = run_scoring(ScoreConfig(model=package, input=archive, output=out, batch_size=8))
    return archive, out, pacs, summary


def test_every_file_and_slice_has_a_row_with_its_uids(scored):
    archive, out, pacs, summary = scored
    rows = _rows(out)
    f = pacs["files"]
    by_path: dict[str, list] = {}
    for r in rows:
        by_path.setdefault(r["path"], []).append(r)
    assert len(by_path) == 4 + 2 + 1 + 2 + 5 == summary["files_seen"]
    assert len(rows) == 4 + 2 + 3 + 2 + 5
    for i, p in enumerate(f["axial"]):
        (r,) = by_path[p]
        assert r["status"] == "ok" and r["series_instance_uid"] == pacs["axial"] and r["study_instance_uid"] == pacs["study"]
        assert r["instance_number"] == i + 1 and r["sop_instance_uid"] and r["slice_index"] is None
    nifti = sorted(by_path[f["nifti"]], key=lambda r: r["slice_index"])
    assert [r["slice_index"] for r in nifti] == [0, 1, 2] and all(r["status"] == "ok" for r in nifti)
    assert all(r["series_instance_uid"] is None and r["sop_instance_uid"] is None for r in nifti)
    for p in f["jpeg"]:
        (r,) = by_path[p]
        assert r["status"] == "ok" and r["sop_instance_uid"] is None and r["instance_number"] is None
    bad = {name: by_path[p][0] for name, p in f["bad"].items()}
    assert bad["rle.dcm"]["status"] == "ok"
    assert "no pixel data" in bad["nopixels.dcm"]["error"] and bad["nopixels.dcm"]["series_instance_uid"] == pacs["axial"]
    assert "truncated" in bad["truncated"]["error"]
    assert "1.2.840.10008.1.2.4.100" in bad["mpeg.dcm"]["error"]
    assert "not an image" in bad["notes"]["error"]
    assert summary["scored"] == 4 + 2 + 3 + 2 + 1 and summary["errors"] == 4 and summary["not_selected"] == 0


def test_series_table_aggregates_the_slices(scored):
    archive, out, pacs, summary = scored
    rows = [r for r in _rows(out) if r["status"] == "ok"]
    series = {r["series_instance_uid"] or r["volume_path"]: r for r in _series_rows(out)}
    assert set(series) == {pacs["axial"], pacs["sagittal"], pacs["rle"], pacs["files"]["nifti"]} and summary["series"] == 4
    names = [c[len(PROB_PREFIX):] for c in rows[0] if c.startswith(PROB_PREFIX)]
    for key, s in series.items():
        mine = [r for r in rows if key in (r["series_instance_uid"], r["path"]) and (r["series_instance_uid"] or r["slice_index"] is not None)]
        mine.sort(key=lambda r: (r["instance_number"] or 0, r["slice_index"] or 0))
        p = np.array([[r[PROB_PREFIX + c] for c in names] for r in mine])
        assert s["slices_scored"] == len(mine) and s["study_instance_uid"] == (None if key == pacs["files"]["nifti"] else pacs["study"])
        for k, c in enumerate(names):
            assert s["max_" + PROB_PREFIX + c] == pytest.approx(p[:, k].max(), abs=1e-6)
            assert s["mean_" + PROB_PREFIX + c] == pytest.approx(p[:, k].mean(), abs=1e-6)
        head = np.array([r.get("head_fraction") or 1.0 for r in mine])
        ood = np.array([r.get("review_reason") == "out_of_distribution" for r in mine])
        v = series_verdict(p, head_fraction=head, ood=ood, no_tumor=names.index("no_tumor"))
        assert s["slices_voting"] == v.voting and s["review_reason"] == v.review_reason
        if v.label is not None:
            row, cls = v.top_slice, v.label
            assert s["predicted_label"] == names[cls] and s["top_probability"] == pytest.approx(p[row, cls], abs=1e-6)
            assert s["top_slice_path"] == mine[row]["path"] and s["confidence"] == pytest.approx(v.confidence, abs=1e-6)
    assert series[pacs["axial"]]["slices_scored"] == 4 and series[pacs["axial"]]["slices_failed"] == 3  # the bad ones
    assert series[pacs["files"]["nifti"]]["top_slice_index"] in (0, 1, 2)
    # The predictions folder reads as one table still (the series table lives beside it).
    assert pads.dataset(out, format="parquet").to_table().num_rows == len(_rows(out))


def test_rerun_adds_a_slice_and_the_series_table_follows(scored, package):
    archive, out, pacs, first = scored
    again = run_scoring(ScoreConfig(model=package, input=archive, output=out))
    assert again["scored"] == again["errors"] == 0 and again["series"] == 4
    write_file(f"{archive}/PAT1/STUDY1/SER1/IM0099", dicom_bytes(head12(9), series=pacs["axial"], study=pacs["study"], instance=5, window=(1500, 3000)))
    third = run_scoring(ScoreConfig(model=package, input=archive, output=out))
    assert third["scored"] == 1
    series = {r["series_instance_uid"] or r["volume_path"]: r for r in _series_rows(out)}
    assert series[pacs["axial"]]["slices_scored"] == 5 and len(series) == 4


def test_series_selector_skips_and_a_new_selector_looks_again(scored, package):
    archive, predictions, pacs, _ = scored
    out = os.path.join(os.path.dirname(predictions), "axial-mr")  # beside: the privacy check reads it too
    sel = SeriesSelector(modalities=("MR",), orientations=("axial",))
    summary = run_scoring(ScoreConfig(model=package, input=archive, output=out, select=sel))
    rows = _rows(out)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["path"] for r in skipped} == set(pacs["files"]["sagittal"]) and summary["not_selected"] == 2
    assert all("orientation sagittal" in r["error"] and r["predicted_label"] is None for r in skipped)
    assert {r["selection"] for r in rows} == {"modality=MR;orientation=axial"}
    assert {r["series_instance_uid"] for r in _series_rows(out)} == {pacs["axial"], pacs["rle"], None}  # the NIfTI is axial
    again = run_scoring(ScoreConfig(model=package, input=archive, output=out, select=sel))
    assert again["scored"] == again["not_selected"] == 0, "left-out files are done for the same selector"
    wider = run_scoring(ScoreConfig(model=package, input=archive, output=out))
    assert wider["scored"] == 2 and wider["not_selected"] == 0


def test_no_patient_data_in_outputs_logs_or_errors(scored, package, caplog):
    archive, out, pacs, _ = scored
    caplog.set_level(logging.DEBUG)
    # This run has nothing left to score, but it rebuilds the series table (its log lines too).
    os.remove(os.path.join(out + "_series", SERIES_FILE))
    run_scoring(ScoreConfig(model=package, input=archive, output=out))
    # Every output this module's runs wrote (the earlier tests' included), and Ray's worker logs.
    base = os.path.dirname(out)
    files = [p for p in glob.glob(f"{base}/**/*", recursive=True) if os.path.isfile(p) and "/pacs/" not in p]
    assert any(p.endswith(SERIES_FILE) for p in files)
    errors = " ".join(str(r["error"]) for r in _rows(out))
    assert_no_patient_data(files + _ray_logs(), caplog.text, errors)
    # The planted values are there to be found: the check above can fail.
    assert PATIENT_ID.encode() in open(pacs["files"]["axial"][0], "rb").read()


def test_ingest_reads_dicom_and_nifti_beside_jpeg(ray_session, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    root = tmp_path / "raw"
    make_sample_dataset(str(root), per_class=3, test_per_class=0, leaks=0, size=64, seed=4)
    train = root / "Training"
    series = generate_uid()
    for i in range(3):  # a glioma DICOM series, nested as exports nest it, one file without extension
        name = f"IM{i}" if i else f"{i}.dcm"
        write_file(str(train / "glioma_tumor" / "PAT9" / "SER1" / name), dicom_bytes(head12(50 + i), series=series, instance=i + 1))
    vol = np.stack([head12(60 + k, label="pituitary") for k in range(4)], axis=-1)
    write_file(str(train / "pituitary_tumor" / "vol.nii"), nifti_bytes(vol.astype(np.int16)))
    write_file(str(train / "glioma_tumor" / "PAT9" / "README"), b"export notes\n")
    write_file(str(train / "glioma_tumor" / "PAT9" / "broken.dcm"), dicom_bytes(head12(3))[:-900])
    write_file(str(train / "glioma_tumor" / "PAT9" / "sagittal.dcm"), dicom_bytes(head12(4), orientation=SAGITTAL))
    out = str(tmp_path / "pre")
    report = run_ingest(IngestConfig(input=str(root), output=out, val_fraction=0.5, near_dup_distance=-1, select=SeriesSelector(orientations=("axial",))))
    rows = pads.dataset(f"{out}/images", format="parquet", partitioning="hive").to_table().to_pylist()
    dicom = [r for r in rows if r["series_instance_uid"] == series]
    assert len(dicom) == 3 and {r["label"] for r in dicom} == {"glioma"} and len({r["split"] for r in dicom}) == 1
    assert sorted(r["instance_number"] for r in dicom) == [1, 2, 3]
    vol_rows = [r for r in rows if r["path"].endswith("vol.nii")]
    assert sorted(r["slice_index"] for r in vol_rows) == [0, 1, 2, 3] and len({r["split"] for r in vol_rows}) == 1
    assert all(len(r["image"]) == 224 * 224 for r in dicom + vol_rows)
    assert report["counts"]["images_ok"] == 12 + 3 + 4 and report["counts"]["not_selected"] == 1
    assert [os.path.basename(e["path"]) for e in report["errors"]] == ["broken.dcm"]
    assert report["counts"]["ignored_files"] == 1  # the README without an extension
    files = [p for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.isfile(p)]
    assert_no_patient_data(files, caplog.text, json.dumps(report))


def _dicom_objects(out: str) -> dict:
    """The DICOM objects the output's one manifest lists (key ``_dicom/NAME`` -> its entry)."""
    objects = json.loads(open(os.path.join(out, "_manifest.json")).read()).get("objects", {})
    return {k: v for k, v in objects.items() if k.startswith("_dicom/")}


def test_a_rewritten_series_table_never_reaches_an_sr(ray_session, package, tmp_path):
    """OUTPUT_series/series.parquet is derived output: the DICOM step and the report take the table
    built from the committed rows in memory. A rewritten file (its metadata kept, so that nothing
    but its bytes tells it apart) makes no new SR, names no other verdict, and is written right again."""
    import pyarrow as pa

    archive, out = str(tmp_path / "pacs"), str(tmp_path / "predictions")
    make_pacs(archive)
    first = run_scoring(ScoreConfig(model=package, input=archive, output=out, batch_size=8, dicom_out="sr"))
    assert first["dicom"]["sr"] == 3
    manifest = _dicom_objects(out)
    assert len(manifest) == 3
    target = os.path.join(out + "_series", SERIES_FILE)
    true_bytes = open(target, "rb").read()
    table = pq.read_table(target)
    labels = table.column("predicted_label").to_pylist()
    forged = ["pituitary" if lb != "pituitary" else "glioma" for lb in labels]
    table = table.set_column(table.schema.get_field_index("predicted_label"), "predicted_label",
                             pa.array(forged, pa.string())).replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, target)

    again = run_scoring(ScoreConfig(model=package, input=archive, output=out, batch_size=8, dicom_out="sr"))
    assert again["dicom"]["sr"] == 0 and "retired" not in again["dicom"]
    assert _dicom_objects(out) == manifest
    assert open(target, "rb").read() == true_bytes  # the derived table, written again from the rows
