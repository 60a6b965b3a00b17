"""DICOM objects of scoring (--dicom-out, --dicom-send): the pure parts and the DICOM step without
Ray or a PACS, and the objects in a run's one commit through run_scoring (a stub SCP).

tests/score/test_pacs.py sends them to a real Orthanc and reads them back with pydicom and dcmtk.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from braintumor_ray import ConfigError
from braintumor_ray.core import Identifiers, resolve
from braintumor_ray.score import ScoreConfig, format_summary
from braintumor_ray.score._dicom import series_findings
from braintumor_ray.score._dicom_out import (Algorithm, SeriesFinding, banner_lines, build_sc, build_sr, object_name,
                                             object_uids, plan_objects, sc_pixels, source_view, to_bytes)
from braintumor_ray.score._dicom_send import Destination, SentLedger, parse_destinations, send_with_retries

from generators.medical import SECRETS, dicom_bytes, head12, write_file

KEY = {"BRAINTUMOR_PATH_KEY": "k" * 40}
ALGO = Algorithm(name="braintumor-ray resnet10t", version="package format 1", model_id="0123456789abcdef")


def finding(label="glioma", reason=None, conf=0.83, series="1.2.3.4", heat=None) -> SeriesFinding:
    return SeriesFinding(model_id=ALGO.model_id, series_uid=series, study_uid="1.2.3", label=label, confidence=conf,
                         review_reason=reason, prediction_set=None, source_path="/a/IM1", source_sop_uid="1.2.3.4.5",
                         slice_index=None, heatmap_path=heat)


def finding_of(path, ids=None, label="glioma") -> SeriesFinding:
    """The finding of the source file at ``path``: its UIDs as an output with ``ids`` shows them."""
    ds = pydicom.dcmread(str(path))
    ids = ids or Identifiers()
    return SeriesFinding(**{**finding(label).__dict__, "source_path": "shown/IM1", "series_uid": ids.uid(str(ds.SeriesInstanceUID)),
                            "study_uid": ids.uid(str(ds.StudyInstanceUID)), "source_sop_uid": ids.uid(str(ds.SOPInstanceUID))})


def source():
    return pydicom.dcmread(io.BytesIO(dicom_bytes(head12(0), study=generate_uid(), series=generate_uid())))


def test_config_takes_and_refuses_dicom_options():
    base = dict(model="m", input="/in", output="/out")
    cfg = ScoreConfig(**base)
    assert cfg.dicom_out == "none" and cfg.dicom_send is None and cfg.dicom_banner == "NOT FOR DIAGNOSTIC USE"
    ok = ScoreConfig(**base, dicom_out="sr+sc", dicom_send="dicom://PACS@127.0.0.1:104,http://pacs:8042/dicom-web")
    assert [d.kind for d in parse_destinations(ok.dicom_send)] == ["dimse", "stow"]
    for bad, cause in [({"dicom_out": "pdf"}, "dicom_out='pdf' is unknown"),
                       ({"dicom_send": "pacs:104"}, "not a destination"),
                       ({"dicom_send": "dicom://A_TITLE_LONGER_THAN_16@h:104"}, "not an AE title"),
                       ({"dicom_send": "dicom://PACS@h:70000"}, "out of range"),
                       ({"dicom_send": "https://u:secret@pacs/dicom-web"}, "credentials there would be written"),
                       ({"dicom_ae_title": "BAD\\AET"}, "not an AE title"),
                       ({"dicom_send_retries": 11}, "out of range"),
                       ({"dicom_banner": "two\nlines"}, "one printable line")]:
        with pytest.raises(ConfigError, match=cause):
            ScoreConfig(**base, **bad)
    # What the summary and ledger call a destination: no password, no trailing slash.
    assert Destination("stow", url="http://pacs:8042/dicom-web/").key == "http://pacs:8042/dicom-web"


def test_plan_writes_an_sr_per_series_and_an_sc_per_flagged_or_positive_one_once():
    fs = [finding("glioma", series="1.1"), finding("no_tumor", series="1.2"),
          finding("no_tumor", "low_confidence", series="1.3"), finding(None, "out_of_distribution", None, series="1.4")]
    plan = plan_objects(fs, "sr+sc")
    assert [(o.kind, o.finding.series_uid) for o in plan] == [("sr", "1.1"), ("sc", "1.1"), ("sr", "1.2"),
                                                             ("sr", "1.3"), ("sc", "1.3"), ("sr", "1.4")]
    assert [o.kind for o in plan_objects(fs, "sc")] == ["sc", "sc"] and plan_objects(fs, "none") == []
    assert [o.kind for o in plan_objects(fs, "sr")] == ["sr"] * 4
    # Written once per model and series: the committed names are not planned again.
    assert plan_objects(fs, "sr+sc", {o.name for o in plan[:3]}) == plan[3:]
    name = object_name(ALGO.model_id, "1.1", "sr")
    assert "1.1" not in name and ALGO.model_id in name and name.endswith("-sr.dcm")
    assert object_uids(ALGO.model_id, "1.1", "sr") == object_uids(ALGO.model_id, "1.1", "sr")  # reruns: same UIDs
    assert len({*object_uids(ALGO.model_id, "1.1", "sr"), *object_uids(ALGO.model_id, "1.1", "sc"),
                *object_uids("fedcba9876543210", "1.1", "sr")}) == 6


def _content(ds) -> list[tuple[str, str]]:
    """(concept name, value) of every item of an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if "ConceptCodeSequence" in item:
            out.append((name, item.ConceptCodeSequence[0].CodeValue))
        elif "MeasuredValueSequence" in item:
            out.append((name, str(item.MeasuredValueSequence[0].NumericValue)))
        elif "TextValue" in item:
            out.append((name, item.TextValue))
        out.extend(_content(item))
    return out


def test_sr_codes_the_verdict_and_joins_the_source_study():
    src = source()
    view = source_view(src, Identifiers(), keep_identifiers=False)
    sr = pydicom.dcmread(io.BytesIO(to_bytes(build_sr(view, finding("glioma", "low_confidence", 0.61), ALGO,
                                                      notice="NOT FOR DIAGNOSTIC USE"))))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.PatientName == src.PatientName and sr.SeriesInstanceUID != src.SeriesInstanceUID
    content = _content(sr)
    assert ("Finding", "108369006") in content and ("Finding", "GLIOMA") in content  # Neoplasm; the class
    assert ("Probability", "0.61") in content and ("Review reason", "LOWCONF") in content
    assert ("Algorithm Name", ALGO.name) in content and ("Algorithm Version", ALGO.version) in content
    assert ("Algorithm Parameters", f"model_id={ALGO.model_id}") in content
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert refs.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID  # the top slice
    # No slice could vote (all out of distribution): no class, no probability, the reason only.
    none = pydicom.dcmread(io.BytesIO(to_bytes(build_sr(view, finding(None, "out_of_distribution", None), ALGO,
                                                        notice=""))))
    assert [c for c in _content(none) if c[0] in ("Finding", "Probability", "Review reason")] == [("Review reason", "OOD")]


@pytest.mark.parametrize("modes", [("hashed", "full"), ("full", "hashed"), ("hashed", "hashed")])
def test_hashed_modes_keep_source_identifiers_out_of_the_objects_unless_asked(modes):
    src = source()
    ids = Identifiers.from_env(*modes, env=KEY)
    uids = [str(src.StudyInstanceUID), str(src.SeriesInstanceUID), str(src.SOPInstanceUID)]
    f = finding("meningioma")
    for keep in (False, True):
        view = source_view(src, ids, keep_identifiers=keep)
        blobs = [to_bytes(build_sr(view, f, ALGO, notice="")),
                 to_bytes(build_sc(view, sc_pixels(np.zeros((8, 8), np.uint8), ["x"]), f, notice=""))]
        for blob in blobs:
            if not keep:
                assert [s for s in (*SECRETS, *uids) if s.encode() in blob] == []
                ds = pydicom.dcmread(io.BytesIO(blob))
                assert ds.StudyInstanceUID == Identifiers(modes[0], "hashed", "", KEY["BRAINTUMOR_PATH_KEY"].encode()).uid(uids[0])
                assert str(ds.PatientName) == "" and ds.PatientID == ""
            else:
                assert uids[0].encode() in blob and b"PID-7731-QX" in blob


def test_banner_and_secondary_capture_pixels():
    f = finding("pituitary", "ambiguous", 0.58)
    f = SeriesFinding(**{**f.__dict__, "prediction_set": ("pituitary", "glioma")})
    lines = banner_lines(f, "NOT FOR DIAGNOSTIC USE")
    assert lines == ["AI verdict: Pituitary tumour  confidence 58%", "Review: Ambiguous: several classes",
                     "Still possible: Pituitary tumour, Glioma", "NOT FOR DIAGNOSTIC USE"]
    assert banner_lines(finding("no_tumor"), "") == ["AI verdict: No tumour  confidence 83%", "Review: not flagged"]
    image = np.full((64, 64, 3), 128, np.uint8)
    px = sc_pixels(image, lines)
    assert px.shape[1] == 512 and px.dtype == np.uint8 and px.shape[0] > 512
    banner = px[: px.shape[0] - 512]
    white = (banner > 200).all(axis=-1)
    yellow = (banner[..., 0] > 200) & (banner[..., 1] > 200) & (banner[..., 2] < 80)
    assert white.any() and yellow.any()  # the verdict in white, the notice in yellow
    assert (px[-512:] == 128).mean() > 0.9  # the image below, scaled
    sc = pydicom.dcmread(io.BytesIO(to_bytes(build_sc(source_view(source(), Identifiers(), keep_identifiers=False),
                                                      px, f, notice="NOT FOR DIAGNOSTIC USE"))))
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert np.array_equal(sc.pixel_array, px) and "Pituitary" in sc.ImageComments


def test_series_findings_take_the_top_slice_map_and_count_files_not_dicom():
    t = pd.Timestamp("2026-01-01", tz="UTC")
    rows = pd.DataFrame([
        {"path": "a/1", "model_id": "m", "status": "ok", "scored_at": t, "sop_instance_uid": "9.1",
         "series_instance_uid": "1.1", "slice_index": None, "heatmap_path": "/o_explain/x.png"},
        {"path": "a/2", "model_id": "m", "status": "ok", "scored_at": t, "sop_instance_uid": "9.2",
         "series_instance_uid": "1.1", "slice_index": None, "heatmap_path": None},
        {"path": "b.jpg", "model_id": "m", "status": "ok", "scored_at": t, "sop_instance_uid": None,
         "series_instance_uid": None, "slice_index": None, "heatmap_path": None},
        {"path": "v.nii", "model_id": "m", "status": "ok", "scored_at": t, "sop_instance_uid": None,
         "series_instance_uid": None, "slice_index": 0, "heatmap_path": None},
        {"path": "c.png", "model_id": "other", "status": "ok", "scored_at": t, "sop_instance_uid": None,
         "series_instance_uid": None, "slice_index": None, "heatmap_path": None},
    ])
    series = pd.DataFrame([
        {"model_id": "m", "series_instance_uid": "1.1", "study_instance_uid": "1", "predicted_label": "glioma",
         "confidence": 0.9, "review_reason": None, "prediction_set": None, "top_slice_path": "a/1",
         "top_slice_sop_instance_uid": "9.1", "top_slice_index": None},
        {"model_id": "m", "series_instance_uid": None, "study_instance_uid": None, "predicted_label": "glioma",
         "confidence": 0.9, "review_reason": None, "prediction_set": None, "top_slice_path": "v.nii",
         "top_slice_sop_instance_uid": None, "top_slice_index": 0},
    ])
    fs, not_dicom = series_findings(series, rows, "m")
    assert not_dicom == 2  # the JPEG and the NIfTI volume (the other model's PNG is not this model's)
    assert [(f.series_uid, f.source_path, f.heatmap_path, f.label) for f in fs] == [("1.1", "a/1", "/o_explain/x.png", "glioma")]


def test_send_retries_records_what_was_sent_and_never_sends_it_again(tmp_path):
    dest = parse_destinations("dicom://PACS@127.0.0.1:11112")[0]
    objs = [pydicom.Dataset() for _ in range(2)]
    for ds in objs:
        ds.SOPInstanceUID = generate_uid()
    calls = []

    def flaky(d, datasets):  # down once, then refuses the second object once more
        calls.append([str(ds.SOPInstanceUID) for ds in datasets])
        if len(calls) == 1:
            raise ConnectionError("association with the PACS not established")
        return {str(ds.SOPInstanceUID): None if ds is objs[0] or len(calls) > 2 else "C-STORE status 0xA700"
                for ds in datasets}

    got = send_with_retries(dest, objs, calling_aet="BRAINTUMOR", retries=3, backoff_s=0, sender=flaky)
    assert got == {str(objs[0].SOPInstanceUID): None, str(objs[1].SOPInstanceUID): None}
    assert [len(c) for c in calls] == [2, 2, 1]  # only the failed one is tried again
    down = send_with_retries(dest, objs, calling_aet="B", retries=1, backoff_s=0,
                             sender=lambda d, ds: (_ for _ in ()).throw(TimeoutError("no answer")))
    assert set(down.values()) == {"TimeoutError: no answer"}
    root = resolve(str(tmp_path))
    ledger = SentLedger(root)
    assert ledger.pending(dest, ["a-sr.dcm", "a-sc.dcm"]) == ["a-sr.dcm", "a-sc.dcm"]
    ledger.record(dest, "a-sr.dcm", "1.2")
    ledger.save()
    again = SentLedger(root)
    assert again.pending(dest, ["a-sr.dcm", "a-sc.dcm"]) == ["a-sc.dcm"]  # the next run sends the rest only
    assert again.pending(parse_destinations("http://h/dicom-web")[0], ["a-sr.dcm"]) == ["a-sr.dcm"]  # per destination


def test_summary_says_what_was_written_sent_and_not():
    s = {"input": "/in", "output": "/out", "model_id": "m", "files_seen": 3, "scored": 3, "skipped_already_scored": 0,
         "errors": 0, "wall_s": 1.0, "images_per_s": 3.0,
         "dicom": {"mode": "sr+sc", "series": 1, "not_dicom_files": 2, "sr": 1, "sc": 1, "skipped": 0,
                   "sent": [{"destination": "dicom://PACS@h:104", "sent": 0, "already": 0, "failed": 2,
                             "error": "refused"}]}}
    text = format_summary(s)
    assert "DICOM objects: 1 SR, 1 SC written to /out_dicom/" in text
    assert "not DICOM: 2 scored files (JPEG/PNG/NIfTI) get no DICOM objects" in text
    assert "sent to dicom://PACS@h:104: 0 new, 0 sent before, 2 NOT sent (refused): the next run tries again" in text
    from braintumor_ray.tracking._mlflow import scalar_metrics  # what an MLflow run logs of it: valid names

    assert all(re.fullmatch(r"[\w./ -]+", k) for k in scalar_metrics(s)) and "dicom_sr" in scalar_metrics(s)


def test_an_sc_without_a_heat_map_shows_the_grey_slice_and_a_gone_source_is_refused(tmp_path):
    from types import SimpleNamespace

    from braintumor_ray.imaging import InputGuard
    from braintumor_ray.score._dicom import _object_bytes
    from braintumor_ray.score._dicom_out import DicomObject

    (tmp_path / "IM1").write_bytes(dicom_bytes(head12(3), window=(1500, 3000)))
    src = resolve(str(tmp_path))
    cfg = SimpleNamespace(guard=InputGuard(), dicom_identifiers=False, dicom_banner="NOT FOR DIAGNOSTIC USE",
                          s3_endpoint_url=None)
    f = finding_of(tmp_path / "IM1")
    sc = pydicom.dcmread(io.BytesIO(_object_bytes(DicomObject("sc", f), cfg, src, Identifiers(),
                                                  {"shown/IM1": str(tmp_path / "IM1")}, ALGO)))
    px = sc.pixel_array
    image = px[-512:].astype(int)
    assert (image[..., 0] == image[..., 1]).all() and image.std() > 10  # grey, and the slice, not a blank
    with pytest.raises(FileNotFoundError, match="not in the input any more"):
        _object_bytes(DicomObject("sr", f), cfg, src, Identifiers(), {}, ALGO)


def _objects(n_sc: int = 2):
    """[SC, SR, SC, ...] of distinct series, as _send reads them back from OUTPUT_dicom/."""
    from braintumor_ray.score._dicom_send import read_dataset

    view = source_view(source(), Identifiers(), keep_identifiers=False)
    px = sc_pixels(np.zeros((8, 8), np.uint8), ["x"])
    scs = [read_dataset(to_bytes(build_sc(view, px, finding(series=f"1.9.{k}"), notice=""))) for k in range(n_sc)]
    sr = read_dataset(to_bytes(build_sr(view, finding(series="1.9.99"), ALGO, notice="")))
    return [scs[0], sr, *scs[1:]]


def test_a_refused_sop_class_fails_that_object_only_and_the_others_go_once():
    """A PACS (pynetdicom's storage SCP on loopback) that takes Secondary Captures but refuses the
    SR's SOP class: the SR is that object's failure; both SCs are stored, each once, on every try."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import SecondaryCaptureImageStorage

    from _net import free_port

    got: list[str] = []

    def store(event):
        got.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="SCONLY")
    scp.add_supported_context(SecondaryCaptureImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        objs = _objects()
        dest = parse_destinations(f"dicom://SCONLY@127.0.0.1:{port}")[0]
        result = send_with_retries(dest, objs, calling_aet="BRAINTUMOR", retries=2, backoff_s=0, timeout_s=10)
    finally:
        server.shutdown()
    sc1, sr, sc2 = (str(o.SOPInstanceUID) for o in objs)
    assert sorted(got) == sorted([sc1, sc2])  # each SC once, the one after the SR too
    assert result[sc1] is None and result[sc2] is None
    assert "refused SOP class 1.2.840.10008.5.1.4.1.1.88.34" in result[sr]


class _StowStub:
    """A loopback DICOMweb endpoint that answers every STOW-RS with one canned reply."""

    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        import http.server
        import threading

        stub = self
        self.requests: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append(dict(self.headers))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _stored_reply(*uids: str) -> bytes:
    import json

    seq = [{"00081155": {"vr": "UI", "Value": [u]}, "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]}}
           for u in uids]
    return json.dumps({"00081199": {"vr": "SQ", "Value": seq}}).encode()


@pytest.mark.parametrize("reply", ["login page", "empty json", "one of two"])
def test_stow_success_means_listed_in_the_replys_referenced_sop_sequence(reply, monkeypatch):
    objs = _objects(2)
    uids = [str(o.SOPInstanceUID) for o in objs]
    status, ctype, body = {
        "login page": (200, "text/html", b"<html><form action='/login'>Sign in</form></html>"),
        "empty json": (200, "application/dicom+json", b"{}"),
        "one of two": (200, "application/dicom+json; charset=utf-8", _stored_reply(uids[0])),
    }[reply]
    stub = _StowStub(status, ctype, body)
    monkeypatch.setenv("BRAINTUMOR_DICOMWEB_AUTHORIZATION", "Bearer s3cr3t-token")
    try:
        dest = parse_destinations(stub.url)[0]
        result = send_with_retries(dest, objs, calling_aet="BRAINTUMOR", retries=1, backoff_s=0, timeout_s=10)
    finally:
        stub.close()
    assert stub.requests and all(r.get("Authorization") == "Bearer s3cr3t-token" for r in stub.requests)
    stored = [u for u in uids if result[u] is None]
    assert stored == ([uids[0]] if reply == "one of two" else [])
    assert all("not in the STOW-RS reply's stored instances" in result[u] for u in uids if u not in stored)
    assert len(stub.requests) == 2  # the failed ones were tried again


def test_credentials_are_refused_in_any_part_of_a_destination_and_never_quoted(tmp_path, capsys):
    from braintumor_ray.score._dicom_send import dicomweb_authorization

    base = dict(model="m", input="/in", output="/out")
    for bad in ["http://:TOKEN123@pacs/dicom-web", "https://u:TOKEN123@pacs/dicom-web",
                "https://pacs/dicom-web?apikey=TOKEN123", "https://pacs/dicom-web?token=TOKEN123",
                "https://pacs/dicom-web#TOKEN123", "dicom://PACS:TOKEN123@pacs:104", "dicom://PACS@pacs:104?k=TOKEN123"]:
        with pytest.raises(ConfigError) as e:
            ScoreConfig(**base, dicom_send=bad)
        assert "TOKEN123" not in str(e.value), bad
        if bad.startswith("http"):
            assert "BRAINTUMOR_DICOMWEB_AUTHORIZATION" in str(e.value), bad
    # Through the job: exit 2, one line naming the fix, nothing written, the secret nowhere.
    from conftest import load_job

    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    code = load_job("score").main(["--model", str(tmp_path / "m"), "--input", str(tmp_path / "in"), "--output", str(out),
                                   "--dicom-send", "https://pacs/dicom-web?apikey=TOKEN123"])
    said = capsys.readouterr()
    assert code == 2 and "BRAINTUMOR_DICOMWEB_AUTHORIZATION" in said.err + said.out
    assert "TOKEN123" not in said.err + said.out and not out.exists()
    (tmp_path / "auth").write_text("Basic dXNlcjpwYXNz\n")
    assert dicomweb_authorization({"BRAINTUMOR_DICOMWEB_AUTHORIZATION_FILE": str(tmp_path / "auth")}) == "Basic dXNlcjpwYXNz"
    assert dicomweb_authorization({}) is None


def _nonconformant_source(tmp_path) -> str:
    """A source whose header a common scanner writes: PatientSex U, dates with dashes, a time with colons."""
    from pydicom import config

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(head12(3), window=(1500, 3000))))
    mode = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.PatientSex, ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "U", "1941-02-03", "2019-13-45", "12:30:45"
        ds.save_as(str(tmp_path / "IM1"), enforce_file_format=True)
    finally:
        config.settings.writing_validation_mode = mode
    return str(tmp_path / "IM1")


def test_nonconformant_tags_are_normalised_or_dropped_named_and_never_quoted(tmp_path, caplog):
    import logging
    from types import SimpleNamespace

    from braintumor_ray.imaging import InputGuard
    from braintumor_ray.score._dicom import _object_bytes
    from braintumor_ray.score._dicom_out import DicomObject

    path = _nonconformant_source(tmp_path)
    cfg = SimpleNamespace(guard=InputGuard(), dicom_identifiers=False, dicom_banner="", s3_endpoint_url=None)
    f = finding_of(path)
    caplog.set_level(logging.DEBUG)
    logging.captureWarnings(True)
    try:
        sr, sc = (pydicom.dcmread(io.BytesIO(_object_bytes(DicomObject(k, f), cfg, resolve(str(tmp_path)), Identifiers(),
                                                          {"shown/IM1": path}, ALGO))) for k in ("sr", "sc"))
    finally:
        logging.captureWarnings(False)
    for ds in (sr, sc):
        # normalised: the intent is plain; dropped: U is no PatientSex, month 13 is no date.
        assert ds.PatientBirthDate == "19410203" and ds.StudyTime == "123045"
        assert ds.PatientSex == "" and ds.StudyDate == ""
    note = "Source attributes not copied (values not conformant): PatientSex, StudyDate"
    assert ("Comment", note) in _content(sr) and note in sc.ImageComments
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not [v for v in ("1941-02-03", "2019-13-45", "12:30:45") if v in logged], logged


def test_plan_follows_the_verdict_and_retires_what_it_replaced():
    from braintumor_ray.score._dicom_out import plan_dicom

    first = plan_dicom([finding("glioma", conf=0.61)], "sr+sc", [], model_id=ALGO.model_id, live_models=[ALGO.model_id])
    names = [o.name for o in first.write]
    assert [o.kind for o in first.write] == ["sr", "sc"] and first.retire == ()
    # The same verdict again: nothing to do.
    same = plan_dicom([finding("glioma", conf=0.61)], "sr+sc", names, model_id=ALGO.model_id, live_models=[ALGO.model_id])
    assert same == type(same)(write=(), retire=())
    # More slices, another confidence: new objects naming the ones they replace; those retire.
    new = plan_dicom([finding("glioma", conf=0.74)], "sr+sc", names, model_id=ALGO.model_id, live_models=[ALGO.model_id])
    assert [(o.kind, o.predecessor) for o in new.write] == [("sr", names[0]), ("sc", names[1])]
    assert set(new.retire) == set(names) and not {o.name for o in new.write} & set(names)
    # Not flagged any more: the SC retires, with nothing in its place; another model's objects stay
    # while its rows do, and retire once they are gone (--rescore-all); names not ours are left alone.
    other = object_name("fedcba9876543210", "1.2.3.4", "sr", "0" * 12)
    calm = plan_dicom([finding("no_tumor", conf=0.9)], "sr", [*names, other, "notes.dcm"], model_id=ALGO.model_id,
                      live_models=[ALGO.model_id, "fedcba9876543210"])
    assert [o.kind for o in calm.write] == ["sr"] and set(calm.retire) == set(names)
    gone = plan_dicom([finding("no_tumor", conf=0.9)], "sr", [other], model_id=ALGO.model_id, live_models=[ALGO.model_id])
    assert gone.retire == (other,) and gone.write[0].predecessor == other  # the new model's SR names it
    # Another content, another SOP Instance UID, in this output or any other; the series stays.
    a, b = (object_uids(ALGO.model_id, "1.1", "sr", d) for d in ("a" * 12, "b" * 12))
    assert a[0] == b[0] and a[1] != b[1]


class _Scp:
    """A storage SCP on loopback (pynetdicom) that takes SRs and SCs and keeps what it got."""

    def __init__(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
        from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

        from _net import free_port

        self.got: list = []
        ae = AE(ae_title="STUBPACS")
        for sop in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop, ALL_TRANSFER_SYNTAXES)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.dest = f"dicom://STUBPACS@127.0.0.1:{self.port}"

    def _store(self, event):
        self.got.append(event.dataset)
        return 0x0000

    def close(self):
        self.server.shutdown()


def _step_world(tmp_path, s3=None):
    """An output with one scored DICOM series (rows and series table), its source (on local disk, or
    in ``s3`` = (endpoint, bucket)), and a runner of the DICOM step under a lease, as scoring calls it.
    Returns (run, OUTPUT_dicom folder, put(bytes): rewrite the source, version(): its version now)."""
    import pyarrow as pa
    from types import SimpleNamespace

    from braintumor_ray.core import Lease
    from braintumor_ray.imaging import InputGuard
    from braintumor_ray.score._dicom import SLICE_COLUMNS, dicom_objects, send_committed
    from braintumor_ray.score._layout import _writer

    data = dicom_bytes(head12(3), window=(1500, 3000))
    if s3 is None:
        (tmp_path / "in").mkdir()
        src = resolve(str(tmp_path / "in"))
    else:
        src = resolve(f"s3://{s3[1]}/in", s3_endpoint_url=s3[0])
    src.join("IM1").write_bytes(data)
    dst = resolve(str(tmp_path / "out"))
    ds = pydicom.dcmread(io.BytesIO(data))
    uids = {"sop": str(ds.SOPInstanceUID), "series": str(ds.SeriesInstanceUID), "study": str(ds.StudyInstanceUID)}
    listed_path = src.join("IM1").path  # the listing's path (in the filesystem), and as the rows show it:
    shown = src.join("IM1").uri

    def run(label="glioma", conf=0.83, model=ALGO.model_id, dest=None, run_id="run-1", version=None, heat=None):
        t = pd.Timestamp.now(tz="UTC")
        rows = pa.Table.from_pylist([{"path": shown, "model_id": model, "status": "ok", "scored_at": t,
                                      "sop_instance_uid": uids["sop"], "series_instance_uid": uids["series"],
                                      "slice_index": None, "heatmap_path": heat, "version": version}],
                                    schema=pa.schema(SLICE_COLUMNS))
        series = pa.Table.from_pandas(pd.DataFrame([{
            "model_id": model, "series_instance_uid": uids["series"], "study_instance_uid": uids["study"],
            "predicted_label": label, "confidence": conf, "review_reason": None, "prediction_set": None,
            "top_slice_path": shown, "top_slice_sop_instance_uid": uids["sop"], "top_slice_index": None}]))
        cfg = SimpleNamespace(dicom_out="sr+sc", dicom_send=dest, dicom_identifiers=False, dicom_banner="",
                              guard=InputGuard(), s3_endpoint_url=s3 and s3[0], dicom_ae_title="BRAINTUMOR",
                              dicom_send_retries=0)
        algo = Algorithm(ALGO.name, ALGO.version, model)
        with Lease(dst, owner=run_id, ttl_s=60, what="score") as lease:
            # As a scoring run does: recover, build the objects from the rows before the commit, commit
            # them (here alone: no new rows), then send what the manifest lists.
            writer = _writer(dst, lease)
            writer.recover()
            listed = (writer.manifest.read_doc() or {"objects": {}})["objects"]
            got = dicom_objects(cfg, dst=dst, src=src, ids=Identifiers(), sources={shown: listed_path}, algo=algo,
                                rows=rows, series=series, listed=listed)
            if got.changes:
                writer.commit(writer.stage(run_id), objects=got.objects, retire=got.retire)
            sent = send_committed(dst, cfg, lease)
            return got.summary | ({"sent": sent} if sent is not None else {})

    def put(data: bytes) -> None:
        src.join("IM1").write_bytes(data)

    def version() -> str:
        return src.files_with_versions()[listed_path][1]

    return run, tmp_path / "out_dicom", put, version


def _manifest(folder) -> dict:
    """The objects of OUTPUT_dicom/ (``folder``) that OUTPUT/_manifest.json lists, by file name."""
    import json

    doc = json.loads((folder.parent / folder.name.removesuffix("_dicom") / "_manifest.json").read_text())
    return {k.split("/", 1)[1]: e for k, e in doc.get("objects", {}).items() if k.startswith("_dicom/")}


def test_objects_follow_the_verdict_and_only_the_manifests_are_sent(tmp_path, caplog):
    import hashlib
    import json
    import shutil

    run, folder, _, _ = _step_world(tmp_path)
    scp = _Scp()
    try:
        first = run(dest=scp.dest)
        assert (first["sr"], first["sc"]) == (1, 1) and len(scp.got) == 2
        old = {ds.SOPClassUID.name: ds for ds in scp.got}
        old_names = sorted(_manifest(folder))
        again = run(dest=scp.dest)
        assert (again["sr"], again["sc"], len(scp.got)) == (0, 0, 2)  # the same verdict: nothing new

        # More slices came: another confidence. A new SR and SC with new SOP Instance UIDs; the SR
        # names the one it replaces; the replaced ones leave the manifest and the folder.
        changed = run(conf=0.91, dest=scp.dest, run_id="run-2")
        assert (changed["sr"], changed["sc"], changed["retired"]) == (1, 1, 2) and len(scp.got) == 4
        new = {ds.SOPClassUID.name: ds for ds in scp.got[2:]}
        sr_old, sr_new = old["Comprehensive 3D SR Storage"], new["Comprehensive 3D SR Storage"]
        assert sr_new.SOPInstanceUID != sr_old.SOPInstanceUID
        assert sr_new.SeriesInstanceUID == sr_old.SeriesInstanceUID and sr_new.StudyInstanceUID == sr_old.StudyInstanceUID
        pred = sr_new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert pred.ReferencedSOPInstanceUID == sr_old.SOPInstanceUID
        names = sorted(_manifest(folder))
        assert not set(names) & set(old_names) and sorted(p.name for p in folder.glob("*.dcm")) == names

        # Planted: a .dcm in OUTPUT_dicom/, a "complete" staged run of objects with its own entry list
        # (the objects' sha256 right), and a listed object's bytes forged under its name; the manifest's
        # files with their bytes are what a new destination gets, nothing else.
        planted = folder / "0123456789abcdef0123-0123456789abcdef-sr-aaaaaaaaaaaa.dcm"
        shutil.copy(folder / names[0], planted)
        stage = tmp_path / "out._staging" / "planted-run"
        (stage / "_objects" / "_dicom").mkdir(parents=True)
        fake = "ffffffffffffffffffff-0123456789abcdef-sc-bbbbbbbbbbbb.dcm"
        shutil.copy(folder / names[1], stage / "_objects" / "_dicom" / fake)
        sha = hashlib.sha256((folder / names[1]).read_bytes()).hexdigest()
        (stage / "_SUCCESS").write_bytes(b"")
        (stage / "_ENTRIES.json").write_text(json.dumps({"replace_all": False, "files": {},
                                                         "objects": {f"_dicom/{fake}": {"sha256": sha}}}))
        forged, kept = (names[0], names[1]) if "-sr-" in names[0] else (names[1], names[0])
        (folder / forged).write_bytes((folder / kept).read_bytes())
        second = _Scp()
        try:
            run(conf=0.91, dest=f"{scp.dest},{second.dest}", run_id="run-3")
        finally:
            second.close()
        sent_kept = str(pydicom.dcmread(str(folder / kept)).SOPInstanceUID)
        assert [str(ds.SOPInstanceUID) for ds in second.got] == [sent_kept]
        assert sorted(_manifest(folder)) == names and len(scp.got) == 4 and stage.exists()
        assert not (folder / fake).exists() and "not the object that was committed" in caplog.text

        # --rescore-all with another model: the first model's rows are gone, so are its objects.
        other = run(conf=0.91, model="fedcba9876543210", run_id="run-4")
        assert other["retired"] == 2 and all("-fedcba9876543210-" in n for n in _manifest(folder))
    finally:
        scp.close()


@pytest.mark.parametrize("modes", [("hashed", "full"), ("full", "hashed")])
def test_hashed_mode_sc_shows_the_head_only_and_uids_need_the_key(tmp_path, modes):
    """A name burned into a corner of the scan stays out of a hashed-mode SC without a map; the
    objects' own UIDs cannot be computed from the source or hashed UIDs and the model id without
    the key (they can with it: the same on every run)."""
    from types import SimpleNamespace

    from braintumor_ray.imaging import InputGuard, find_head_box, read_medical
    from braintumor_ray.score._dicom import _object_bytes, object_key
    from braintumor_ray.score._dicom_out import DicomObject, content_digest

    pixels = head12(5, size=128)
    pixels[3:5, 3:30] = 4095  # a "name" (thin strokes, as text is) burned into the top left corner, far from the head
    (tmp_path / "IM1").write_bytes(dicom_bytes(pixels, window=(2048, 4096)))
    src = pydicom.dcmread(str(tmp_path / "IM1"))
    ids = Identifiers.from_env(*modes, env=KEY)
    f = finding_of(tmp_path / "IM1", ids)

    def build(kind, keep=False):
        cfg = SimpleNamespace(guard=InputGuard(), dicom_identifiers=keep, dicom_banner="", s3_endpoint_url=None)
        key = object_key(ids, keep_identifiers=keep)
        return pydicom.dcmread(io.BytesIO(_object_bytes(DicomObject(kind, f), cfg, resolve(str(tmp_path)), ids,
                                                        {"shown/IM1": str(tmp_path / "IM1")}, ALGO, key=key)))

    grey_slice = read_medical((tmp_path / "IM1").read_bytes(), "dicom", guard=InputGuard())[0].gray
    assert (grey_slice[3:5, 3:30] > 200).all()  # the name is there in the source
    x0, y0, x1, y1 = find_head_box(grey_slice)
    assert y0 >= 5 or x0 >= 30  # and outside the head's box
    hashed, kept = build("sc"), build("sc", keep=True)
    # The SC's image is the banner's width (512) and as tall as what it shows: the head's box only,
    # scaled, in a hashing mode; the whole slice with --dicom-identifiers.
    banner = kept.Rows - 512
    assert hashed.Rows - banner == round(512 * (y1 - y0) / (x1 - x0)) != 512
    assert (kept.pixel_array[banner + 13:banner + 19, 13:119, 0] > 200).mean() > 0.9  # the name, scaled x4

    sr = build("sr")
    raw, shown_series = str(src.SeriesInstanceUID), f.series_uid
    guesses = {u for series in (raw, shown_series) for kind in ("sr", "sc") for digest in ("", content_digest(f, kind))
               for u in object_uids(ALGO.model_id, series, kind, digest)}
    for ds in (sr, hashed):
        assert not {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)} & guesses
    assert build("sr").SOPInstanceUID == sr.SOPInstanceUID  # with the key: the same UIDs every run
    # The key is the output's identifier key, from the environment (never written to the output).
    assert object_key(ids, keep_identifiers=False) == KEY["BRAINTUMOR_PATH_KEY"].encode()
    assert object_key(ids, keep_identifiers=True) == b"" and object_key(Identifiers(), keep_identifiers=False) == b""
    assert object_uids(ALGO.model_id, f.series_uid, "sr", content_digest(f, "sr"), key=b"z" * 40)[1] != sr.SOPInstanceUID



@pytest.mark.parametrize("storage", ["local", "s3"])
def test_the_source_is_read_at_its_rows_version_and_its_uids_checked(tmp_path, caplog, storage, request):
    """A source rewritten after it was scored (here: another patient's image under its name) is left
    out with a reason; its verdict is never filed in that patient's study. Local disk and S3 (ETag)."""
    s3 = (request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")) if storage == "s3" else None
    run, folder, put, version = _step_world(tmp_path, s3)
    scored = version()
    first = run(version=scored)
    assert (first["sr"], first["sc"], first["skipped"]) == (1, 1, 0)
    rewritten = dicom_bytes(head12(4), window=(1500, 3000))  # another study, series and instance
    put(rewritten)
    # The rows still say the version that was scored: the read is held to it.
    held = run(conf=0.91, version=scored, run_id="run-2")
    assert (held["sr"], held["sc"], held["skipped"]) == (0, 0, 2)
    # A listing that saw the new version, rows that kept the old UIDs: the UIDs are checked.
    checked = run(conf=0.92, version=version(), run_id="run-3")
    assert (checked["sr"], checked["sc"], checked["skipped"]) == (0, 0, 2)
    assert "its SOPInstanceUID is not the one its row holds" in caplog.text
    other = str(pydicom.dcmread(io.BytesIO(rewritten)).StudyInstanceUID)
    assert all(str(pydicom.dcmread(str(folder / n)).StudyInstanceUID) != other for n in _manifest(folder))


def test_an_sc_takes_its_map_only_from_the_outputs_explain_folder(tmp_path, caplog):
    """A row's heatmap_path naming a file elsewhere (planted, or ``OUTPUT_explain/../x.png``), or a
    map of OUTPUT_explain/ that OUTPUT/_manifest.json does not list or lists with other bytes, makes
    no SC; a listed map of OUTPUT_explain/ with its bytes does."""
    import hashlib

    from braintumor_ray.core import Manifest
    from braintumor_ray.imaging import encode_png

    run, folder, _, _ = _step_world(tmp_path)
    png = encode_png(np.full((64, 64, 3), 77, np.uint8))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.png").write_bytes(png)
    (tmp_path / "out_explain").mkdir()
    (tmp_path / "out_explain" / "m.png").write_bytes(png)
    for planted in (str(tmp_path / "elsewhere" / "x.png"), f"{tmp_path}/out_explain/../elsewhere/x.png",
                    f"{tmp_path}/out_explain/m.png"):  # the last: there, but listed nowhere
        got = run(heat=planted)
        assert (got["sc"], got["skipped"]) == (0, 1), planted  # (the SR is made: it shows no map)
    assert "heatmap_path is not a file of this output's OUTPUT_explain/" in caplog.text
    assert "is not one _manifest.json lists" in caplog.text
    manifest = Manifest(resolve(str(tmp_path / "out")))
    doc = manifest.read_doc()
    listed = {"_explain/m.png": {"sha256": hashlib.sha256(b"other bytes").hexdigest()}}
    manifest.write(doc["files"], derived=doc["derived"], objects=doc["objects"] | listed)
    forged = run(heat=f"{tmp_path}/out_explain/m.png", run_id="run-2")
    assert (forged["sc"], forged["skipped"]) == (0, 1) and "is not the one committed" in caplog.text
    doc = manifest.read_doc()
    listed = {"_explain/m.png": {"sha256": hashlib.sha256(png).hexdigest()}}
    manifest.write(doc["files"], derived=doc["derived"], objects=doc["objects"] | listed)
    ok = run(heat=f"{tmp_path}/out_explain/m.png", run_id="run-3")
    assert ok["sc"] == 1
    sc = [pydicom.dcmread(str(folder / n)) for n in _manifest(folder) if "-sc-" in n][0]
    assert (sc.pixel_array[-512:] == 77).mean() > 0.9


def test_a_non_ascii_patient_name_is_declared_in_the_objects_character_set(tmp_path):
    """A Latin-1 source (ISO_IR 100) with "Müller": the objects say UTF-8 (ISO_IR 192) and hold it so."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(head12(0))))
    ds.SpecificCharacterSet, ds.PatientName = "ISO_IR 100", "Müller^Hans"
    ds.save_as(str(tmp_path / "IM1"), enforce_file_format=True)
    assert "Müller".encode("latin-1") in (tmp_path / "IM1").read_bytes()
    view = source_view(pydicom.dcmread(str(tmp_path / "IM1")), Identifiers(), keep_identifiers=False)
    f = finding_of(tmp_path / "IM1")
    for blob in (to_bytes(build_sr(view, f, ALGO, notice="")),
                 to_bytes(build_sc(view, sc_pixels(np.zeros((8, 8), np.uint8), ["x"]), f, notice=""))):
        back = pydicom.dcmread(io.BytesIO(blob))
        assert back.SpecificCharacterSet == "ISO_IR 192" and "Müller".encode() in blob
        assert str(back.PatientName) == "Müller^Hans"


def test_dicom_objects_ride_the_runs_one_commit(ray_session, package, tmp_path, monkeypatch, caplog):
    """The SRs and SCs are built before the run's commit and published by it: a run cut off before
    its commit leaves none visible and sends none; the one manifest write lists every object with
    its sha256 beside the rows; only listed objects with those bytes are sent; an output whose
    objects an older version named in OUTPUT_dicom/_manifest.json keeps them (those whose bytes
    match), the others are made again; a run cut off while committing is finished by the next, its
    objects with its rows; a rerun with nothing new writes nothing."""
    import dataclasses
    import hashlib
    import json
    import os

    from braintumor_ray.core import Location, StagedWriter, lease_location
    from braintumor_ray.score import run_scoring

    archive, out, folder = tmp_path / "archive", tmp_path / "preds", tmp_path / "preds_dicom"
    study = generate_uid()
    for s in range(2):
        series = generate_uid()
        for i in range(2):
            write_file(f"{archive}/SER{s}/IM{i}.dcm", dicom_bytes(head12(3 * s + i), series=series, study=study,
                                                                   instance=i + 1, window=(1500, 3000)))
    scp, late = _Scp(), _Scp()
    cfg = ScoreConfig(model=package, input=str(archive), output=str(out), batch_size=8, dicom_out="sr+sc",
                      dicom_send=scp.dest, dicom_send_retries=0)

    def sha(p) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    def listed() -> dict:
        doc = json.loads((out / "_manifest.json").read_text())
        return {k.split("/", 1)[1]: e for k, e in doc.get("objects", {}).items() if k.startswith("_dicom/")}

    try:
        # Cut off after its rows and objects were staged, before its commit began.
        real = StagedWriter._entries_doc

        def killed(self, *a, **k):
            if self.what == "score":
                raise KeyboardInterrupt("killed before the commit")
            return real(self, *a, **k)

        monkeypatch.setattr(StagedWriter, "_entries_doc", killed)
        with pytest.raises(KeyboardInterrupt):
            run_scoring(cfg)
        monkeypatch.setattr(StagedWriter, "_entries_doc", real)
        staged = sorted((tmp_path / "preds._staging").glob("*/_objects/_dicom/*.dcm"))
        assert len(staged) >= 2, "the objects were built and staged before the commit"
        assert not list(folder.glob("*.dcm")) and not (out / "_manifest.json").exists() and scp.got == []
        # As a killed run leaves it: its lease expired, named by nobody alive.
        past = "2020-01-01T00:00:00+00:00"
        lease_location(resolve(str(out))).write_bytes(json.dumps({
            "owner": staged[0].parts[-4], "host": "node-gone", "pid": 4242, "started": past, "heartbeat": past,
            "expires": past, "ttl_s": 120.0}).encode())

        first = run_scoring(cfg)
        assert first["dropped_runs"] == 1 and first["dicom"]["sr"] == 2
        names = sorted(p.name for p in folder.glob("*.dcm"))
        objects = listed()
        assert sorted(objects) == names and len(names) == first["dicom"]["sr"] + first["dicom"]["sc"]
        assert all(objects[n]["sha256"] == sha(folder / n) for n in names)
        assert not (folder / "_manifest.json").exists()
        uids = {n: str(pydicom.dcmread(str(folder / n)).SOPInstanceUID) for n in names}
        assert sorted(str(ds.SOPInstanceUID) for ds in scp.got) == sorted(uids.values())

        # A listed object's bytes forged under its name: never sent; the others go to a new destination.
        forged = next(n for n in names if "-sr-" in n)
        other = next(n for n in names if n != forged)
        good = (folder / forged).read_bytes()
        (folder / forged).write_bytes((folder / other).read_bytes())
        again = run_scoring(dataclasses.replace(cfg, dicom_send=f"{scp.dest},{late.dest}"))
        assert (again["dicom"]["sr"], again["dicom"]["sc"]) == (0, 0) and len(scp.got) == len(names)
        assert sorted(str(ds.SOPInstanceUID) for ds in late.got) == sorted(u for n, u in uids.items() if n != forged)
        assert "not the object that was committed" in caplog.text
        (folder / forged).write_bytes(good)

        # A new series; the run cut off while committing (its first object moved in): the next run
        # finishes that commit, objects with the rows, and sends them.
        series = generate_uid()
        write_file(f"{archive}/SER2/IM0.dcm", dicom_bytes(head12(9), series=series, study=study, window=(1500, 3000)))
        real_move = Location.move_to

        def cut(self, other):
            if other.path.endswith(".dcm") and other.path.startswith(str(folder)):
                real_move(self, other)
                raise KeyboardInterrupt("killed while committing")
            return real_move(self, other)

        monkeypatch.setattr(Location, "move_to", cut)
        with pytest.raises(KeyboardInterrupt):
            run_scoring(cfg)
        monkeypatch.setattr(Location, "move_to", real_move)
        assert sorted(listed()) == names  # not listed yet: the manifest is written after the moves
        finished = run_scoring(cfg)
        assert finished["committed_runs"] == 1 and finished["scored"] == 0 and finished["dicom"]["sr"] == 0
        names = sorted(p.name for p in folder.glob("*.dcm"))
        assert sorted(listed()) == names and len(names) > len(uids)
        uids = {n: str(pydicom.dcmread(str(folder / n)).SOPInstanceUID) for n in names}
        assert sorted(str(ds.SOPInstanceUID) for ds in scp.got) == sorted(uids.values())

        # The layout before: objects named in OUTPUT_dicom/_manifest.json, one of them since rewritten.
        doc = json.loads((out / "_manifest.json").read_text())
        old = {k.split("/", 1)[1]: e for k, e in doc["objects"].items() if k.startswith("_dicom/")}
        doc["objects"] = {k: e for k, e in doc["objects"].items() if not k.startswith("_dicom/")}  # the maps stay
        (out / "_manifest.json").write_text(json.dumps(doc))
        (folder / "_manifest.json").write_text(json.dumps({"format": 1, "files": old}))
        (folder / other).write_bytes(b"rewritten")
        migrated = run_scoring(cfg)
        assert not (folder / "_manifest.json").exists() and sorted(listed()) == names
        assert migrated["dicom"]["sr"] + migrated["dicom"]["sc"] == 1  # only the rewritten one made again
        assert all(listed()[n]["sha256"] == sha(folder / n) for n in names)
        assert str(pydicom.dcmread(str(folder / other)).SOPInstanceUID) == uids[other]

        # Nothing new: nothing written.
        stamp = {p: os.stat(p).st_mtime_ns for p in (out / "_manifest.json", out / "_report.html")}
        assert run_scoring(cfg)["dicom"]["sr"] == 0
        assert {p: os.stat(p).st_mtime_ns for p in stamp} == stamp
    finally:
        scp.close()
        late.close()
