"""The DICOM step of a scoring run, under its lease, after the rows and the series table are
committed: write the objects ``--dicom-out`` asks for (staged and committed as the rows are, named
in ``OUTPUT_dicom/_manifest.json``), then send what ``--dicom-send``'s destinations lack.

It runs on the driver, not on Ray: one SR and at most one SC per series, 74 ms per object for
the whole step (40 SRs and 40 SCs in 5.9 s; benchmarks/bench_dicom.py, this 2-core machine under a
load of 18), against 52 s to score those 160 slices: a thousand series add about two minutes to
an hour of scoring, not worth Ray tasks' overhead and a second staging per task.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..core import (
    BraintumorError,
    Identifiers,
    Lease,
    Location,
    Manifest,
    StagedWriter,
    latest_mask,
    posix_basename,
    remove_child,
    resolve,
)
from ._dicom_out import (
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
from ._explain import explain_location

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


def run_dicom_step(
    config,
    *,
    dst: Location,
    src: Location,
    ids: Identifiers,
    sources: dict[str, str],
    lease: Lease,
    run_id: str,
    algo: Algorithm,
    rows: pa.Table,
    series: pa.Table | None,
) -> dict[str, Any] | None:
    """Write and send; the summary's ``dicom`` entry (None when neither is asked for).

    ``rows``: the output's committed rows; ``series``: the per-series table the job built from
    them in memory. Neither is read from storage here: a rewritten ``OUTPUT_series/series.parquet``
    never reaches an SR."""
    dests = parse_destinations(config.dicom_send)
    if config.dicom_out == "none" and not dests:
        return None
    root = dicom_location(dst)
    writer = StagedWriter(root, what="dicom", lease=lease, manifest=True)
    _leave_staged(writer, run_id)
    table = rows.select([c for c in SLICE_COLUMNS if c in rows.column_names]).to_pandas()
    findings, not_dicom = series_findings(series.to_pandas() if series is not None else None, table, algo.model_id)
    assert writer.manifest is not None  # manifest=True
    manifest = writer.manifest.read() or {}
    live = set(table["model_id"].dropna().unique()) if len(table) else set()
    plan = plan_dicom(findings, config.dicom_out, manifest, model_id=algo.model_id, live_models=live)
    key = object_key(ids, keep_identifiers=config.dicom_identifiers)
    out: dict[str, Any] = {
        "mode": config.dicom_out,
        "series": len(findings),
        "not_dicom_files": not_dicom,
        "sr": 0,
        "sc": 0,
        "skipped": 0,
    }
    if plan.write:

        def build(obj: DicomObject, previous: Any) -> bytes:
            return _object_bytes(
                obj, config, src, ids, sources, algo, key=key, previous=previous, explain_root=explain_location(dst)
            )

        for what, n in _write_objects(plan.write, build, writer=writer, run_id=run_id, manifest=manifest).items():
            out[what] += n
    if plan.retire:
        _retire(dst, writer, plan.retire)
        out["retired"] = len(plan.retire)
    if dests:
        out["sent"] = _send(root, dests, config, lease)
    return out


def _write_objects(
    objects: Sequence[DicomObject],
    build: Callable[[DicomObject, Any], bytes],
    *,
    writer: StagedWriter,
    run_id: str,
    manifest: dict[str, dict],
) -> Counter[str]:
    """Stage each object ``build`` makes (given the SR it replaces, when there is one) and commit
    them; the count of each kind written, and ``skipped``: one series' source gone, changed or
    unreadable costs its objects, the others still get theirs."""
    counts: Counter[str] = Counter()
    stage = writer.stage(run_id)
    for obj in objects:
        previous = _predecessor(writer.output, obj.predecessor, manifest) if obj.kind == "sr" else None
        try:
            data = build(obj, previous)
        except Exception as e:
            logger.warning(
                "score: no DICOM %s for a series (its source file %s: %s)",
                obj.kind.upper(),
                obj.finding.source_path,
                _cause(e),
            )
            counts["skipped"] += 1
            continue
        stage.join(obj.name).write_bytes(data)
        counts[obj.kind] += 1
    if stage.exists():
        writer.commit(stage)
    return counts


def _predecessor(root: Location, name: str | None, manifest: dict[str, dict]):
    """The committed SR that a new SR replaces, or None: none, or one gone or rewritten (the new
    verdict still goes, naming no predecessor)."""
    if not name:
        return None
    try:
        return _committed_dataset(root, name, manifest)
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


def _leave_staged(writer: StagedWriter, run_id: str) -> None:
    """Staged DICOM folders of other runs are never published: every object is rebuilt from the
    committed rows, so a run cut off mid-commit loses nothing, and a folder planted there (with a
    success marker and its own entry list) never reaches the manifest or a PACS."""
    if not writer.root.exists():
        return
    others = [
        posix_basename(p) for p in writer.root.fs.ls(writer.root.path, detail=False) if posix_basename(p) != run_id
    ]
    if others:
        logger.warning(
            "score: left alone, never committed or sent: %d staged DICOM folder(s) of other runs in %s "
            "(%s); the objects are rebuilt from the committed rows: delete them when no run is going",
            len(others),
            writer.root.uri,
            ", ".join(sorted(others)[:5]),
        )


def _committed_dataset(root: Location, name: str, manifest: dict[str, dict]):
    """A committed object, its bytes checked against the manifest (the predecessor an SR names)."""
    data = root.join(name).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get(name, {}).get("sha256"):
        raise SourceChanged(f"{name} is not the object that was committed (its sha256 differs from the manifest's)")
    return read_dataset(data)


def _retire(dst: Location, writer: StagedWriter, names: tuple[str, ...]) -> None:
    """Objects whose verdict was replaced: out of the manifest (never sent again), then deleted
    (by :func:`~braintumor_ray.core.remove_child`, as every deletion of an output's files). Only our
    own object names (plain children of OUTPUT_dicom/, :func:`parse_object_name`)."""
    mine = [n for n in names if parse_object_name(n) is not None]
    if not mine or writer.manifest is None:
        return
    check = writer.lease.check if writer.lease is not None else (lambda: None)
    check()
    files = writer.manifest.read() or {}
    writer.manifest.write({k: v for k, v in files.items() if k not in set(mine)})
    for name in mine:
        check()
        remove_child(dst, writer.output, name, what="score")


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
    explain_root: Location | None = None,
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

        if explain_root is not None:  # a map of this output's OUTPUT_explain/, by its plain name, or none
            name = posix_basename(f.heatmap_path)
            if f.heatmap_path != f"{explain_root.uri.rstrip('/')}/{name}" or name in ("", ".", ".."):
                raise SourceChanged(
                    "its row's heatmap_path is not a file of this output's OUTPUT_explain/: no SC "
                    "is made from it (score the file again with --explain for a map)"
                )
            image = decode_png(explain_root.join(name).read_bytes())
        else:
            image = decode_png(resolve(f.heatmap_path, s3_endpoint_url=config.s3_endpoint_url).read_bytes())
    else:  # no map (--explain none, or a row scored before it): the slice as the model saw it, grey
        slices = read_medical(data, "dicom", guard=config.guard)
        image = slices[f.slice_index or 0].gray
        if ids.hashes and not config.dicom_identifiers:
            image = head_region(image)
    pixels = sc_pixels(image, banner_lines(f, config.dicom_banner))
    return to_bytes(build_sc(view, pixels, f, notice=config.dicom_banner, key=key))


def _send(root: Location, dests, config, lease: Lease) -> list[dict[str, Any]]:
    """Send every committed object a destination lacks; per destination: sent, already, failed, error.
    A list, not a mapping by destination: MLflow metric names may not hold a URL's ``:`` and ``@``."""
    manifest = Manifest(root, what="dicom")
    # Only what the manifest names, with those bytes: without a manifest (deleted), nothing, not
    # every .dcm file present (Manifest.committed's reading of an output from before manifests).
    committed = {cf.name: cf.data for cf in manifest.committed(".dcm")} if manifest.read() is not None else {}
    ledger = SentLedger(root)
    report: list[dict[str, Any]] = []
    for dest in dests:
        names = ledger.pending(dest, sorted(committed))
        entry: dict[str, Any] = {
            "destination": dest.key,
            "sent": 0,
            "already": len(committed) - len(names),
            "failed": 0,
        }
        if names:
            datasets = {n: read_dataset(committed[n]) for n in names}
            by_uid = {str(ds.SOPInstanceUID): n for n, ds in datasets.items()}

            def record(got: dict[str, str | None], dest=dest, by_uid=by_uid) -> None:
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
        report.append(entry)
    return report


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
