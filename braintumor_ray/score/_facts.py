"""A scoring run's facts: everything it reads before its plan, once (the verified package, the
listing, the committed rows as one table, the identifiers record), and the output put in order
under the lease (earlier runs recovered). The plan takes these and nothing else."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core import (
    Identifiers,
    InputError,
    Lease,
    Listing,
    Location,
    Manifest,
    StagedWriter,
    StorageError,
    files_digest,
    posix_basename,
    resolve,
)
from ..imaging import MRIPreprocess
from ._config import OUTPUT_IDS_FILE, ScoreConfig
from ._dicom import migrate_dicom_manifest
from ._explain import migrate_explain_manifest
from ._layout import DERIVED_KEYS, FETCHED_MODELS_DIR, _remove_fetched, _writer, committed_rows
from ._plan import DerivedFacts, IdentifiersFound, plan_engine

if TYPE_CHECKING:  # models imports torch
    from ..models import PackageMeta, PackagePin

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringFacts:
    """What a run knows before its plan; read once, in :func:`gather_facts`."""

    config: ScoreConfig  # a models:/ name resolved to the package folder it names
    registered: dict[str, str] | None  # the registered model's name, version and URI, when scored by name
    meta: PackageMeta = field(repr=False)  # the verified package's model.json
    preprocess: MRIPreprocess = field(repr=False)
    engine: str
    notes: tuple[str, ...]
    pin: PackagePin  # the bytes every replica must load
    src: Location
    dst: Location
    ids: Identifiers = field(repr=False)
    writer: StagedWriter = field(repr=False)  # the rows', under the lease
    recovered: dict[str, int]
    listing: Listing = field(repr=False)
    files: dict[str, tuple[int, str]] = field(repr=False)  # listing path -> (size, version), hidden files left out
    shown: dict[str, str] = field(repr=False)  # listing path -> the path as the output names it (path_mode)
    prefix: str  # "s3://" for S3 inputs: listing paths -> URIs
    committed: pa.Table = field(repr=False)  # every committed row, read and sha256-checked once
    derived: DerivedFacts = field(repr=False)  # the series table and report: listed, and as found
    objects: Mapping[str, Mapping[str, Any]] = field(repr=False)  # the manifest's objects (DICOM objects, maps)
    identifiers_found: IdentifiersFound = field(repr=False)  # _identifiers.json as found
    asked: ScoreConfig = field(repr=False)  # the config as given (a models:/ name still a name): saved so

    @property
    def model_id(self) -> str:
        return self.meta.model_id


def gather_facts(config: ScoreConfig, lease: Lease) -> ScoringFacts:
    """Verify the package, put the output in order under the lease (earlier runs recovered or
    dropped, an output from before manifests adopted, DICOM objects and maps of an older layout listed),
    list the input, read the identifiers record and the committed rows once.

    The order of these steps is the protocol (check the package before touching the output,
    recover before reading the manifest): each is a named step here, and they read in order in
    this one place. The identifiers record is claimed by the plan, and written with the run's
    config by :func:`~._commit.commit_settings`.
    """
    asked = config  # saved as given: a models:/ name stays a name, not the folder it resolved to
    package = _verified_package(config, lease)
    config = package.config
    src = resolve(config.input, s3_endpoint_url=config.s3_endpoint_url)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    ids = Identifiers.from_env(config.path_mode, config.uid_mode, root=src.uri)  # no key: fails before any work
    writer, recovered = _open_output(dst, lease)
    listed, files = _list_input(src, config)
    prefix = "s3://" if src.is_s3 else ""
    assert writer.manifest is not None  # _writer's always has one
    found_ids = _found_identifiers(dst, writer.manifest)
    doc = writer.manifest.read_doc() or {"files": None, "derived": {}, "objects": {}}
    return ScoringFacts(
        asked=asked,
        identifiers_found=found_ids,
        objects=doc["objects"],
        config=config,
        registered=package.registered,
        meta=package.meta,
        preprocess=package.meta.preprocess,
        engine=package.engine,
        notes=package.notes,
        pin=package.pin,
        src=src,
        dst=dst,
        ids=ids,
        writer=writer,
        recovered=recovered,
        listing=listed,
        files=files,
        prefix=prefix,
        # The listing named as the output names it (path_mode), so both sides compare like for like.
        shown={p: ids.path(prefix + p) for p in files},
        # The files the job committed, their bytes checked, read once into one table: the plan, the
        # commit and every derived output (series table, DICOM objects, report) take it from here.
        committed=committed_rows(writer.manifest.committed(listed=doc["files"]), list(package.meta.class_names)),
        derived=_derived_facts(writer, doc),
    )


@dataclass(frozen=True)
class _Package:
    """The package a run scores with, checked before the output is touched."""

    config: ScoreConfig  # a models:/ name resolved to the package folder it names
    registered: dict[str, str] | None
    meta: PackageMeta
    engine: str
    notes: tuple[str, ...]
    pin: PackagePin


def _verified_package(config: ScoreConfig, lease: Lease) -> _Package:
    """A ``models:/`` name resolved (fetched under the output's staging when it must be), the
    package verified (model.json unedited, the pinned id, weights and trust file matching the
    id's hashes; its preprocessing parsed, so that settings from a newer version are refused with
    nothing written), the engine chosen (an impossible choice fails here) and the bytes every
    replica must load pinned (a folder rewritten from here on is refused)."""
    from ..models import pin_package, resolve_registered_model, verify_package

    fetched = _writer(resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)).root.join(FETCHED_MODELS_DIR)
    _remove_fetched(fetched)  # copies left by killed runs (this run holds the lease)
    config, registered = resolve_registered_model(config, fetch_to=fetched.join(lease.owner))
    meta = verify_package(config.model, s3_endpoint_url=config.s3_endpoint_url, expect_model_id=config.expect_model_id)
    engine, notes = _engine(config, meta)
    pin = pin_package(
        resolve(config.model, s3_endpoint_url=config.s3_endpoint_url), meta, with_onnx=engine == "onnxruntime"
    )
    if not meta.has_conformal:
        logger.warning(
            "score: model %s was exported before prediction sets: its rows get null prediction_set and "
            "set_size and no 'ambiguous' flag (train it again, or run a search, to add them)",
            meta.model_id,
        )
    return _Package(config, registered, meta, engine, notes, pin)


def _open_output(dst: Location, lease: Lease) -> tuple[StagedWriter, dict[str, int]]:
    """The output put in order under the lease: earlier runs finished or dropped (their maps and
    DICOM objects with their rows), files from before the manifest adopted, an output whose
    manifest is gone refused, objects an older layout named in manifests of their own listed in
    the one manifest. Returns the writer and what its recovery did."""
    writer = _writer(dst, lease)  # commits only while the lease holds, and names its files in the manifest
    assert writer.manifest is not None
    recovered = writer.recover()
    _check_manifest_kept(dst, writer.manifest)
    adopted = writer.adopt(foreign=_foreign_rows)  # an output from before manifests: its files as they are now
    migrate_dicom_manifest(writer)  # objects an older version named in OUTPUT_dicom/_manifest.json
    migrate_explain_manifest(writer, adopt_found=adopted > 0)  # maps named in OUTPUT_explain/_manifest.json
    return writer, recovered


def _list_input(src: Location, config: ScoreConfig) -> tuple[Listing, dict[str, tuple[int, str]]]:
    """The input's listing and its files (path -> size, version), hidden files left out; an input
    without any is refused. Links leaving the input, dangling links and FIFOs are the listing's
    ``refused``: each an error row of its own."""
    listed = src.listing(
        follow_links_outside=config.guard.follow_links_outside_input, max_depth=config.max_folder_depth
    )
    files = {p: v for p, v in listed.files.items() if not posix_basename(p).startswith(".")}
    if not files:
        raise InputError(f"no files under {config.input}: check the URI")
    return listed, files


def _derived_facts(writer: StagedWriter, doc: dict[str, Any]) -> DerivedFacts:
    """The derived files the manifest lists, and the sha256 of each one there now: read whole (the
    report is a few MB at most, MAX_TABLE_ROWS), so a rewritten file is told apart whatever its
    size and time say."""
    present = {}
    for key in DERIVED_KEYS:
        loc = writer.derived_location(key)
        present[key] = hashlib.sha256(loc.read_bytes()).hexdigest() if loc.exists() else None
    return DerivedFacts(listed=doc["derived"], present=present, rows=files_digest(doc["files"] or {}))


def _foreign_rows(data: bytes) -> str | None:
    """Why a Parquet file found in an output without a manifest is not this job's rows, or None."""
    try:
        names = set(pq.ParquetFile(pa.BufferReader(data)).schema_arrow.names)
    except Exception as e:
        return f"not a Parquet file ({type(e).__name__})"
    missing = sorted({"path", "sha256", "model_id"} - names)
    return f"no {', '.join(missing)} column" if missing else None


def _found_identifiers(dst: Location, manifest: Manifest) -> IdentifiersFound:
    """The output's identifiers record as it is (the plan decides on it, :func:`~._plan.claim_identifiers`)."""
    record = dst.join(OUTPUT_IDS_FILE)
    raw = record.read_bytes() if record.exists() else None
    if raw is not None and not raw.strip():
        # Left empty by a full disk before the record was written whole: no record at all.
        logger.warning("score: %s is empty (a write cut off by a full disk?): written again", record.uri)
        raw = None
    return IdentifiersFound(record=raw, has_rows=bool(raw is None and manifest.read()))


def _check_manifest_kept(dst: Location, manifest: Manifest) -> None:
    """Refuse an output whose manifest is gone although its runs wrote one (``_identifiers.json``
    says so): its Parquet files could no longer be told from planted ones."""
    record = dst.join(OUTPUT_IDS_FILE)
    if manifest.read() is not None or not record.exists():
        return
    try:
        era = json.loads(record.read_bytes()).get("manifest")
    except (ValueError, AttributeError):
        return  # the plan's identifiers claim names the problem
    if era and any(p.endswith(".parquet") for p in dst.files()):
        raise StorageError(
            f"{dst.join('_manifest.json').uri} is gone, but the runs on this output wrote one: its Parquet files "
            "cannot be told from planted ones, so none is taken as committed. Restore _manifest.json from a backup, "
            "or score into a new output"
        )


def _engine(config: ScoreConfig, meta: PackageMeta) -> tuple[str, tuple[str, ...]]:
    """The engine the plan's rule picks (:func:`~._plan.plan_engine`, pure), and the I/O it calls
    for: the ONNX file checked when it will run, the note logged."""
    from ..models import verify_onnx

    engine, notes = plan_engine(config.engine, meta, use_gpu=config.use_gpu, model=config.model)
    if engine == "onnxruntime":  # a changed or missing file is refused here, not in every actor
        verify_onnx(config.model, s3_endpoint_url=config.s3_endpoint_url, meta=meta)
    for note in notes:
        logger.warning("score: %s", note)
    return engine, notes
