"""Bulk scoring: an MRI archive (local or S3) -> one Parquet row per file, incrementally.

Ray Data reads the files; CPU tasks decode and preprocess them with the model package's own
:class:`MRIPreprocess` (the ingest's code, the training's settings); a pool of model actors
runs the network. Each run writes its rows to a staging folder beside the output, marks them
complete, then moves the files into the output one by one: a reader of the output sees whole
Parquet files only, and a run killed at any point is finished or redone by the next one.

A run is a plan, then its execution, then its commit: :mod:`._plan` decides from the listing,
the committed rows (the manifest's files only) and the verified package, with no Ray, what the
run does (one frozen :class:`ScoringPlan`); :func:`_execute` runs it on Ray Data, its model
replicas taking the plan (and loading only the package bytes it pins); :func:`_commit` adds the
withdrawal rows and commits the run, naming its files in ``OUTPUT/_manifest.json``.

DICOM files and NIfTI volumes are scored slice by slice (one row per slice, with its UIDs);
after each run the per-series table beside the output is rebuilt from every committed row
(:mod:`braintumor_ray.score._series`).

Output layout::

    OUTPUT/<run>_<n>.parquet      the predictions (read the folder with pandas, pyarrow, DuckDB)
    OUTPUT/_config.yaml           the last run's ScoreConfig (for --config; dataset readers skip it)
    OUTPUT/_manifest.json         what the job committed: each file, its sha256, rows and model id;
                                  only these files are read as committed rows
    OUTPUT/_identifiers.json      how the rows name files and UIDs (path_mode, uid_mode, key id)
    OUTPUT/_report.html           the review report: counts, series verdicts, cases with heat maps, every row
    OUTPUT_series/series.parquet  one row per DICOM series or NIfTI volume and model
    OUTPUT_explain/*.png          --explain: heat-map overlays, named with their sha256 in its _manifest.json
    OUTPUT_dicom/*.dcm            --dicom-out: an SR (and SC) per DICOM series, named in its _manifest.json;
                                  _sent.json: what --dicom-send sent where
    OUTPUT._staging/<run>/        a run in progress or cut off (never read by users)
    OUTPUT._lease.json            the lease of the run writing the output, while one runs (and, on
                                  local disk, OUTPUT._lease.lock, the lock its updates take)
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import (STAGING_SUFFIX, CommittedFile, ConfigError, Identifiers, InputError, Lease, Location, Manifest,
                    StagedWriter, StorageError, check_disjoint, committed_table, is_no_space, latest_rows,
                    no_space_message, posix_basename, remove_child, resolve, unreadable_reason)
from ..imaging import NO_GUARD, InputGuard, MRIPreprocess, SLICE_SKIP_REASONS, SeriesSelector, SliceInfo, sha256_hex
from ..trust import softmax
from ..report import write_scoring_report
from ..tracking import log_scoring, resolve_registered_model
from ._config import OUTPUT_CONFIG_FILE, OUTPUT_IDS_FILE, OUTPUT_SIBLINGS, ScoreConfig
from ._dicom import run_dicom_step
from ._dicom_out import Algorithm
from ._explain import HeatmapWriter, explain_location
from ._plan import (DECODE_CPUS, WITHDRAWN, WITHDRAWN_REASON, ClusterShape, ScoringPlan, guard_id,
                    plan_replicas, plan_scoring, prior_state, rerun_diff)
from ._series import series_table, write_series_table

logger = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
# Decode tasks read their own files (a block of the listing each): a file that vanished or cannot
# be read since it was listed is an error row of its own (Ray Data's file reader failed the run).
FILES_PER_BLOCK = 32
# Beside the runs in OUTPUT._staging/: the markers of decode attempts (see _Attempts).
ATTEMPTS_DIR = "_attempts"
# Where a models:/ package from a server-side artifact store is fetched, in OUTPUT._staging/ (which
# every node reads, and whose "_" folders recovery keeps): one folder per run, removed when it ends;
# a killed run's copy goes at the next run's start. A driver-local temp folder was left behind by
# every run, and was what replicas on other nodes were told to load.
FETCHED_MODELS_DIR = "_models"
KILLED_TWICE = ("killed its decode task twice (out of memory? a crash in a decoder?): not decoded again so that the "
                "run can finish; a changed file is tried again")
# Tests only: a decode task that meets a file of this name dies as the OOM killer would kill it.
KILL_DECODE_ENV = "BRAINTUMOR_TEST_KILL_DECODE"
# A staged row's status for a file whose bytes are the committed ones under a new version (a
# chmod, a restore, a touch): the commit turns it into copies of its latest rows with the new
# version, so that the next run does not read it again. Never committed.
UNCHANGED = "unchanged"


def output_schema(class_names: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("size", pa.int64()),
            ("version", pa.string()),  # ETag on S3, mtime on disk: how reruns spot changed files
            ("predicted_label", pa.string()),
            *[(PROB_PREFIX + c, pa.float32()) for c in class_names],  # calibrated when the package can
            ("confidence", pa.float32()),  # the top probability (calibrated)
            ("ood_score", pa.float32()),  # distance from the training data (higher: less like it)
            # null: the prediction stands; out_of_distribution (wins), low_confidence or ambiguous: review it
            ("review_reason", pa.string()),
            # The classes still in play (class-conditional conformal set at the package's alpha);
            # null for packages from before sets and for rows that are not ok.
            ("prediction_set", pa.list_(pa.string())),
            ("set_size", pa.int8()),
            ("head_fraction", pa.float32()),  # share of the image the head covers (series votes)
            ("model_id", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
            ("status", pa.string()),  # ok, error, or skipped (left out by the series selector)
            ("error", pa.string()),
            # Where a slice came from: DICOM UIDs and InstanceNumber, the slice's index in a
            # NIfTI volume (or a multi-frame DICOM); null for plain images. Nothing else from a
            # file's header is ever written.
            *SLICE_FIELDS,
            ("selection", pa.string()),  # the series selector in force ("" for none)
            ("explain", pa.string()),  # the --explain setting in force: which rows got a heat map
            # The Grad-CAM overlay PNG (OUTPUT_explain/...) and its peak in the original image's
            # pixels; null for rows without a map.
            ("heatmap_path", pa.string()),
            ("heatmap_peak_x", pa.int32()),
            ("heatmap_peak_y", pa.int32()),
            # The input guard's settings (hashed) the row was scored under: a rerun under others
            # (a limit raised) tries its error rows again.
            ("guard", pa.string()),
        ]
    )


SLICE_FIELDS = [
    ("sop_instance_uid", pa.string()),
    ("series_instance_uid", pa.string()),
    ("study_instance_uid", pa.string()),
    ("instance_number", pa.int32()),
    ("slice_index", pa.int32()),
]
_SLICE_NAMES = [n for n, _ in SLICE_FIELDS]
_DECODED = pa.schema(
    [("path", pa.string()), ("sha256", pa.string()), ("pixels", pa.binary()), ("side", pa.int32()), ("status", pa.string()),
     ("error", pa.string()), ("head_fraction", pa.float32()), *SLICE_FIELDS,
     ("crop_box", pa.list_(pa.int32()))]  # x0, y0, x1, y1 in the original: heat-map peaks map back through it
)


def decode_batch(
    batch: pa.Table,
    *,
    preprocess: MRIPreprocess,
    already: frozenset = frozenset(),
    select: SeriesSelector | None = None,
    guard: InputGuard | None = None,
    source: Location | None = None,
    attempts: Location | None = None,
) -> pa.Table:
    """CPU side: file bytes -> sha256 and the preprocessed image of each slice, or the reason
    the file has none (one row then: an error, or ``skipped`` by the series selector); a
    volume's slice with no content or no head is a ``skipped`` row of its own.

    ``batch`` holds each file's ``bytes``, or its listed ``path``, ``size``, ``version`` (and
    ``refused``, the listing's reason to refuse it): the file is then read here from ``source``,
    and a file that vanished, cannot be read, is over the guard's size limit or was refused
    is an error row of its own. ``attempts``: where the markers of decode attempts live
    (:class:`_Attempts`), so that a file that killed its task twice is not decoded again.

    Files whose (path, sha256) is in ``already`` were rewritten with the same content (a new
    mtime or ETag only): they are dropped here, not scored twice.
    """
    cols: dict[str, list] = {n: [] for n in _DECODED.names}

    def add(path, digest, pixels, side, status, error, head, info, box=None):
        for k, v in zip(_DECODED.names, (path, digest, pixels, side, status, error, head)):
            cols[k].append(v)
        for k in _SLICE_NAMES:
            cols[k].append(getattr(info, k))
        cols["crop_box"].append(list(box) if box is not None else None)

    for path, data, error in _read_files(batch, source, guard or NO_GUARD, attempts):
        if error is not None:
            add(path, None, None, None, "error", error, None, SliceInfo())
            continue
        data = data or b""
        digest = sha256_hex(data)
        if (path, digest) in already:  # its new version is recorded by the commit, nothing scored
            add(path, digest, None, None, UNCHANGED, None, None, SliceInfo())
            continue
        res = preprocess.try_slices(data, name=path, select=select, guard=guard)
        for s in res.slices:
            add(path, digest, s.image.pixels.tobytes(), s.image.pixels.shape[0], "ok", None, s.image.head_fraction, s.info,
                s.image.crop_box)
        # A volume's empty or headless slices: a skipped row each, with the reason and where it is.
        for s in res.skipped_slices:
            add(path, digest, None, None, "skipped", s.reason, None, s.info)
        if not res.slices and not res.skipped_slices:
            add(path, digest, None, None, "skipped" if res.skipped else "error", res.skipped or res.error, None, res.info)
    return pa.Table.from_pydict(cols, schema=_DECODED)


def _read_files(batch: pa.Table, source: Location | None, guard: InputGuard, attempts: Location | None):
    """(path, bytes, None) for each file of a decode batch, or (path, None, reason) for one that
    cannot be read; each file is read only when the caller asks for it, and its attempt marker
    (when it needs one) stays for exactly as long as the caller decodes it."""
    paths = batch.column("path").to_pylist()
    if "bytes" in batch.column_names:
        for path, data in zip(paths, batch.column("bytes").to_pylist()):
            yield path, data, None
        return
    if source is None:
        raise ValueError("decode_batch: a batch without file bytes needs the source location to read them from")
    sizes, versions = batch.column("size").to_pylist(), batch.column("version").to_pylist()
    refused = batch.column("refused").to_pylist() if "refused" in batch.column_names else [None] * len(paths)
    keys = [hashlib.sha256(f"{p}\0{v}".encode()).hexdigest()[:16] for p, v in zip(paths, versions)]
    att = _Attempts(attempts, keys)
    too_big = [guard.too_many_bytes("the file holds", int(n or 0)) for n in sizes]
    decoded = [i for i in range(len(paths)) if not refused[i] and not too_big[i] and not att.killed_twice(keys[i])]
    if len(decoded) == 1:
        att.retried = True  # a batch of one file: its marker is the file's own from the first attempt
    whole = att.mark("c", att.batch) if any(not att.suspect(keys[i]) for i in decoded) else None
    kill = os.environ.get(KILL_DECODE_ENV)
    for i, path in enumerate(paths):
        if refused[i] or too_big[i]:
            yield path, None, refused[i] or f"{too_big[i]}; not read (its listed size)"
            continue
        if att.killed_twice(keys[i]):
            logger.warning("score: a file killed its decode task twice: an error row (see the output), not decoded again")
            yield path, None, KILLED_TWICE
            continue
        alone = att.mark("f", keys[i]) if att.suspect(keys[i]) else None
        data, error = None, None
        try:
            # Held to the listed version: a file swapped for a link or another file since is an error row.
            data = source.read_limited(path, guard.max_file_bytes, version=versions[i],
                                       follow_links_outside=guard.follow_links_outside_input)
        except Exception as e:
            error = unreadable_reason(e)
        if data is not None and (err := guard.too_many_bytes("the file holds at least", len(data))):
            data, error = None, f"{err}; grown since it was listed"
        if kill and posix_basename(path) == kill and data is not None:
            os._exit(137)  # as the kernel's OOM killer ends a process: no cleanup, no exception
        yield path, data, error
        att.unmark(alone)
    att.unmark(whole)


class _Attempts:
    """Markers of decode attempts in ``OUTPUT._staging/_attempts/``: what a killed task leaves.

    A decode task writes one marker for its batch of files (``c-<batch>-<attempt>``) and, for a
    file already suspected, one for that file (``f-<file>-<attempt>``) while decoding it; it
    deletes them when done, so only a task that died (OOM killer, a decoder's segfault) leaves
    any. A batch that finds a marker of its own batch was killed before: it decodes each file
    alone, under that file's marker; a file found with two markers of its own killed its task
    twice while decoding it alone, and becomes an error row without being decoded again. Names
    are hashes of the batch's files and of each file's path and version: a retry of the task
    (the same block) and a rerun after the whole job died (the file's own markers) both find
    them; a changed file starts afresh. The run deletes them once its rows are committed.

    Cost per task: one listing, one write, one delete (3 requests on S3); 2 more for each
    suspected file. Storage that cannot be written only turns the check off (logged).
    """

    def __init__(self, loc: Location | None, keys: list[str]):
        self.loc = loc
        self.batch = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
        self.attempt = uuid.uuid4().hex[:12]
        names = self._names()
        self.retried = any(n.startswith(f"c-{self.batch}-") for n in names)
        self.alone = collections.Counter(n.split("-")[1] for n in names if n.startswith("f-") and n.count("-") == 2)

    def killed_twice(self, key: str) -> bool:
        return self.alone[key] >= 2

    def suspect(self, key: str) -> bool:
        return self.retried or self.alone[key] > 0

    def mark(self, kind: str, key: str) -> Location | None:
        if self.loc is None:
            return None
        marker = self.loc.join(f"{kind}-{key}-{self.attempt}")
        try:
            marker.write_bytes(b"")
            return marker
        except Exception as e:
            self._off(e)
            return None

    def unmark(self, marker: Location | None) -> None:
        if marker is not None and self.loc is not None:
            try:
                # The one deleter (it checks the marker is a plain file of OUTPUT._staging/_attempts).
                remove_child(_output_of(self.loc), self.loc, posix_basename(marker.path), what="score")
            except Exception as e:
                self._off(e)

    def _names(self) -> list[str]:
        if self.loc is None:
            return []
        try:
            return [posix_basename(p) for p in self.loc.fs.ls(self.loc.path, detail=False)]
        except FileNotFoundError:
            return []
        except Exception as e:
            self._off(e)
            return []

    def _off(self, e: Exception) -> None:
        logger.warning("score: decode-attempt markers in %s do not work (%s: %s): a file that kills its decode task "
                       "would be retried without end", self.loc.uri if self.loc else "?", type(e).__name__, e)
        self.loc = None


class Predictor:
    """Model side (a Ray Data actor): one loaded package per actor; probabilities for the rows
    that decoded. It loads the package the plan pins and nothing else: every file's sha256 is
    recomputed over the bytes it loads (:class:`~braintumor_ray.models.PackagePin`)."""

    def __init__(self, plan: ScoringPlan, threads: int | None = None):
        from ..models import load_inference_model

        # Intra-op threads = the CPUs this actor was given (Ray's OMP_NUM_THREADS covers torch
        # only, and ORT would take every core): replicas and decode tasks then share the node
        # without oversubscribing it.
        self.threads = threads or actor_threads()
        self.model = load_inference_model(plan.pin.uri, engine=plan.engine, use_gpu=plan.use_gpu, threads=self.threads,
                                          s3_endpoint_url=plan.s3_endpoint_url, pin=plan.pin)
        self.schema = output_schema(list(self.model.class_names))
        self.files, self.uri_prefix, self.scored_at = plan.diff.todo, plan.uri_prefix, plan.scored_at
        self.selection, self.review_threshold, self.ids, self.explain = (plan.selection, plan.review_threshold,
                                                                         plan.identifiers, plan.explain)
        self.guard_id = plan.guard_id
        # Heat maps: into the run's staging folder of OUTPUT_explain, named by the final one.
        self.heatmaps = HeatmapWriter(
            plan.explain, model_uri=plan.pin.uri, s3_endpoint_url=plan.s3_endpoint_url, use_gpu=plan.use_gpu,
            stage_uri=plan.explain_stage_uri, final_uri=plan.explain_final_uri, model_id=self.model.model_id,
            pin=plan.pin, method=plan.explain_method,
        ) if plan.explain != "none" else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        status = batch.column("status").to_pylist()
        ok = [i for i in range(n) if status[i] == "ok"]
        is_ok = [s == "ok" for s in status]
        probs = np.full((n, len(self.model.class_names)), np.nan, dtype=np.float32)
        conf = np.full(n, np.nan, dtype=np.float32)
        ood = np.full(n, np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        sets: list[list[str] | None] = [None] * n
        images = cam = None
        if ok:
            pix = batch.column("pixels").to_pylist()
            side = batch.column("side").to_pylist()
            images = np.stack([np.frombuffer(pix[i], np.uint8).reshape(side[i], side[i]) for i in ok])
            # The maps come from the same forward pass, when they will be drawn (see HeatmapWriter).
            want_maps = self.heatmaps is not None and self.heatmaps.method == "auto"
            logits, feats, cam = self.model.forward(images, maps=want_maps)
            trust = self.model.trust
            if trust is None:  # a package from before calibration: raw softmax, no flags
                probs[ok] = softmax(logits)
                conf[ok] = probs[ok].max(axis=1)
            else:
                a = trust.assess(logits, feats, review_threshold=self.review_threshold)
                probs[ok], conf[ok], ood[ok] = a.probs, a.confidence, a.ood_score
                for i, r, ps in zip(ok, a.review_reason, a.prediction_sets(self.model.class_names) or [None] * len(ok)):
                    reasons[i], sets[i] = r, ps
        paths = batch.column("path").to_pylist()
        names = list(self.model.class_names)
        predicted = [names[int(np.argmax(probs[i]))] if is_ok[i] else None for i in range(n)]
        heat = self.heatmaps(batch, ok, images, predicted, reasons, names, cam) if self.heatmaps else ([None] * n,) * 3
        uris = [self.uri_prefix + p for p in paths]
        ids = self.ids
        if ids.path_mode != "full":  # decoders' messages may quote the path: shown as the path column shows it
            errors = [ids.scrub(e, u) for e, u in zip(errors, uris)]
        cols: dict[str, Any] = {
            "path": [ids.path(u) for u in uris],
            "sha256": batch.column("sha256"),
            "size": [self.files[p][0] for p in paths],
            "version": [self.files[p][1] for p in paths],
            "predicted_label": predicted,
            **{PROB_PREFIX + c: pa.array(np.where(is_ok, probs[:, k], None), pa.float32()) for k, c in enumerate(names)},
            "confidence": pa.array(conf, pa.float32(), mask=np.isnan(conf)),
            "ood_score": pa.array(ood, pa.float32(), mask=np.isnan(ood)),
            "review_reason": reasons,
            "prediction_set": sets,
            "set_size": [None if ps is None else len(ps) for ps in sets],
            "head_fraction": batch.column("head_fraction"),
            "model_id": [self.model.model_id] * n,
            "scored_at": [self.scored_at] * n,
            "status": status,
            "error": errors,
            **{k: batch.column(k) if k in ("instance_number", "slice_index") or ids.uid_mode == "full"
               else [ids.uid(u) for u in batch.column(k).to_pylist()] for k in _SLICE_NAMES},
            "selection": [self.selection] * n,
            "explain": [self.explain] * n,
            "heatmap_path": heat[0],
            "heatmap_peak_x": heat[1],
            "heatmap_peak_y": heat[2],
            "guard": [self.guard_id] * n,
        }
        return pa.Table.from_pydict(cols, schema=self.schema)


def actor_threads() -> int:
    """The CPUs Ray gave the calling actor or task, rounded, at least 1 (outside Ray: 1)."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
            return max(1, int(cpus + 0.5))
    except Exception:  # not in a Ray worker
        pass
    return 1


def recover(dst: Location) -> dict[str, int]:
    """Finish what earlier runs left: commit staged runs that completed, drop those that did not."""
    return _writer(dst).recover()


def _remove_fetched(loc: Location) -> None:
    """Delete ``OUTPUT._staging/_models`` (the models:/ packages fetched for runs on the output)."""
    out = _output_of(loc)
    try:
        remove_child(out, _writer(out).root, posix_basename(loc.path), what="score", tree=True)
    except StorageError as e:  # the next run's start removes it
        logger.warning("score: could not remove the fetched model package %s (%s)", loc.uri, e)


def _writer(dst: Location, lease: Lease | None = None) -> StagedWriter:
    """The predictions' writer: its commits name their files in ``OUTPUT/_manifest.json``."""
    return StagedWriter(dst, what="score", lease=lease, describe=_describe_rows)


def _output_of(staged: Location) -> Location:
    """The output whose staging folder holds ``staged`` (``OUTPUT._staging/<x>`` -> OUTPUT)."""
    root = staged.path.rstrip("/").rsplit("/", 1)[0]
    base = root.removesuffix(STAGING_SUFFIX)
    return Location(uri=staged.uri_of(base), path=base, fs=staged.fs, is_s3=staged.is_s3)


def _foreign_rows(data: bytes) -> str | None:
    """Why a Parquet file found in an output without a manifest is not this job's rows, or None."""
    try:
        names = set(pq.ParquetFile(pa.BufferReader(data)).schema_arrow.names)
    except Exception as e:
        return f"not a Parquet file ({type(e).__name__})"
    missing = sorted({"path", "sha256", "model_id"} - names)
    return f"no {', '.join(missing)} column" if missing else None


def _describe_rows(data: bytes) -> dict[str, Any]:
    """A committed Parquet file's manifest entry: its rows and the model id of its rows."""
    t = pq.read_table(pa.BufferReader(data), columns=["model_id"])
    return {"rows": t.num_rows, "model_ids": sorted({m for m in t.column("model_id").to_pylist() if m})}


def committed_rows(files: list[CommittedFile], class_names: list[str]) -> pa.Table:
    """Every committed row, in the output schema: the run's one reading of the output's history
    (columns a file predates: null, status ``ok`` and selection empty, as those files meant)."""
    return committed_table(files, output_schema(class_names), fill={"status": "ok", "selection": ""})


def _read_staged(staging: Location) -> tuple[dict[str, pa.Table], dict[str, bytes]]:
    """The run's staged Parquet files, by name, each read once: their tables and their bytes."""
    tables, raw = {}, {}
    for path in sorted(staging.files() if staging.exists() else []):
        if path.endswith(".parquet"):
            name = posix_basename(path)
            raw[name] = staging.fs.cat_file(path)
            tables[name] = pq.read_table(pa.BufferReader(raw[name]))
    return tables, raw


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    return buf.getvalue().to_pybytes()


def _take_unchanged(staged: dict[str, pa.Table]) -> tuple[dict[str, pa.Table], dict[str, tuple[int, str]]]:
    """Split the :data:`UNCHANGED` rows off the staged tables: the tables without them (a table
    left empty is dropped) and each such file's (size, version) as listed."""
    found: dict[str, tuple[int, str]] = {}
    kept: dict[str, pa.Table] = {}
    for name, t in staged.items():
        same = pc.equal(t.column("status"), UNCHANGED)
        if not pc.any(same).as_py():
            kept[name] = t
            continue
        hit = t.filter(same)
        found.update(zip(hit.column("path").to_pylist(), zip(hit.column("size").to_pylist(),
                                                             hit.column("version").to_pylist())))
        rest = t.filter(pc.invert(same))
        if rest.num_rows:
            kept[name] = rest
    return kept, found


def _reversioned_rows(committed: pa.Table, found: dict[str, tuple[int, str]], scored_at: datetime) -> pa.Table:
    """Copies of the latest rows of files whose bytes are unchanged, with their new size and version."""
    rows = _withdrawal_rows(committed, tuple(found), scored_at, status=None)
    paths = rows.column("path").to_pylist()
    schema = rows.schema
    rows = rows.set_column(schema.get_field_index("size"), "size", pa.array([found[p][0] for p in paths], pa.int64()))
    return rows.set_column(schema.get_field_index("version"), "version",
                           pa.array([found[p][1] for p in paths], pa.string()))


def _withdrawal_rows(committed: pa.Table, withdrawn: tuple[str, ...], scored_at: datetime, *,
                     status: str | None = WITHDRAWN) -> pa.Table:
    """A ``withdrawn`` row for each latest row of the files gone from the input: a copy of it
    (what was said, by which model, from which bytes), marked, and the latest of its file.
    ``status=None``: the copies keep their status and error (a file's rows under a new version).
    ``committed``: the committed rows (:func:`committed_rows`), whose schema the rows take."""
    gone = pa.array(sorted(withdrawn), pa.string())
    rows = latest_rows(committed.filter(pc.is_in(committed.column("path"), value_set=gone)))
    n = rows.num_rows
    if status is not None:
        rows = rows.set_column(rows.schema.get_field_index("status"), "status", pa.array([status] * n, pa.string()))
        rows = rows.set_column(rows.schema.get_field_index("error"), "error",
                               pa.array([WITHDRAWN_REASON] * n, pa.string()))
    field = rows.schema.field("scored_at")
    return rows.set_column(rows.schema.get_field_index("scored_at"), field, pa.array([scored_at] * n, field.type))


def run_scoring(config: ScoreConfig) -> dict:
    """Score every new or changed file under ``input``; returns the run's summary.

    The whole run holds the output's lease (``OUTPUT._lease.json``): a second run on the same
    output refuses, naming this one, or waits (``wait``), whoever started it. A full disk is a
    :class:`StorageError` of one line; what was committed stays whole, and the next run goes on.
    """
    # Again here, not only when the config was built: links resolve on the machine that runs the
    # job, and this comes before the lease or anything else touches storage.
    check_disjoint(config.input, config.output, siblings=OUTPUT_SIBLINGS)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    try:
        with Lease(dst, owner=run_id, ttl_s=config.lease_ttl_s, wait_s=config.wait, what="score") as lease:
            try:
                summary = _run_scoring(config, lease)
            finally:
                _remove_fetched(_writer(dst).root.join(FETCHED_MODELS_DIR))  # only this run's copy: the lease
    except StorageError:
        raise
    except Exception as e:
        if is_no_space(e):  # a Ray task's OSError arrives wrapped, with the worker's traceback
            raise StorageError(no_space_message(dst.uri)) from e
        raise
    return summary | {"lease": lease.describe()}


def _run_scoring(config: ScoreConfig, lease: Lease) -> dict:
    """:func:`run_scoring`'s work, under the lease (``lease.owner`` is the run id): the facts,
    the plan (:mod:`._plan`, pure), the execution (Ray), the commit."""
    from ..models import package_preprocess, pin_package, verify_package

    t0 = time.perf_counter()
    asked = config  # saved as given: a models:/ name stays a name, not the folder it resolved to
    fetched = _writer(resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)).root.join(FETCHED_MODELS_DIR)
    _remove_fetched(fetched)  # copies left by killed runs (this run holds the lease)
    # models:/NAME/VERSION -> its package folder (fetched under the output's staging when it must be)
    config, registered = resolve_registered_model(config, fetch_to=fetched.join(lease.owner))
    # model.json unedited, the pinned id (expect_model_id), weights and trust file matching the id's hashes.
    meta = verify_package(config.model, s3_endpoint_url=config.s3_endpoint_url, expect_model_id=config.expect_model_id)
    model_id = meta["model_id"]
    preprocess = package_preprocess(meta, config.model)
    engine, notes = _engine(config, meta)  # before any work: an impossible choice fails here
    # What every replica must load: these bytes (a folder rewritten from here on is refused).
    pin = pin_package(resolve(config.model, s3_endpoint_url=config.s3_endpoint_url), meta,
                      with_onnx=engine == "onnxruntime")
    if "conformal" not in (meta.get("trust") or {}):
        logger.warning("score: model %s was exported before prediction sets: its rows get null prediction_set and "
                       "set_size and no 'ambiguous' flag (train it again, or run a search, to add them)", model_id)
    src = resolve(config.input, s3_endpoint_url=config.s3_endpoint_url)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    ids = Identifiers.from_env(config.path_mode, config.uid_mode, root=src.uri)  # no key: fails before any work
    writer = _writer(dst, lease)  # commits only while the lease holds, and names its files in the manifest
    recovered = writer.recover()
    # Heat maps (--explain) stage and commit beside the predictions: same run id, same lease.
    # Named in OUTPUT_explain/_manifest.json like the rows: the report embeds only those maps.
    explain_writer = StagedWriter(explain_location(dst), what="explain", lease=lease, manifest=True)
    explain_writer.recover()
    explain_writer.adopt(".png")  # maps written before that manifest: as they are now
    _check_manifest_kept(dst, writer.manifest)
    writer.adopt(foreign=_foreign_rows)  # an output from before manifests: its files as they are now
    # Links leaving the input, dangling links, FIFOs: refused here, each an error row of its own.
    listed = src.listing(follow_links_outside=config.guard.follow_links_outside_input, max_depth=config.max_folder_depth)
    files = {p: v for p, v in listed.files.items() if not posix_basename(p).startswith(".")}
    if not files:
        raise InputError(f"no files under {config.input}: check the URI")
    _claim_identifiers(dst, ids)
    asked.save_yaml(dst.join(OUTPUT_CONFIG_FILE))  # `jobs/score.py --config` takes it back; readers skip it

    # The files the job committed, their bytes checked, read once into one table: the plan, the
    # commit and every derived output (series table, DICOM objects, report) take it from here.
    committed = committed_rows(writer.manifest.committed(), list(meta["class_names"]))
    prior = prior_state(committed)
    prefix = "s3://" if src.is_s3 else ""
    # The listing named as the output names it (path_mode), so both sides compare like for like.
    shown = {p: ids.path(prefix + p) for p in files}
    diff = rerun_diff(files, shown, prior, model_id=model_id, selection=config.select.describe(),
                      retry_errors=config.retry_errors, guard=guard_id(config.guard), rescore_all=config.rescore_all,
                      output=dst.uri)
    run_id = lease.owner
    explain_stage = explain_writer.stage(run_id)
    plan = plan_scoring(
        config=config, run_id=run_id, input_uri=src.uri, output_uri=dst.uri, uri_prefix=prefix, pin=pin, engine=engine,
        meta=meta, preprocess=preprocess, identifiers=ids, diff=diff, refused=listed.refused,
        explain_stage_uri=explain_stage.uri, explain_final_uri=explain_writer.output.uri,
        cluster=_cluster_shape() if diff.todo else None, scored_at=datetime.now(timezone.utc), notes=notes,
    )
    summary: dict[str, Any] = {
        "input": src.uri,
        "output": dst.uri,
        "model_id": model_id,
        "files_seen": len(files),
        "skipped_already_scored": len(files) - len(diff.todo),
        "scored": 0,
        "errors": 0,
        "not_selected": 0,
        "withdrawn": len(diff.withdrawn),
        "errors_retried": diff.retried,
        "errors_final": diff.final_errors,
        **({"replaced_models": list(diff.replaced_models)} if diff.replaced_models else {}),
        **({"notes": list(notes)} if notes else {}),
        **recovered,
    }
    algo = Algorithm(name=registered["name"] if registered else f"braintumor-ray {meta.get('backbone', 'model')}",
                     version=f"{registered['version']} (registered)" if registered
                     else f"package format {meta.get('format_version')}", model_id=model_id)
    derived = dict(config=config, plan=plan, dst=dst, src=src, ids=ids, sources={v: k for k, v in shown.items()},
                   lease=lease, algo=algo)
    if not diff.has_work:  # nothing was committed since the plan read the rows
        summary.update(wall_s=round(time.perf_counter() - t0, 3), images_per_s=0.0)
        return log_scoring(config, _derived(summary, committed, **derived), registered)

    staging = writer.stage(run_id)
    t_run = time.perf_counter()
    if diff.todo:
        _execute(plan, staging, source=src, attempts=writer.root.join(ATTEMPTS_DIR))
    elapsed = time.perf_counter() - t_run
    written, after, heatmaps = _commit(plan, writer, staging, explain_writer, explain_stage, committed)
    counts = {k: int(pc.sum(pc.equal(written.column("status"), k)).as_py() or 0) for k in ("ok", "error", "skipped")}
    # A skipped row is a file the series selector left out, or a slice with no content or no head.
    reasons = written.column("error").to_pylist()
    slices_skipped = sum(1 for st, r in zip(written.column("status").to_pylist(), reasons)
                         if st == "skipped" and (r or "").startswith(SLICE_SKIP_REASONS))
    files_written = len(set(written.filter(pc.not_equal(written.column("status"), WITHDRAWN)).column("path").to_pylist()))
    summary.update(
        scored=counts["ok"],
        errors=counts["error"],
        not_selected=counts["skipped"] - slices_skipped,
        slices_skipped=slices_skipped,
        skipped_already_scored=summary["skipped_already_scored"] + len(diff.todo) - files_written,
        run_id=run_id,
        **({"replicas": plan.replicas, "cpus_per_replica": plan.replica_cpus, "engine": engine} if diff.todo else {}),
        heatmaps=heatmaps,
        images_per_s=round(len(diff.todo) / elapsed, 2) if diff.todo and elapsed > 0 else 0.0,
    )
    summary = _derived(summary, after, **derived)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)  # with the derived outputs
    return log_scoring(config, summary, registered)


def _derived(summary: dict, rows: pa.Table, *, config: ScoreConfig, plan: ScoringPlan, dst: Location, src: Location,
             ids: Identifiers, sources: dict[str, str], lease: Lease, algo: Algorithm) -> dict:
    """What is built from the committed rows ``rows`` (in memory, never read back from storage),
    still under the lease: the per-series table, then the DICOM objects and their sending (from
    that table, not from its file), then the review page."""
    series = series_table(rows, list(plan.class_names), review_threshold=plan.series_review_threshold)
    out = summary | {"series": write_series_table(dst, series)}
    step = run_dicom_step(config, dst=dst, src=src, ids=ids, sources=sources, lease=lease, run_id=plan.run_id,
                          algo=algo, rows=rows, series=series)
    if step is not None:
        out["dicom"] = step
    maps = explain_location(dst)
    return out | {"report": write_scoring_report(dst, series=series, maps=maps, rows=rows,
                                                 map_files=Manifest(maps, what="explain").read())}


def _cluster_shape() -> ClusterShape:
    import ray

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    return ClusterShape(cpus=int(resources.get("CPU", 1)), gpus=int(resources.get("GPU", 0)),
                        node_cpus=tuple(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")))


def _execute(plan: ScoringPlan, staging: Location, *, source: Location, attempts: Location) -> None:
    """The Ray part: decode tasks read and preprocess the plan's files, the plan's replicas score
    them, the rows land in the run's staging folder (nothing is committed here)."""
    import ray

    todo = plan.diff.todo
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # As in the ingest: on a small cluster the per-operator reservation idles half the CPUs.
    ctx.op_resource_reservation_enabled = False
    try:
        (
            # Reads and writes are I/O: at their default of 1 CPU they could never be scheduled
            # beside model replicas that hold all but DECODE_CPUS of a node (the job hung).
            # The decode tasks read the files themselves: one that fails to read is its own error row.
            ray.data.from_items(
                [{"path": p, "size": n, "version": v, "refused": plan.refused.get(p)} for p, (n, v) in todo.items()],
                override_num_blocks=max(min(len(todo), 2 * cpus), math.ceil(len(todo) / FILES_PER_BLOCK)),
            )
            .map_batches(
                decode_batch,
                batch_format="pyarrow",
                fn_kwargs={"preprocess": plan.preprocess, "already": plan.diff.already, "select": plan.select,
                           "guard": plan.guard, "source": source, "attempts": attempts},
                # Remote args unlike the model's keep Ray Data from fusing the decode into the
                # model actor, where it would run in turn with inference instead of beside it.
                num_cpus=DECODE_CPUS,
            )
            .map_batches(
                Predictor,
                batch_format="pyarrow",
                batch_size=plan.batch_size,
                fn_constructor_args=(plan,),
                compute=ray.data.ActorPoolStrategy(size=plan.replicas),
                num_gpus=1 if plan.use_gpu else 0,
                num_cpus=plan.replica_cpus,
            )
            .write_parquet(staging.path, filesystem=staging.pyarrow_fs, ray_remote_args={"num_cpus": DECODE_CPUS})
        )
    finally:
        ctx.op_resource_reservation_enabled = saved


def _commit(plan: ScoringPlan, writer: StagedWriter, staging: Location, explain_writer: StagedWriter,
            explain_stage: Location, committed: pa.Table) -> tuple[pa.Table, pa.Table, int]:
    """Add the withdrawal rows to the run, then commit it: its rows and the maps. Returns this
    run's rows (scored and withdrawn), the committed rows after the commit, and the maps committed.

    Every row of the run is on storage: the commit marks it so (from here a cut-off run is
    committed by the next one instead of redone), then moves the files in one by one and names
    them in the manifest. The maps first: a committed row never names a PNG that is not there
    yet (a run cut off between the two commits is redone, and rewrites the same file names).
    Each staged file is read once; the committed table after the commit is built from those
    tables and ``committed`` (the rows the plan read), not read back from storage.
    """
    schema = output_schema(list(plan.class_names))
    out = _output_of(staging)
    staged, data = _read_staged(staging)
    kept, found = _take_unchanged(staged)
    for name, t in staged.items():  # files that held UNCHANGED rows: rewritten without them, or gone
        if name not in kept:
            del data[name]
            remove_child(out, staging, name, what="score")
        elif kept[name] is not t:
            data[name] = _parquet_bytes(kept[name])
            staging.join(name).write_bytes(data[name])
    if plan.diff.withdrawn:
        rows = _withdrawal_rows(committed, plan.diff.withdrawn, plan.scored_at)
        name = f"withdrawn-{plan.run_id}.parquet"
        kept[name], data[name] = rows, _parquet_bytes(rows)
        staging.join(name).write_bytes(data[name])
        logger.warning("score: %d rows of %d files gone from the input marked withdrawn (their earlier rows stay)",
                       rows.num_rows, len(plan.diff.withdrawn))
    written = pa.concat_tables([t.cast(schema) for t in kept.values()]) if kept else schema.empty_table()
    heatmaps = explain_writer.commit(explain_stage) if explain_stage.exists() else 0
    parts = [] if plan.rescore_all else [committed]
    if found:  # after `written`: these files were not scored again
        reversioned = _reversioned_rows(committed, found, plan.scored_at)
        name = f"versions-{plan.run_id}.parquet"
        kept[name], data[name] = reversioned, _parquet_bytes(reversioned)
        staging.join(name).write_bytes(data[name])
        parts.append(reversioned)
        logger.info("score: %d files with unchanged bytes under a new version (touched, chmod, restored): their new "
                    "version recorded, not scored again", len(found))
    if kept:
        writer.commit(staging, replace_all=plan.rescore_all, data=data)
    _clear_attempts(writer.root.join(ATTEMPTS_DIR))
    return written, pa.concat_tables([*parts, written]), heatmaps


def _clear_attempts(attempts: Location) -> None:
    """After a commit every listed file has its row: the decode-attempt markers have served (and
    the lease keeps other runs out, so none of them is another run's)."""
    out = _output_of(attempts)
    try:
        remove_child(out, _writer(out).root, posix_basename(attempts.path), what="score", tree=True)
    except Exception as e:
        logger.warning("score: could not delete the decode-attempt markers in %s (%s): harmless, they are only "
                       "read while a file is being scored", attempts.uri, e)


def _claim_identifiers(dst: Location, ids: Identifiers) -> None:
    """Refuse to add rows named another way than the output's (another mode or key): they would
    not match the rows there, and every file would be scored again under a second name. An
    output with rows but no record was written before the modes existed: full names."""
    record = dst.join(OUTPUT_IDS_FILE)
    mine = ids.describe()
    raw = record.read_bytes() if record.exists() else None
    if raw is not None and not raw.strip():
        # Left empty by a full disk before the record was written whole: no record at all.
        logger.warning("score: %s is empty (a write cut off by a full disk?): written again", record.uri)
        raw = None
    if raw is not None:
        try:
            theirs = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"{record.uri} is not readable JSON ({e}): restore it, or score into a new output") from e
    elif Manifest(dst, what="score").read():  # committed rows (a planted file is none), written before the record
        theirs = {"path_mode": "full", "uid_mode": "full", "key_id": None}
    else:
        theirs = None
    if theirs is not None and {k: theirs.get(k) for k in mine} != mine:
        if theirs.get("key_id") != mine["key_id"] and theirs.get("path_mode") == mine["path_mode"] and theirs.get("uid_mode") == mine["uid_mode"]:
            why = f"its rows were hashed with another key (key id {theirs.get('key_id')}, this run's {mine['key_id']})"
            fix = "run with the key the output was written with"
        else:
            why = f"its rows name files with path_mode={theirs.get('path_mode')}, uid_mode={theirs.get('uid_mode')}"
            fix = f"rerun with --path-mode {theirs.get('path_mode')} --uid-mode {theirs.get('uid_mode')}"
        raise ConfigError(
            f"output {dst.uri}: {why}, and this run asks for path_mode={ids.path_mode}, uid_mode={ids.uid_mode}; every "
            f"file would be scored again under a second name. {fix}, or score into a new output"
        )
    if theirs != mine | MANIFEST_ERA or raw is None:
        record.write_atomic(json.dumps(mine | MANIFEST_ERA, indent=2).encode())


# In _identifiers.json: the output's rows are named by _manifest.json. Without this, a deleted
# manifest made every Parquet file there, planted ones included, "adopted" as committed rows.
MANIFEST_ERA = {"manifest": 1}


def _check_manifest_kept(dst: Location, manifest: Manifest) -> None:
    """Refuse an output whose manifest is gone although its runs wrote one (``_identifiers.json``
    says so): its Parquet files could no longer be told from planted ones."""
    record = dst.join(OUTPUT_IDS_FILE)
    if manifest.read() is not None or not record.exists():
        return
    try:
        era = json.loads(record.read_bytes()).get("manifest")
    except (ValueError, AttributeError):
        return  # _claim_identifiers names the problem
    if era and any(p.endswith(".parquet") for p in dst.files()):
        raise StorageError(
            f"{dst.join('_manifest.json').uri} is gone, but the runs on this output wrote one: its Parquet files "
            "cannot be told from planted ones, so none is taken as committed. Restore _manifest.json from a backup, "
            "or score into a new output")


def _engine(config: ScoreConfig, meta: dict) -> tuple[str, tuple[str, ...]]:
    """The engine, and the notes for the summary (an old package's ONNX file left unused)."""
    from ..models import choose_engine, onnx_unbound_note, package_has_onnx, verify_onnx

    note = onnx_unbound_note(meta)
    if note and config.engine == "onnxruntime":
        raise ConfigError(f"{config.model}: {note}; or score with --engine auto or torch")
    engine = choose_engine(config.engine, has_onnx=package_has_onnx(meta), use_gpu=config.use_gpu)
    if engine == "onnxruntime":  # a changed or missing file is refused here, not in every actor
        verify_onnx(config.model, s3_endpoint_url=config.s3_endpoint_url)
    if note:
        logger.warning("score: %s", note)
    return engine, (note,) if note else ()


def format_summary(s: dict) -> str:
    lines = [
        f"score {s['input']} -> {s['output']} (model {s['model_id']})",
        f"  files seen {s['files_seen']}, rows scored {s['scored']} (one per image or slice), skipped as already "
        f"scored {s['skipped_already_scored']}, errors {s['errors']}, not selected {s.get('not_selected', 0)}"
        + (f", slices skipped (no content or no head) {s['slices_skipped']}" if s.get("slices_skipped") else ""),
    ]
    if s.get("withdrawn") or s.get("errors_retried") or s.get("errors_final"):
        lines.append(f"  withdrawn {s.get('withdrawn', 0)} (files gone from the input), error rows tried again "
                     f"{s.get('errors_retried', 0)}, errors final after --retry-errors {s.get('errors_final', 0)}")
    if s.get("replaced_models"):
        lines.append(f"  replaced the rows of model {', '.join(s['replaced_models'])} (--rescore-all)")
    for note in s.get("notes", ()):
        lines.append(f"  note: {note}")
    if s.get("series") is not None:
        lines.append(f"  series table: {s['series']} series or volumes in {s['output'].rstrip('/')}_series/")
    if s.get("heatmaps"):
        lines.append(f"  heat maps: {s['heatmaps']} overlay PNGs in {s['output'].rstrip('/')}_explain/")
    if s.get("dicom"):
        lines.extend(_dicom_lines(s["dicom"], s["output"].rstrip("/")))
    if s.get("committed_runs") or s.get("dropped_runs"):
        lines.append(f"  earlier cut-off runs: committed {s['committed_runs']}, redone {s['dropped_runs']}")
    engine = f" ({s['engine']}, {s['replicas']} model replicas x {s['cpus_per_replica']:g} CPUs)" if s.get("engine") else ""
    lines.append(f"  {s['wall_s']:.1f} s, {s['images_per_s']:.1f} images/s{engine}")
    if s.get("report"):
        lines.append(f"  report: {s['report']}")
    if s.get("mlflow_error"):
        lines.append(f"  MLflow: not logged, the rows are committed ({s['mlflow_error'][:200]})")
    return "\n".join(lines)


def _dicom_lines(d: dict, out: str) -> list[str]:
    lines = []
    if d["mode"] != "none":
        lines.append(f"  DICOM objects: {d['sr']} SR, {d['sc']} SC written to {out}_dicom/ ({d['series']} DICOM series"
                     + (f", {d['skipped']} left out: source file gone or unreadable" if d["skipped"] else "") + ")")
    if d.get("not_dicom_files"):
        lines.append(f"  not DICOM: {d['not_dicom_files']} scored files (JPEG/PNG/NIfTI) get no DICOM objects")
    for e in d.get("sent", ()):
        lines.append(f"  sent to {e['destination']}: {e['sent']} new, {e['already']} sent before"
                     + (f", {e['failed']} NOT sent ({e.get('error')}): the next run tries again" if e["failed"] else ""))
    return lines
