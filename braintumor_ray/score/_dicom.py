"""The DICOM objects of a scoring run, under its lease: built before the run's commit from the
series verdicts of the committed rows as they will be (the series table in memory), staged in the
run's folder and published by its one commit (listed in ``OUTPUT/_manifest.json``'s ``objects``
with their sha256; the objects they replace unlisted in the same write, then deleted); after the
commit, what ``--dicom-send``'s destinations lack of the listed objects, with those bytes, is sent.

It runs on the driver, not on Ray: one SR and at most one SC per series, 74 ms per object for
the whole step (40 SRs and 40 SCs in 5.9 s; benchmarks/bench_dicom.py, this 2-core machine under a
load of 18), against 52 s to score those 160 slices: a thousand series add about two minutes to
an hour of scoring, not worth Ray tasks' overhead and a second staging per task.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..core import (
    MANIFEST_FILE,
    BraintumorError,
    Identifiers,
    Lease,
    Location,
    Manifest,
    StagedWriter,
    StorageError,
    latest_mask,
    remove_child,
    resolve,
)
from ._dicom_out import (
    DICOM_SUFFIX,
    Algorithm,
    DicomObject,
    SeriesFinding,
    banner_lines,
    build_sc,
    build_sr,
    dicom_location,
    parse_object_name,
    plan_dicom,
    sc_pixels,
    source_view,
    to_bytes,
)
from ._dicom_send import SentLedger, parse_destinations, read_dataset, send_with_retries
from ._explain import HeatMaps, UntrustedMap, explain_location

logger = logging.getLogger(__name__)

# The prediction columns the step reads.
SLICE_COLUMNS = {
    "path": pa.string(),
    "model_id": pa.string(),
    "status": pa.string(),
    "scored_at": pa.timestamp("us", tz="UTC"),
    "sop_instance_uid": pa.string(),
    "series_instance_uid": pa.string(),
    "slice_index": pa.int32(),
    "heatmap_path": pa.string(),
    "version": pa.string(),
}


def series_findings(series: pd.DataFrame, rows: pd.DataFrame, model_id: str) -> tuple[list[SeriesFinding], int]:
    """The DICOM series of ``model_id``'s verdicts, and how many of its scored files are not DICOM
    (plain images, NIfTI volumes: no object is made for them). Pure."""
    mine = rows[(rows["model_id"] == model_id)] if len(rows) else rows
    if len(mine):
        when = pa.Table.from_pandas(mine[["path", "scored_at"]], preserve_index=False)
        latest = latest_mask(when).to_numpy(zero_copy_only=False)
        mine = mine[latest & (mine["status"] == "ok").to_numpy()]
    not_dicom = int(mine[mine["sop_instance_uid"].isna()]["path"].nunique()) if len(mine) else 0
    out: list[Any] = []
    if series is None or not len(series):
        return out, not_dicom
    s = series[(series["model_id"] == model_id) & series["series_instance_uid"].notna()]
    for r in s.itertuples(index=False):
        uid = str(r.series_instance_uid)
        members = mine[mine["series_instance_uid"] == uid]
        path, sop, index, heat = (
            _none(r.top_slice_path),
            _none(r.top_slice_sop_instance_uid),
            _none(r.top_slice_index),
            None,
        )
        version = None
        if path is not None:
            at = members[(members["path"] == path) & (members["sop_instance_uid"] == sop)]
            if index is not None:
                at = at[at["slice_index"] == index]
            heat = _none(at["heatmap_path"].dropna().iloc[0]) if at["heatmap_path"].notna().any() else None
            version = _version(at)
        elif len(members):  # no verdict (no slice could vote): any slice gives the study
            path, sop = str(members["path"].iloc[0]), _none(members["sop_instance_uid"].iloc[0])
            version = _version(members.iloc[:1])
        else:
            continue
        pset = r.prediction_set
        out.append(
            SeriesFinding(
                model_id=model_id,
                series_uid=uid,
                study_uid=_none(r.study_instance_uid),
                label=_none(r.predicted_label),
                confidence=None if _none(r.confidence) is None else float(r.confidence),
                review_reason=_none(r.review_reason),
                prediction_set=None if pset is None or (isinstance(pset, float)) else tuple(pset),
                source_path=path,
                source_sop_uid=sop,
                slice_index=None if index is None else int(index),
                heatmap_path=heat,
                source_version=version,
            )
        )
    return out, not_dicom


@dataclass(frozen=True)
class DicomObjects:
    """What ``--dicom-out`` adds to a run's one commit: the objects to publish (manifest key
    ``_dicom/NAME`` -> bytes) and the committed ones to retire (keys), with the summary's ``dicom``
    entry as far as the commit goes (sending comes after it)."""

    objects: dict[str, bytes] = field(repr=False)
    retire: tuple[str, ...]
    summary: dict[str, Any]

    @property
    def changes(self) -> bool:
        return bool(self.objects or self.retire)


def dicom_objects(
    config,
    *,
    dst: Location,
    src: Location,
    ids: Identifiers,
    sources: dict[str, str],
    algo: Algorithm,
    rows: pa.Table,
    series: pa.Table | None,
    listed: Mapping[str, Mapping[str, Any]],
    maps: HeatMaps | None = None,
) -> DicomObjects | None:
    """The objects the run's commit carries, built before it (None when neither ``--dicom-out`` nor
    ``--dicom-send`` is asked for).

    ``rows``: the output's rows as they will be after the commit; ``series``: the per-series table
    the job built from them in memory (a rewritten ``OUTPUT_series/series.parquet`` never reaches an
    SR); ``listed``: the manifest's objects now (key -> entry), the only committed objects there are;
    ``maps``: the heat maps an SC may draw (by default those ``listed``)."""
    dests = parse_destinations(config.dicom_send)
    if config.dicom_out == "none" and not dests:
        return None
    root = dicom_location(dst)
    table = rows.select([c for c in SLICE_COLUMNS if c in rows.column_names]).to_pandas()
    findings, not_dicom = series_findings(series.to_pandas() if series is not None else None, table, algo.model_id)
    committed = {k.partition("/")[2]: dict(e) for k, e in listed.items() if k.startswith(f"{DICOM_SUFFIX}/")}
    live = set(table["model_id"].dropna().unique()) if len(table) else set()
    plan = plan_dicom(findings, config.dicom_out, committed, model_id=algo.model_id, live_models=live)
    key = object_key(ids, keep_identifiers=config.dicom_identifiers)
    out: dict[str, Any] = {
        "mode": config.dicom_out,
        "series": len(findings),
        "not_dicom_files": not_dicom,
        "sr": 0,
        "sc": 0,
        "skipped": 0,
    }

    heat = maps if maps is not None else HeatMaps(explain_location(dst), listed)

    def build(obj: DicomObject, previous: Any) -> bytes:
        return _object_bytes(obj, config, src, ids, sources, algo, key=key, previous=previous, maps=heat)

    objects, counts = _build_objects(plan.write, build, root=root, committed=committed)
    for what, n in counts.items():
        out[what] += n
    retire = tuple(f"{DICOM_SUFFIX}/{n}" for n in plan.retire if parse_object_name(n) is not None)
    if retire:
        out["retired"] = len(retire)
    return DicomObjects(objects={f"{DICOM_SUFFIX}/{n}": b for n, b in objects.items()}, retire=retire, summary=out)


def _build_objects(
    objects: Sequence[DicomObject],
    build: Callable[[DicomObject, Any], bytes],
    *,
    root: Location,
    committed: dict[str, dict],
) -> tuple[dict[str, bytes], Counter[str]]:
    """Each object ``build`` makes (given the SR it replaces, when there is one), by file name, and
    the count of each kind, and ``skipped``: one series' source gone, changed or unreadable costs its
    objects, the others still get theirs."""
    counts: Counter[str] = Counter()
    built: dict[str, bytes] = {}
    for obj in objects:
        previous = _predecessor(root, obj.predecessor, committed) if obj.kind == "sr" else None
        try:
            built[obj.name] = build(obj, previous)
        except Exception as e:
            logger.warning(
                "score: no DICOM %s for a series (its source file %s: %s)",
                obj.kind.upper(),
                obj.finding.source_path,
                _cause(e),
            )
            counts["skipped"] += 1
            continue
        counts[obj.kind] += 1
    return built, counts


def send_committed(dst: Location, config, lease: Lease) -> list[dict[str, Any]] | None:
    """After the commit: send the objects ``OUTPUT/_manifest.json`` lists, with those bytes, to each
    ``--dicom-send`` destination that lacks them (None when none is asked for)."""
    dests = parse_destinations(config.dicom_send)
    if not dests:
        return None
    doc = Manifest(dst, what="score").read_doc()
    return _send(dicom_location(dst), dests, config, lease, (doc or {}).get("objects", {}))


def migrate_dicom_manifest(writer: StagedWriter) -> int:
    """An output whose DICOM objects an older version named in ``OUTPUT_dicom/_manifest.json``: each
    object listed there whose bytes still match is listed in ``OUTPUT/_manifest.json``'s objects (a
    changed or missing one is not: the next run builds it again from the committed rows), then that
    old manifest is deleted. Cut off between the two, the next run does it again. The number adopted."""
    root = dicom_location(writer.output)
    old = Manifest(root, what="dicom")
    if not old.location.exists():
        return 0
    try:
        listed = old.read() or {}
    except StorageError as e:
        logger.warning("score: %s: no object of it is adopted", _cause(e))
        listed = {}
    adopted, left = {}, []
    for name, entry in sorted(listed.items()):
        # Only our own object names (plain children of OUTPUT_dicom/), there, with the listed bytes.
        if parse_object_name(name) is None or not isinstance(entry, dict) or not root.join(name).exists():
            left.append(name)
            continue
        sha = hashlib.sha256(root.join(name).read_bytes()).hexdigest()
        if sha != entry.get("sha256"):
            left.append(name)
            continue
        adopted[f"{DICOM_SUFFIX}/{name}"] = {"sha256": sha, "committed_at": entry.get("committed_at"), "migrated": True}
    if writer.manifest is None or writer.manifest.read() is None:
        adopted = {}  # no committed rows: no object stands (none could be made without them)
    n = writer.adopt_objects(adopted)
    if left:
        logger.warning(
            "score: %d objects named in %s are gone or not the bytes it lists: not adopted, never sent; "
            "the objects of the committed rows are built again",
            len(left),
            old.location.uri,
        )
    remove_child(writer.output, root, MANIFEST_FILE, what="score")
    logger.info("score: %d DICOM objects of %s now listed in %s", n, old.location.uri, MANIFEST_FILE)
    return n


def _predecessor(root: Location, name: str | None, committed: dict[str, dict]):
    """The committed SR that a new SR replaces, or None: none, or one gone or rewritten (the new
    verdict still goes, naming no predecessor)."""
    if not name:
        return None
    try:
        return _committed_dataset(root, name, committed)
    except Exception as e:
        logger.warning(
            "score: the SR that a new SR replaces (%s) cannot be read (%s): the new one names no predecessor",
            name,
            _cause(e),
        )
        return None


def object_key(ids: Identifiers, *, keep_identifiers: bool) -> bytes:
    """The key of the objects' own UIDs: the output's identifier key (from the environment, never the
    output) when a mode hashes and the objects do not carry the source identifiers anyway."""
    return ids.key if ids.hashes and not keep_identifiers else b""


def _committed_dataset(root: Location, name: str, committed: dict[str, dict]):
    """A committed object, its bytes checked against the manifest (the predecessor an SR names)."""
    data = root.join(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != committed.get(name, {}).get("sha256"):
        raise SourceChanged(f"{name} is not the object that was committed (its sha256 differs from the manifest's)")
    return read_dataset(data)


def check_source(ds, f: SeriesFinding, ids: Identifiers) -> None:
    """The source's SOP Instance, Series and Study UIDs (as the output shows them) must be its row's."""
    pairs = [
        ("SOPInstanceUID", f.source_sop_uid),
        ("SeriesInstanceUID", f.series_uid),
        ("StudyInstanceUID", f.study_uid),
    ]
    for keyword, expected in pairs:
        value = ds.get(keyword)
        if expected is not None and ids.uid(None if value is None else str(value)) != expected:
            raise SourceChanged(
                f"its {keyword} is not the one its row holds (the file was rewritten after it was "
                "scored): left out; the next run scores it again and makes its objects"
            )


def head_region(gray: np.ndarray) -> np.ndarray:
    """In a hashing mode, the slice an SC shows without a map: only the head's box (the crop the model
    sees, :func:`imaging.find_head_box`), so that a name or date burned into the scan's corners does
    not go out with an object that is meant to carry no identifier."""
    from ..imaging import find_head_box

    box = find_head_box(gray)
    if box is None:
        raise NoHeadRegion(
            "no head region in the slice: in a hashed mode an SC shows only the head's region, so "
            "none is made for it (its SR is)"
        )
    x0, y0, x1, y1 = box
    return gray[y0:y1, x0:x1]


class NoHeadRegion(BraintumorError):
    """A hashed-mode SC without a map has no head region to show."""


class SourceChanged(BraintumorError):
    """A file the DICOM step reads is not the one the rows were made from."""


def _object_bytes(
    obj: DicomObject,
    config,
    src: Location,
    ids: Identifiers,
    sources: dict[str, str],
    algo: Algorithm,
    *,
    key: bytes = b"",
    previous=None,
    maps: HeatMaps | None = None,
) -> bytes:
    f = obj.finding
    listed = sources.get(f.source_path)
    if listed is None:
        raise FileNotFoundError("not in the input any more")
    from ..imaging import read_medical

    # Held to the version its row was made from (ChangedSinceListed otherwise), and its UIDs checked
    # against the row: a file rewritten since never files this verdict in another patient's study.
    data = src.read_limited(listed, config.guard.max_file_bytes, version=f.source_version)
    ds = read_dataset(data)
    check_source(ds, f, ids)
    view = source_view(ds, ids, keep_identifiers=config.dicom_identifiers)
    if obj.kind == "sr":
        return to_bytes(build_sr(view, f, algo, notice=config.dicom_banner, key=key, previous=previous))
    if f.heatmap_path:
        from ..imaging import decode_png

        if maps is not None:  # a listed map of this output's OUTPUT_explain/, with its bytes, or none
            try:
                image = decode_png(maps.read(f.heatmap_path))
            except UntrustedMap as e:
                raise SourceChanged(
                    f"{e}: no SC is made from it (score the file again with --explain for a map)"
                ) from e
        else:
            image = decode_png(resolve(f.heatmap_path, s3_endpoint_url=config.s3_endpoint_url).read_bytes())
    else:  # no map (--explain none, or a row scored before it): the slice as the model saw it, grey
        slices = read_medical(data, "dicom", guard=config.guard)
        image = slices[f.slice_index or 0].gray
        if ids.hashes and not config.dicom_identifiers:
            image = head_region(image)
    pixels = sc_pixels(image, banner_lines(f, config.dicom_banner))
    return to_bytes(build_sc(view, pixels, f, notice=config.dicom_banner, key=key))


def _send(root: Location, dests, config, lease: Lease, listed: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Send every committed object a destination lacks; per destination: sent, already, failed, error.
    A list, not a mapping by destination: MLflow metric names may not hold a URL's ``:`` and ``@``.
    ``listed``: the manifest's objects after the commit; only those, with those bytes, are sent (a
    ``.dcm`` put into OUTPUT_dicom/ by hand, or one rewritten there, never is)."""
    committed = _committed_objects(root, listed)
    ledger = SentLedger(root)
    return [_send_to(dest, committed, ledger, config, lease) for dest in dests]


def _committed_objects(root: Location, listed: Mapping[str, Mapping[str, Any]]) -> dict[str, bytes]:
    """The manifest's DICOM objects whose bytes on storage are the ones committed, by name."""
    committed = {}
    for key, listed_entry in sorted(listed.items()):
        suffix, _, name = key.partition("/")
        if suffix != DICOM_SUFFIX or parse_object_name(name) is None:
            continue
        loc = root.join(name)
        data = loc.read_bytes() if loc.exists() else None
        if data is None or hashlib.sha256(data).hexdigest() != listed_entry.get("sha256"):
            logger.warning(
                "score: %s is gone or not the object that was committed (its sha256 differs from the "
                "manifest's): not sent",
                loc.uri,
            )
            continue
        committed[name] = data
    return committed


def _send_to(dest, committed: Mapping[str, bytes], ledger: SentLedger, config, lease: Lease) -> dict[str, Any]:
    """The objects of ``committed`` that ``dest``'s ledger lacks, sent (each one stored is in the
    ledger at once); the destination's entry of the run's report."""
    names = ledger.pending(dest, sorted(committed))
    entry: dict[str, Any] = {"destination": dest.key, "sent": 0, "already": len(committed) - len(names), "failed": 0}
    if names:
        datasets = {n: read_dataset(committed[n]) for n in names}
        by_uid = {str(ds.SOPInstanceUID): n for n, ds in datasets.items()}

        def record(got: dict[str, str | None]) -> None:
            stored = [u for u, error in got.items() if error is None and u in by_uid]
            for uid in stored:
                ledger.record(dest, by_uid[uid], uid)
            if stored:
                lease.check()
                ledger.save()

        result = send_with_retries(
            dest,
            list(datasets.values()),
            calling_aet=config.dicom_ae_title,
            retries=config.dicom_send_retries,
            on_try=record,
        )
        for ds in datasets.values():
            error = result.get(str(ds.SOPInstanceUID))
            if error is None:
                entry["sent"] += 1
            else:
                entry["failed"] += 1
                entry["error"] = str(error)
        lease.check()
        ledger.save()
    if entry["failed"]:
        logger.warning(
            "score: %d DICOM objects not sent to %s (%s): the run stands; the next run sends them",
            entry["failed"],
            dest.key,
            entry.get("error"),
        )
    return entry


def _version(rows: pd.DataFrame) -> str | None:
    if "version" not in rows.columns or not len(rows):
        return None
    return _none(rows["version"].iloc[0])


def _cause(e: Exception) -> str:
    """An error as a log line may give it: our own messages (cause and fix, no header values); of any
    other (pydicom's, highdicom's: they quote the value they reject) its type only."""
    if isinstance(e, (BraintumorError, OSError)):  # OSError: the filesystem's, or ChangedSinceListed
        return f"{type(e).__name__}: {e}"
    return f"{type(e).__name__} (its message is not logged: it may quote a patient attribute)"


def _none(v):
    if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
        return None
    return v
