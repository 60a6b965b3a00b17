"""DICOM objects of scoring (--dicom-out, --dicom-send): the pure parts, without Ray or a PACS.

tests/test_pacs.py sends them to a real Orthanc and reads them back with pydicom and dcmtk.
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

from test_dicom import SECRETS, dicom_bytes, head12

KEY = {"BRAINTUMOR_PATH_KEY": "k" * 40}
ALGO = Algorithm(name="braintumor-ray resnet10t", version="package format 1", model_id="0123456789abcdef")


def finding(label="glioma", reason=None, conf=0.83, series="1.2.3.4", heat=None) -> SeriesFinding:
    return SeriesFinding(model_id=ALGO.model_id, series_uid=series, study_uid="1.2.3", label=label, confidence=conf,
                         review_reason=reason, prediction_set=None, source_path="/a/IM1", source_sop_uid="1.2.3.4.5",
                         slice_index=None, heatmap_path=heat)


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
    f = SeriesFinding(**{**finding("glioma").__dict__, "source_path": "shown/IM1"})
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


def test_credentials_are_refused_in_any_part_of_a_destination_and_never_quoted(tmp_path):
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
    f = SeriesFinding(**{**finding("glioma").__dict__, "source_path": "shown/IM1"})
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
