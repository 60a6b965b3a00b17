"""Bulk scoring: an MRI archive (local or S3) -> one Parquet row per file, incrementally.

Ray Data reads the files; CPU tasks decode and preprocess them with the model package's own
:class:`MRIPreprocess` (the ingest's code, the training's settings); a pool of model actors
runs the network. Each run writes its rows to a staging folder beside the output, marks them
complete, then moves the files into the output one by one: a reader of the output sees whole
Parquet files only, and a run killed at any point is finished or redone by the next one.

DICOM files and NIfTI volumes are scored slice by slice (one row per slice, with its UIDs);
after each run the per-series table beside the output is rebuilt from every committed row
(:mod:`braintumor_ray.score._series`).

Output layout::

    OUTPUT/<run>_<n>.parquet      the predictions (read the folder with pandas, pyarrow, DuckDB)
    OUTPUT_series/series.parquet  one row per DICOM series or NIfTI volume and model
    OUTPUT._staging/<run>/        a run in progress or cut off (never read by users)
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..core import ConfigError, InputError, Location, resolve
from ..imaging import MRIPreprocess, SeriesSelector, sha256_hex
from ._config import ScoreConfig
from ._series import update_series_table

logger = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
STAGING_SUFFIX = "._staging"
DONE_MARKER = "_SUCCESS"
# Decoding is a few ms an image against tens for the model: two decode tasks share a CPU.
DECODE_CPUS = 0.5


def output_schema(class_names: list[str]) -> pa.Schema:
    return pa.schema(
        [
            ("path", pa.string()),
            ("sha256", pa.string()),
            ("size", pa.int64()),
            ("version", pa.string()),  # ETag on S3, mtime on disk: how reruns spot changed files
            ("predicted_label", pa.string()),
            *[(PROB_PREFIX + c, pa.float32()) for c in class_names],
            ("model_id", pa.string()),
            ("scored_at", pa.timestamp("us", tz="UTC")),
            ("status", pa.string()),  # ok, error, or skipped (left out by the series selector)
            ("error", pa.string()),
            # Where a slice came from: DICOM UIDs and InstanceNumber, the slice's index in a
            # NIfTI volume (or a multi-frame DICOM); null for plain images. Nothing else from a
            # file's header is ever written.
            *SLICE_FIELDS,
            ("selection", pa.string()),  # the series selector in force ("" for none)
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
    [("path", pa.string()), ("sha256", pa.string()), ("pixels", pa.binary()), ("side", pa.int32()), ("status", pa.string()), ("error", pa.string()), *SLICE_FIELDS]
)


def decode_batch(
    batch: pa.Table, *, preprocess: MRIPreprocess, already: frozenset = frozenset(), select: SeriesSelector | None = None
) -> pa.Table:
    """CPU side: file bytes -> sha256 and the preprocessed image of each slice, or the reason
    the file has none (one row then: an error, or ``skipped`` by the series selector).

    Files whose (path, sha256) is in ``already`` were rewritten with the same content (a new
    mtime or ETag only): they are dropped here, not scored twice.
    """
    cols: dict[str, list] = {n: [] for n in _DECODED.names}

    def add(path, digest, pixels, side, status, error, info):
        for k, v in zip(_DECODED.names, (path, digest, pixels, side, status, error)):
            cols[k].append(v)
        for k in _SLICE_NAMES:
            cols[k].append(getattr(info, k))

    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        data = data or b""
        digest = sha256_hex(data)
        if (path, digest) in already:
            continue
        res = preprocess.try_slices(data, name=path, select=select)
        for s in res.slices:
            add(path, digest, s.image.pixels.tobytes(), s.image.pixels.shape[0], "ok", None, s.info)
        if not res.slices:
            add(path, digest, None, None, "skipped" if res.skipped else "error", res.skipped or res.error, res.info)
    return pa.Table.from_pydict(cols, schema=_DECODED)


class Predictor:
    """Model side: one loaded package per actor; probabilities for the rows that decoded."""

    def __init__(
        self, model_uri: str, s3_endpoint_url: str | None, use_gpu: bool, files: dict, uri_prefix: str, scored_at: datetime, selection: str = ""
    ):
        import torch

        from ..models import load_model_package

        self.device = torch.device("cuda" if use_gpu else "cpu")
        # NHWC is what depthwise-conv backbones run fastest in on CPU.
        self.pkg = load_model_package(model_uri, s3_endpoint_url=s3_endpoint_url, channels_last=not use_gpu)
        self.pkg.model.to(self.device)
        self.schema = output_schema(list(self.pkg.class_names))
        self.files, self.uri_prefix, self.scored_at, self.selection = files, uri_prefix, scored_at, selection

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        n = batch.num_rows
        errors = batch.column("error").to_pylist()
        status = batch.column("status").to_pylist()
        ok = [i for i in range(n) if status[i] == "ok"]
        is_ok = [s == "ok" for s in status]
        probs = np.full((n, len(self.pkg.class_names)), np.nan, dtype=np.float32)
        if ok:
            pix = batch.column("pixels").to_pylist()
            side = batch.column("side").to_pylist()
            images = np.stack([np.frombuffer(pix[i], np.uint8).reshape(side[i], side[i]) for i in ok])
            x = self.pkg.prepare(images).to(self.device, non_blocking=True)
            with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                logits = self.pkg.model(x)
            probs[ok] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        paths = batch.column("path").to_pylist()
        names = list(self.pkg.class_names)
        predicted = [names[int(np.argmax(probs[i]))] if is_ok[i] else None for i in range(n)]
        cols: dict[str, Any] = {
            "path": [self.uri_prefix + p for p in paths],
            "sha256": batch.column("sha256"),
            "size": [self.files[p][0] for p in paths],
            "version": [self.files[p][1] for p in paths],
            "predicted_label": predicted,
            **{PROB_PREFIX + c: pa.array(np.where(is_ok, probs[:, k], None), pa.float32()) for k, c in enumerate(names)},
            "model_id": [self.pkg.model_id] * n,
            "scored_at": [self.scored_at] * n,
            "status": status,
            "error": errors,
            **{k: batch.column(k) for k in _SLICE_NAMES},
            "selection": [self.selection] * n,
        }
        return pa.Table.from_pydict(cols, schema=self.schema)


def _staging(dst: Location) -> Location:
    # Beside the output, not inside it: a glob over the output (DuckDB's) never meets it.
    return Location(uri=dst.uri.rstrip("/") + STAGING_SUFFIX, path=dst.path.rstrip("/") + STAGING_SUFFIX, fs=dst.fs, is_s3=dst.is_s3)


def recover(dst: Location) -> dict[str, int]:
    """Finish what earlier runs left: commit staged runs that completed, drop those that did not."""
    staging = _staging(dst)
    done = dropped = 0
    if not staging.exists():
        return {"committed_runs": 0, "dropped_runs": 0}
    for path in sorted(staging.fs.ls(staging.path, detail=False)):
        run_loc = staging.join(posix_basename(path))
        run = posix_basename(path)
        if run_loc.join(DONE_MARKER).exists():
            _commit(run_loc, dst)
            done += 1
        else:
            logger.warning("score: dropping the unfinished run %s (cut off before its rows were complete)", run)
            run_loc.remove()
            dropped += 1
    return {"committed_runs": done, "dropped_runs": dropped}


def _commit(run_loc: Location, dst: Location) -> int:
    """Move a complete run's files into the output, each file whole; safe to repeat after a kill."""
    moved = 0
    for path in run_loc.files():
        name = posix_basename(path)
        if name == DONE_MARKER:
            continue
        src = Location(uri=run_loc.uri_of(path), path=path, fs=run_loc.fs, is_s3=run_loc.is_s3)
        src.move_to(dst.join(name))
        moved += 1
    run_loc.remove()  # the marker goes last: a cut-off commit is finished next time
    return moved


def posix_basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _prior_rows(dst: Location) -> pa.Table:
    """(path, sha256, size, version, model_id, status, selection) of every row already committed."""
    types = {"path": pa.string(), "sha256": pa.string(), "size": pa.int64(), "version": pa.string(), "model_id": pa.string(), "status": pa.string(), "selection": pa.string()}
    files = [p for p in (dst.files() if dst.exists() else []) if p.endswith(".parquet")]
    tables = []
    for p in files:
        f = pq.ParquetFile(p, filesystem=dst.pyarrow_fs)
        have = [c for c in types if c in f.schema_arrow.names]
        t = f.read(columns=have)
        for c in types:
            if c not in have:  # files from before DICOM support: every row ok, no selector
                t = t.append_column(c, pa.array(["ok" if c == "status" else "" if c == "selection" else None] * t.num_rows, types[c]))
        tables.append(t.select(list(types)).cast(pa.schema(types)))
    if not tables:
        return pa.table({c: pa.array([], t) for c, t in types.items()})
    return pa.concat_tables(tables)


def read_package_meta(model_uri: str, s3_endpoint_url: str | None) -> dict:
    from ..models import PACKAGE_JSON

    loc = resolve(model_uri, s3_endpoint_url=s3_endpoint_url)
    try:
        return json.loads(loc.join(PACKAGE_JSON).read_bytes())
    except ValueError as e:
        raise ConfigError(f"{loc.uri}/{PACKAGE_JSON} is not a model package description ({e})") from e


def run_scoring(config: ScoreConfig) -> dict:
    """Score every new or changed file under ``input``; returns the run's summary."""
    import ray

    t0 = time.perf_counter()
    meta = read_package_meta(config.model, config.s3_endpoint_url)
    model_id, class_names = meta["model_id"], list(meta["class_names"])
    preprocess = MRIPreprocess.from_dict(meta["preprocess"])
    src = resolve(config.input, s3_endpoint_url=config.s3_endpoint_url)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    recovered = recover(dst)
    files = {p: v for p, v in src.files_with_versions().items() if not posix_basename(p).startswith(".")}
    if not files:
        raise InputError(f"no files under {config.input}: check the URI")

    prior = _prior_rows(dst)
    prefix = "s3://" if src.is_s3 else ""
    selection = config.select.describe()
    # A file the selector left out is done only for the same selector: other settings look again.
    same_model = prior.filter(
        pc.and_(
            pc.equal(prior.column("model_id"), model_id),
            pc.or_(pc.not_equal(prior.column("status"), "skipped"), pc.equal(prior.column("selection"), selection)),
        )
    )
    seen = set(zip(same_model.column("path").to_pylist(), same_model.column("size").to_pylist(), same_model.column("version").to_pylist()))
    todo = {p: v for p, v in files.items() if (prefix + p, v[0], v[1]) not in seen}
    known = zip(same_model.column("path").to_pylist(), same_model.column("sha256").to_pylist())
    already = frozenset((path[len(prefix) :], sha) for path, sha in known if path[len(prefix) :] in todo)
    summary: dict[str, Any] = {
        "input": src.uri,
        "output": dst.uri,
        "model_id": model_id,
        "files_seen": len(files),
        "skipped_already_scored": len(files) - len(todo),
        "scored": 0,
        "errors": 0,
        "not_selected": 0,
        **recovered,
    }
    if not todo:
        summary.update(series=_series(dst, class_names), wall_s=round(time.perf_counter() - t0, 3), images_per_s=0.0)
        return summary

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if config.use_gpu and gpus < 1:
        raise ConfigError("use_gpu is set but the Ray cluster has no GPU: drop --use-gpu or add GPU nodes")
    replicas = config.concurrency or (gpus if config.use_gpu else max(1, cpus // 2))
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    staging = _staging(dst).join(run_id)
    scored_at = datetime.now(timezone.utc)
    t_run = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # As in the ingest: on a small cluster the per-operator reservation idles half the CPUs.
    ctx.op_resource_reservation_enabled = False
    try:
        (
            ray.data.read_binary_files(list(todo), filesystem=src.pyarrow_fs, include_paths=True)
            .map_batches(
                decode_batch,
                batch_format="pyarrow",
                fn_kwargs={"preprocess": preprocess, "already": already, "select": config.select},
                # Remote args unlike the model's keep Ray Data from fusing the decode into the
                # model actor, where it would run in turn with inference instead of beside it.
                num_cpus=DECODE_CPUS,
            )
            .map_batches(
                Predictor,
                batch_format="pyarrow",
                batch_size=config.batch_size,
                fn_constructor_args=(config.model, config.s3_endpoint_url, config.use_gpu, todo, prefix, scored_at, selection),
                compute=ray.data.ActorPoolStrategy(size=replicas),
                num_gpus=1 if config.use_gpu else 0,
            )
            .write_parquet(staging.path, filesystem=staging.pyarrow_fs)
        )
    finally:
        ctx.op_resource_reservation_enabled = saved
    staged = [p for p in (staging.files() if staging.exists() else []) if p.endswith(".parquet")]
    written = pa.concat_tables(
        [pq.read_table(p, columns=["path", "status"], filesystem=staging.pyarrow_fs) for p in staged]
    ) if staged else pa.table({"path": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    # The marker says every row of the run is on storage: from here a cut-off run is committed
    # by the next one instead of redone.
    staging.join(DONE_MARKER).write_bytes(b"")
    _commit(staging, dst)
    elapsed = time.perf_counter() - t_run
    counts = {k: int(pc.sum(pc.equal(written.column("status"), k)).as_py() or 0) for k in ("ok", "error", "skipped")}
    files_written = len(set(written.column("path").to_pylist()))
    summary.update(
        scored=counts["ok"],
        errors=counts["error"],
        not_selected=counts["skipped"],
        skipped_already_scored=summary["skipped_already_scored"] + len(todo) - files_written,
        series=_series(dst, class_names),
        run_id=run_id,
        replicas=replicas,
        wall_s=round(time.perf_counter() - t0, 3),
        images_per_s=round(len(todo) / elapsed, 2),
    )
    return summary


def _series(dst: Location, class_names: list[str]) -> int | None:
    """Bring the per-series table up to date with every committed row; its row count, or None
    when the output holds no DICOM series or NIfTI volume."""
    return update_series_table(dst, class_names)


def format_summary(s: dict) -> str:
    lines = [
        f"score {s['input']} -> {s['output']} (model {s['model_id']})",
        f"  files seen {s['files_seen']}, rows scored {s['scored']} (one per image or slice), skipped as already "
        f"scored {s['skipped_already_scored']}, errors {s['errors']}, not selected {s.get('not_selected', 0)}",
    ]
    if s.get("series") is not None:
        lines.append(f"  series table: {s['series']} series or volumes in {s['output'].rstrip('/')}_series/")
    if s.get("committed_runs") or s.get("dropped_runs"):
        lines.append(f"  earlier cut-off runs: committed {s['committed_runs']}, redone {s['dropped_runs']}")
    lines.append(f"  {s['wall_s']:.1f} s, {s['images_per_s']:.1f} images/s")
    return "\n".join(lines)
