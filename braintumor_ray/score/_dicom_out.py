"""DICOM objects of a scoring run (``--dicom-out``): a Structured Report per scored DICOM series, and a
Secondary Capture per flagged or positive one, in ``OUTPUT_dicom/``.

Both are built with highdicom (weighed against writing the SR content tree with pydicom by hand:
highdicom checks the templates' rules and the IODs' required modules, which is what a PACS
validates on import; MONAI Deploy's Basic Text SR writer was no fit, it has no coded content).

The SR is a Comprehensive 3D SR holding a TID 1500 Measurement Report, the closest fit highdicom
offers for a classification finding: one TID 1501 measurement group (no region: the finding is
about the series) with the finding type (SCT Neoplasm, or SCT Normal for no tumour), finding site
(SCT Brain), the class as a qualitative evaluation "Finding" coded in our private scheme
:data:`CODING_SCHEME` (no public code covers these four classes: pydicom's code dictionary has no
glioma, meningioma or pituitary tumour, and codes we cannot check are worse than private ones), the
calibrated confidence as "Probability" (DCM 122157, unit UCUM 1), the review reason (private code),
the source image (the top slice), and the algorithm identification (model name, version, model id).

The SC is the top slice with its Grad-CAM overlay (the PNG of ``--explain``; the grey slice without
one) and a burned-in banner: verdict, confidence, review reason and the configured notice.

Identifiers: with ``path_mode`` and ``uid_mode`` ``full`` the objects join the source study (its
Study Instance UID and patient module copied from the source file). When a mode hashes, the objects
carry the hashed UIDs the rows carry and an empty patient module, so they form a study of their own
in the PACS that no source identifier names, unless ``dicom_identifiers`` copies them anyway.
An object's SOP Instance UID is derived from the model id, the source series and the object's
content (:func:`content_digest`): a rerun, or a run cut off and redone, makes the same UID (a PACS
overwrites instead of doubling); a changed verdict makes a new one, and the new SR names the one
it replaces. In a hashing mode the derivation is keyed (:func:`object_uids`).

Everything here is a pure function of its arguments; :mod:`._dicom` reads the sources and stages
the files, :mod:`._dicom_send` sends them.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..core import Identifiers, Location

logger = logging.getLogger(__name__)

DICOM_SUFFIX = "_dicom"
DicomOut = Literal["none", "sr", "sc", "sr+sc"]
DEFAULT_BANNER = "NOT FOR DIAGNOSTIC USE"
# Private coding scheme ("99" prefix: DICOM PS3.16 8.2's convention for local schemes).
CODING_SCHEME = "99BTRAY"
MANUFACTURER = "braintumor-ray"
# Series numbers of the objects in the study (high: out of the way of the scanner's series).
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
NO_TUMOR = "no_tumor"
_CLASS_MEANING = {
    "glioma": "Glioma",
    "meningioma": "Meningioma",
    "pituitary": "Pituitary tumour",
    NO_TUMOR: "No tumour",
}
_REASON = {
    "low_confidence": ("LOWCONF", "Low confidence"),
    "ambiguous": ("AMBIGUOUS", "Ambiguous: several classes"),
    "out_of_distribution": ("OOD", "Out of distribution"),
    "no_head_content": ("NOHEAD", "No head content"),
}
# What the SR copies from the source file: the patient and study modules, nothing else.
PATIENT_STUDY_TAGS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)
# The SC's width on screen: the model's input (64-384 px) upscaled so the banner text reads.
SC_WIDTH = 512


def dicom_location(dst: Location) -> Location:
    """``OUTPUT_dicom`` beside ``OUTPUT`` (outside any glob over the predictions)."""
    return dst.sibling(DICOM_SUFFIX)


@dataclass(frozen=True)
class Algorithm:
    """Which model said it: name (backbone, or the registered model), version, and model id."""

    name: str
    version: str
    model_id: str


@dataclass(frozen=True)
class SeriesFinding:
    """One series' verdict, as the series table has it (UIDs as the output shows them)."""

    model_id: str
    series_uid: str
    study_uid: str | None
    label: str | None
    confidence: float | None
    review_reason: str | None
    prediction_set: tuple[str, ...] | None
    source_path: str  # the top slice's file (or any slice's, without a verdict), as the output names it
    source_sop_uid: str | None
    slice_index: int | None
    heatmap_path: str | None
    source_version: str | None = None  # the source file's version its row was made from (the listing's)

    @property
    def wants_sc(self) -> bool:
        """Flagged or positive (a tumour class or a review reason), with a slice to show."""
        return self.label is not None and (self.label != NO_TUMOR or self.review_reason is not None)


@dataclass(frozen=True)
class DicomObject:
    """One object to write: which kind, for which series (its verdict), under which file name;
    ``predecessor``: the committed object of the same model, series and kind that it replaces."""

    kind: Literal["sr", "sc"]
    finding: SeriesFinding
    predecessor: str | None = None

    @property
    def digest(self) -> str:
        return content_digest(self.finding, self.kind)

    @property
    def name(self) -> str:
        return object_name(self.finding.model_id, self.finding.series_uid, self.kind, self.digest)


@dataclass(frozen=True)
class DicomPlan:
    """What a run does in ``OUTPUT_dicom/``: objects to write, committed ones to retire (their verdict
    is no longer the series' verdict, or their model's rows are gone): out of the manifest, never sent."""

    write: tuple[DicomObject, ...]
    retire: tuple[str, ...]


def content_digest(f: SeriesFinding, kind: str) -> str:
    """12 hex digits over what an object shows: the verdict (class, confidence to 4 places, review
    reason, classes still possible), the source slice, and for an SC its map. Another verdict is
    another object: another file name and other UIDs."""
    doc = [
        kind,
        f.model_id,
        f.series_uid,
        f.study_uid,
        f.label,
        None if f.confidence is None else round(float(f.confidence), 4),
        f.review_reason,
        list(f.prediction_set or ()),
        f.source_sop_uid,
        f.slice_index,
        f.heatmap_path if kind == "sc" else None,
    ]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()[:12]


def object_name(model_id: str, series_uid: str, kind: str, digest: str = "") -> str:
    """The file name: from a digest of the series UID (no UID in a file name), the model id, kind and
    the content digest."""
    return (
        f"{hashlib.sha256(series_uid.encode()).hexdigest()[:20]}-{model_id}-{kind}{'-' + digest if digest else ''}.dcm"
    )


_NAME = re.compile(r"([0-9a-f]{20})-([0-9A-Za-z_.]+?)-(sr|sc)(?:-([0-9a-f]{12}))?\.dcm")


def parse_object_name(name: str) -> tuple[str, str, str] | None:
    """(series digest, model id, kind) of one of our file names, None for any other name."""
    m = _NAME.fullmatch(name)
    return (m.group(1), m.group(2), m.group(3)) if m else None


def object_uids(model_id: str, series_uid: str, kind: str, digest: str = "", *, key: bytes = b"") -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of an object. The series is one per model, source
    series and kind (each new version of a verdict joins it); the instance is one per content, so
    another verdict is another instance, in this output or any other. With ``key`` (a hashing mode)
    both are keyed hashes (HMAC-SHA256 as ``2.25.<decimal>``): nobody without the key can compute them
    from the source UIDs and the model id the SR shows."""
    series = ["braintumor-ray", kind, "series", model_id, series_uid]
    instance = ["braintumor-ray", kind, "instance", model_id, series_uid, *([digest] if digest else [])]
    if key:

        def keyed(parts: list[str]) -> str:
            mac = hmac.new(key, "\x00".join(["object-uid", *parts]).encode(), hashlib.sha256).digest()
            return f"2.25.{int.from_bytes(mac[:16], 'big')}"

        return keyed(series), keyed(instance)
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=series), generate_uid(entropy_srcs=instance)


def _kinds(mode: str) -> set[str]:
    return set() if mode == "none" else set(mode.split("+"))


def plan_dicom(
    findings: Sequence[SeriesFinding], mode: str, committed: Iterable[str], *, model_id: str, live_models: Iterable[str]
) -> DicomPlan:
    """The objects ``mode`` asks for that are not committed yet, and the committed ones to retire. Pure.

    An SR for every series; an SC for each flagged or positive one; each named after its content,
    so a changed verdict (more slices, a rescore) is a new object that names the one it replaces.
    A committed object stays only while it shows its series' current verdict (of this run's model),
    or belongs to another model whose rows are still in the output; anything else is retired,
    whatever ``mode`` asks now. Names that are not ours are left alone.
    """
    committed = sorted(committed)
    live = set(live_models)
    current = {}  # (series digest, kind) -> the object of the current verdict
    for f in findings:
        for kind in ("sr", "sc"):
            if kind == "sr" or f.wants_sc:
                obj = DicomObject(kind, f)
                current[(obj.name.split("-", 1)[0], kind)] = obj
    retire, before, replaced_model = [], {}, {}
    for name in committed:
        parsed = parse_object_name(name)
        if parsed is None:
            continue
        series, model, kind = parsed
        if model != model_id:
            if model not in live:  # its rows are gone (--rescore-all): this model's verdict replaces it
                retire.append(name)
                replaced_model[(series, kind)] = name
            continue
        now = current.get((series, kind))
        if now is None or now.name != name:
            retire.append(name)
            if now is not None:
                before[now.name] = name
    kinds = _kinds(mode)
    done = set(committed)
    write = tuple(
        DicomObject(o.kind, o.finding, before.get(o.name, replaced_model.get(at)))
        for at, o in current.items()
        if o.kind in kinds and o.name not in done
    )
    return DicomPlan(write=write, retire=tuple(retire))


def plan_objects(
    findings: Sequence[SeriesFinding], mode: str, done: set[str] | frozenset[str] = frozenset()
) -> list[DicomObject]:
    """The objects ``mode`` asks for that are not written yet (``done``: committed file names)."""
    if not findings:
        return []
    plan = plan_dicom(findings, mode, done, model_id=findings[0].model_id, live_models=())
    return list(plan.write)


def banner_lines(f: SeriesFinding, notice: str) -> list[str]:
    """The SC's burned-in text: verdict, confidence, review reason, the notice."""
    label = _CLASS_MEANING.get(f.label or "", f.label or "no verdict")
    lines = [f"AI verdict: {label}" + (f"  confidence {f.confidence:.0%}" if f.confidence is not None else "")]
    lines.append(
        f"Review: {_REASON.get(f.review_reason, (None, f.review_reason))[1]}"
        if f.review_reason
        else "Review: not flagged"
    )
    if f.prediction_set and len(f.prediction_set) > 1:
        lines.append("Still possible: " + ", ".join(_CLASS_MEANING.get(c, c) for c in f.prediction_set))
    if notice:
        lines.append(notice)
    return lines


def sc_pixels(
    image: np.ndarray, lines: Sequence[str], *, width: int = SC_WIDTH, highlight_last: bool = True
) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` (grey or RGB) scaled to ``width``, under a banner of ``lines``
    in white on black (burned in: every viewer shows it, none can hide it)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    h = max(1, round(img.height * width / img.width))
    img = img.resize((width, h), Image.Resampling.BICUBIC)
    font = ImageFont.load_default(size=18)
    # The last line is the notice when one is given: in yellow, so it is not read as part of the verdict.
    wrapped = [(w, k == len(lines) - 1) for k, line in enumerate(lines) for w in (textwrap.wrap(line, 44) or [""])]
    line_h = 24
    banner = 10 + line_h * len(wrapped)
    out = Image.new("RGB", (width, h + banner), "black")
    out.paste(img, (0, banner))
    draw = ImageDraw.Draw(out)
    for k, (text, last) in enumerate(wrapped):
        draw.text((10, 6 + k * line_h), text, fill="yellow" if last and highlight_last else "white", font=font)
    return np.asarray(out)


def source_view(ds, ids: Identifiers, *, keep_identifiers: bool):
    """The source file's header as the objects may show it: the patient and study modules and the
    top slice's identity; with a hashing mode (and not ``keep_identifiers``) the UIDs hashed as the
    rows hash them and the patient module empty.

    A value that does not conform to its VR is normalised where the intent is plain (dates with
    dashes or dots, times with colons) or dropped (left empty: these attributes are type 2), so the
    SR/SC is still made; :func:`dropped_attributes` names what was dropped, and the objects say so.
    No value is read through pydicom's validation, which logs the value it rejects."""
    from pydicom.dataset import Dataset

    view = Dataset()
    full = not ids.hashes or keep_identifiers
    dropped = []
    with _no_value_warnings():
        for tag in PATIENT_STUDY_TAGS:
            if tag == "StudyInstanceUID":
                continue
            value, ok = conform(tag, ds.get(tag, "") if full else "")
            if not ok:
                dropped.append(tag)
            setattr(view, tag, value)
        # path_mode hashed alone hashes the UIDs in the objects too: a study's UID names a patient's visit.
        uid = (lambda u: u) if full else ids.uid if ids.uid_mode == "hashed" else _hash_uid(ids)
        view.StudyInstanceUID = uid(str(ds.StudyInstanceUID))
        view.SeriesInstanceUID = uid(str(ds.SeriesInstanceUID))
        view.SOPInstanceUID = uid(str(ds.SOPInstanceUID))
        view.SOPClassUID = ds.SOPClassUID
        modality, ok = conform("Modality", ds.get("Modality", "MR"))
        view.Modality = modality if ok and modality else "MR"
    if any(not str(view.get(t, "")).isascii() for t in PATIENT_STUDY_TAGS):
        # The values are decoded text now (from the source's own character set): declared as UTF-8,
        # as the objects write them, instead of non-ASCII bytes under the default repertoire.
        view.SpecificCharacterSet = "ISO_IR 192"
    view.btray_dropped = tuple(dropped)  # a Python attribute, not a data element: never written out
    return view


def dropped_attributes(view) -> tuple[str, ...]:
    """The source attributes :func:`source_view` left empty because their values did not conform."""
    return tuple(getattr(view, "btray_dropped", ()))


def dropped_note(view) -> str | None:
    """What the objects say of the dropped attributes (their names, never their values)."""
    names = dropped_attributes(view)
    return f"Source attributes not copied (values not conformant): {', '.join(names)}" if names else None


_SEX = {"M", "F", "O"}  # PS3.3 C.7.1.1: PatientSex's enumerated values ("U" and others are not among them)


def conform(keyword: str, value) -> tuple[str, bool]:
    """``value`` of attribute ``keyword`` as a conformant string, and whether it was kept: (value, True),
    normalised where the intent is plain, or ("", False) when dropped. Pure; never quotes the value."""
    import re

    from pydicom import config
    from pydicom.datadict import dictionary_VR
    from pydicom.valuerep import validate_value

    text = "" if value is None else str(value).strip()
    if not text:
        return "", True
    vr = dictionary_VR(keyword)
    if vr == "DA":
        m = re.fullmatch(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})", text)
        text = "".join(m.groups()) if m else text
    elif vr == "TM":
        m = re.fullmatch(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?", text)
        text = "".join(g or "" for g in m.groups()) if m else text
    elif keyword == "PatientSex":
        text = text.upper()
        if text not in _SEX:
            return "", False
    try:
        validate_value(vr, text, config.RAISE)
        if vr == "DA":
            from datetime import date

            date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except Exception:  # pydicom's message quotes the value: not passed on
        return "", False
    return text, True


class _no_value_warnings:
    """pydicom's reading validation off while a source's header is copied: it logs rejected values."""

    def __enter__(self):
        import warnings

        from pydicom import config

        self._mode = config.settings.reading_validation_mode
        config.settings.reading_validation_mode = config.IGNORE
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        from pydicom import config

        self._warnings.__exit__(*exc)
        config.settings.reading_validation_mode = self._mode
        return False


def _hash_uid(ids: Identifiers):
    """A UID hashed with the output's key even where uid_mode is full (path_mode hashed)."""
    hashing = Identifiers(ids.path_mode, "hashed", ids.root, ids.key)
    return hashing.uid


def build_sr(view, f: SeriesFinding, algo: Algorithm, *, notice: str, key: bytes = b"", previous=None):
    """The Comprehensive 3D SR (TID 1500) of one series' verdict; ``previous``: the SR it replaces
    (named in its Predecessor Documents Sequence); ``key``: the UIDs' key in a hashing mode."""
    import highdicom as hd

    series_uid, sop_uid = object_uids(f.model_id, f.series_uid, "sr", content_digest(f, "sr"), key=key)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[view],
        content=sr_content(view, f, algo, key=key),
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        previous_versions=[previous] if previous is not None else None,
    )
    sr.SeriesDescription = _description("AI result", notice)
    if "SpecificCharacterSet" in view:
        sr.SpecificCharacterSet = view.SpecificCharacterSet
    return sr


def sr_content(view, f: SeriesFinding, algo: Algorithm, *, key: bytes = b""):
    """The SR's content tree: a TID 1500 measurement report by the model (a device observer) whose
    one group holds the series' finding, review reason and confidence about the brain in ``view``,
    and a comment naming the attributes left out of the copy (:func:`dropped_note`), if any."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo_id = hd.sr.AlgorithmIdentification(
        name=algo.name, version=algo.version, parameters=[f"model_id={algo.model_id}"], manufacturer=MANUFACTURER
    )
    finding_type, qualitative, measurements = _evaluations(f, algo_id)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=object_uids(f.model_id, f.series_uid, "track", key=key)[1],
            identifier=f"series verdict of model {algo.model_id}",
        ),
        finding_type=finding_type,
        algorithm_id=algo_id,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        measurements=measurements or None,
        qualitative_evaluations=qualitative or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(view.SOPClassUID, view.SOPInstanceUID)],
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=object_uids(algo.model_id, "device", "device")[1],
            name=algo.name,
            manufacturer_name=MANUFACTURER,
            model_name=algo.model_id,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
    )
    note = dropped_note(view)
    if note:  # the reader learns why, e.g., the patient's sex is empty (a TEXT "Comment", DCM 121106)
        report[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment, value=note, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    return report[0]


def _evaluations(f: SeriesFinding, algo_id) -> tuple[Any, list, list]:
    """The verdict as SR items: the finding type (normal or neoplasm; None without a label), the
    qualitative evaluations (the class, the review reason) and the measurement (the confidence)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    qualitative, measurements = [], []
    finding_type = None
    if f.label is not None:
        finding_type = codes.SCT.Normal if f.label == NO_TUMOR else codes.SCT.Neoplasm
        qualitative.append(hd.sr.QualitativeEvaluation(name=codes.DCM.Finding, value=class_code(f.label)))
    if f.review_reason is not None:
        qualitative.append(
            hd.sr.QualitativeEvaluation(
                name=Code("REVIEW", CODING_SCHEME, "Review reason"), value=reason_code(f.review_reason)
            )
        )
    if f.confidence is not None:
        measurements.append(
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=round(float(f.confidence), 4),
                unit=Code("1", "UCUM", "no units"),
                algorithm_id=algo_id,
            )
        )
    return finding_type, qualitative, measurements


def build_sc(view, pixels: np.ndarray, f: SeriesFinding, *, notice: str, key: bytes = b""):
    """The Secondary Capture of one series: ``pixels`` (from :func:`sc_pixels`) in its study."""
    import highdicom as hd

    series_uid, sop_uid = object_uids(f.model_id, f.series_uid, "sc", content_digest(f, "sc"), key=key)
    sc = hd.sc.SCImage.from_ref_dataset(
        view,
        pixels,
        "RGB",
        8,
        "PATIENT",
        series_uid,
        SC_SERIES_NUMBER,
        sop_uid,
        1,
        MANUFACTURER,
        patient_orientation=("L", "P"),
    )
    # The capture is a crop with a banner: no orientation is claimed (type 2, empty; highdicom's
    # stub types the attribute as a list only).
    sc.PatientOrientation = None  # type: ignore[assignment]
    sc.SeriesDescription = _description("AI heat map", notice)
    if "SpecificCharacterSet" in view:
        sc.SpecificCharacterSet = view.SpecificCharacterSet
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = " / ".join([*banner_lines(f, notice), *filter(None, [dropped_note(view)])])[:10240]
    return sc


def class_code(label: str):
    from pydicom.sr.coding import Code

    return Code(label.upper().replace(" ", "_")[:16], CODING_SCHEME, _CLASS_MEANING.get(label, label))


def reason_code(reason: str):
    from pydicom.sr.coding import Code

    value, meaning = _REASON.get(reason, (reason.upper()[:16], reason))
    return Code(value, CODING_SCHEME, meaning)


def _description(what: str, notice: str) -> str:
    return f"{what} ({notice})"[:64] if notice else what


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
