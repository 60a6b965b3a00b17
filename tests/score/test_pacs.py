"""Scoring's DICOM objects in a real PACS: Debian's Orthanc on loopback (the ``orthanc`` fixture).

The study's MR images go into the PACS first with dcmtk's storescu (not our code); scoring then
writes an SR per series and an SC per flagged or positive one and sends them by C-STORE; the test
queries Orthanc's REST API back, reads what it stored with pydicom and dcmtk (dsrdump, dcmdump),
and checks that a rerun sends nothing again, that STOW-RS sends to a second destination, and
that a destination that is down leaves the run standing (exit 0) with its objects left to send.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import urllib.request

import pyarrow.parquet as pq
import pydicom

from braintumor_ray.score import SERIES_FILE

from _net import free_port
from conftest import PACS_AET, SCORER_AET, load_job
from generators.medical import PATIENT_ID, make_pacs


def _get(web: str, path: str):
    with urllib.request.urlopen(web + path, timeout=10) as r:
        return r.read() if path.endswith("/file") else json.loads(r.read())


def _instances(web: str, study_uid: str) -> dict[str, list[str]]:
    """SOP Class UID -> Orthanc ids of the study's instances."""
    out: dict[str, list[str]] = {}
    for sid in _get(web, "/studies"):
        study = _get(web, f"/studies/{sid}")
        if study["MainDicomTags"]["StudyInstanceUID"] != study_uid:
            continue
        for iid in (i["ID"] for i in _get(web, f"/studies/{sid}/instances")):
            tags = _get(web, f"/instances/{iid}/simplified-tags")
            out.setdefault(tags["SOPClassUID"], []).append(iid)
    return out


def _objects(out) -> dict:
    """The DICOM objects the output's one manifest lists (OUTPUT_dicom/NAME, by NAME)."""
    doc = json.loads((out / "_manifest.json").read_text())
    return {k.split("/", 1)[1]: e for k, e in doc.get("objects", {}).items() if k.startswith("_dicom/")}


SR, SC, MR = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.4"


def test_scoring_sends_sr_and_sc_into_the_source_study_once(ray_session, package, trusted_package, orthanc, tmp_path,
                                                             capsys):
    web = orthanc["web"]
    archive, out = tmp_path / "archive", tmp_path / "predictions"
    pacs = make_pacs(str(archive))
    images = pacs["files"]["axial"] + pacs["files"]["sagittal"]  # (Orthanc takes no RLE by default: rle.dcm stays out)
    port = orthanc["dicom"].rsplit(":", 1)[1]
    put = subprocess.run(["storescu", "-aet", SCORER_AET, "-aec", PACS_AET, "127.0.0.1", port, *images],
                         capture_output=True, text=True, timeout=60)
    assert put.returncode == 0, put.stderr
    assert len(_instances(web, pacs["study"])[MR]) == 6

    score = load_job("score")
    args = ["--model", package, "--input", str(archive), "--output", str(out), "--batch-size", "8",
            "--dicom-out", "sr+sc", "--dicom-send", orthanc["dicom"]]
    assert score.main(args) == 0
    first = capsys.readouterr().out
    series = pq.read_table(f"{out}_series/{SERIES_FILE}").to_pylist()
    dicom_series = [s for s in series if s["series_instance_uid"]]
    flagged = [s for s in dicom_series if s["predicted_label"] != "no_tumor" or s["review_reason"]]
    n = len(dicom_series) + len(flagged)
    assert len(dicom_series) == 3 and f"DICOM objects: 3 SR, {len(flagged)} SC written to {out}_dicom/" in first
    assert "not DICOM: 3 scored files (JPEG/PNG/NIfTI) get no DICOM objects" in first  # the NIfTI and 2 JPEGs
    assert f"sent to {orthanc['dicom']}: {n} new, 0 sent before" in first
    manifest = _objects(out)
    assert sorted(manifest) == sorted(f for f in os.listdir(f"{out}_dicom") if f.endswith(".dcm")) and len(manifest) == n

    # In the PACS: the SRs and SCs in the source study (no other study), readable by pydicom and dcmtk.
    stored = _instances(web, pacs["study"])
    assert len(stored[SR]) == 3 and len(stored.get(SC, [])) == len(flagged) and len(_get(web, "/studies")) == 1
    for kind, iid in [("sr", stored[SR][0]), *([("sc", stored[SC][0])] if flagged else [])]:
        blob = _get(web, f"/instances/{iid}/file")
        ds = pydicom.dcmread(io.BytesIO(blob))
        assert ds.StudyInstanceUID == pacs["study"] and ds.PatientID == PATIENT_ID
        assert ds.SeriesInstanceUID not in (pacs["axial"], pacs["sagittal"], pacs["rle"])
        path = tmp_path / f"{kind}.dcm"
        path.write_bytes(blob)
        dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=30)
        assert dump.returncode == 0 and "NOT FOR DIAGNOSTIC USE" in dump.stdout, dump.stderr
        if kind == "sr":
            sr = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=30)
            assert sr.returncode == 0, sr.stderr
            model_id = json.loads(open(os.path.join(package, "model.json")).read())["model_id"]
            for text in ("Comprehensive 3D SR", '"Imaging Measurement Report"', '"Probability"', "99BTRAY",
                         f"model_id={model_id}", "(12738006,SCT,\"Brain\")"):
                assert text in sr.stdout, (text, sr.stdout[:3000])
        else:
            assert "SecondaryCaptureImageStorage" in dump.stdout and "BurnedInAnnotation" in dump.stdout
            assert ds.pixel_array.shape[1] == 512 and ds.pixel_array.shape[2] == 3

    # A rerun sends nothing again: an SR deleted from the PACS stays deleted.
    gone = stored[SR][0]
    urllib.request.urlopen(urllib.request.Request(f"{web}/instances/{gone}", method="DELETE"), timeout=10)
    assert score.main(args) == 0
    again = capsys.readouterr().out
    assert "DICOM objects: 0 SR, 0 SC" in again and f"sent to {orthanc['dicom']}: 0 new, {n} sent before" in again
    assert len(_instances(web, pacs["study"])[SR]) == 2

    # STOW-RS to a second destination sends everything once (the deleted SR is back); a PACS that
    # is down is a warning, exit 0, its objects left for the next run.
    down = f"dicom://{PACS_AET}@127.0.0.1:{free_port()}"
    assert score.main([*args[:-1], f"{orthanc['stow']},{down}", "--dicom-send-retries", "0"]) == 0
    third = capsys.readouterr().out
    assert f"sent to {orthanc['stow']}: {n} new, 0 sent before" in third
    assert f"sent to {down}: 0 new, 0 sent before, {n} NOT sent (" in third and "the next run tries again" in third
    assert len(_instances(web, pacs["study"])[SR]) == 3
    ledger = json.loads((tmp_path / "predictions_dicom" / "_sent.json").read_text())["sent"]
    assert sorted(ledger) == sorted([orthanc["dicom"], orthanc["stow"]]) and all(len(v) == n for v in ledger.values())

    # Another model (--rescore-all with the calibrated package: another model id, other verdicts):
    # new SRs with new SOP Instance UIDs, each naming the SR it replaces (Predecessor Documents
    # Sequence); the first model's objects leave the manifest and OUTPUT_dicom/, never sent again.
    old_srs = {pydicom.dcmread(io.BytesIO(_get(web, f"/instances/{i}/file"))).SOPInstanceUID
               for i in _instances(web, pacs["study"])[SR]}
    new_model = json.loads(open(os.path.join(trusted_package, "model.json")).read())["model_id"]
    assert score.main([args[0], trusted_package, *args[2:], "--rescore-all"]) == 0
    fourth = capsys.readouterr().out
    assert "DICOM objects: 3 SR" in fourth
    manifest = _objects(out)
    assert manifest and all(f"-{new_model}-" in name for name in manifest)
    assert sorted(manifest) == sorted(f for f in os.listdir(f"{out}_dicom") if f.endswith(".dcm"))
    stored = _instances(web, pacs["study"])
    assert len(stored[SR]) == 6  # the PACS keeps both versions, linked
    named = set()
    for name in (n for n in manifest if "-sr-" in n):
        sr = pydicom.dcmread(os.path.join(f"{out}_dicom", name))
        assert sr.SOPInstanceUID not in old_srs
        named.add(sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                  .ReferencedSOPInstanceUID)
    assert named == old_srs
