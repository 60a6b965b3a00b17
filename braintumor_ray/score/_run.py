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
    OUTPUT/_config.yaml           the last run's ScoreConfig (for --config; dataset readers skip it)
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

from ..core import ConfigError, InputError, Location, StagedWriter, posix_basename, resolve
from ..imaging import InputGuard, MRIPreprocess, SeriesSelector, sha256_hex
from ..trust import softmax
from ..tracking import log_scoring, resolve_registered_model
from ._config import OUTPUT_CONFIG_FILE, ScoreConfig
from ._series import update_series_table

logger = logging.getLogger(__name__)

PROB_PREFIX = "prob_"
# Decoding is a few ms an image against tens for the model: two decode tasks share a CPU.
DECODE_CPUS = 0.5
# CPU scoring: the model's share of the CPUs (decode ~3 ms an image, ONNX Runtime's Lite0 ~11 ms
# a thread) and the threads of one replica (intra-op scaling is near-linear at 2: 92 -> 173
# images/s). Measured on 2 vCPUs, 3264 images: 1 replica x 1 CPU 75 images/s, 1 x 1.5 CPUs (2
# threads) 101, 2 x 0.75 CPUs 102 (docs/benchmarks.md).
MODEL_SHARE = 0.75
THREADS_PER_REPLICA = 2


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
            # null: the prediction stands; out_of_distribution (wins) or low_confidence: review it
            ("review_reason", pa.string()),
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
     ("error", pa.string()), ("head_fraction", pa.float32()), *SLICE_FIELDS]
)


def decode_batch(
    batch: pa.Table,
    *,
    preprocess: MRIPreprocess,
    already: frozenset = frozenset(),
    select: SeriesSelector | None = None,
    guard: InputGuard | None = None,
) -> pa.Table:
    """CPU side: file bytes -> sha256 and the preprocessed image of each slice, or the reason
    the file has none (one row then: an error, or ``skipped`` by the series selector).

    Files whose (path, sha256) is in ``already`` were rewritten with the same content (a new
    mtime or ETag only): they are dropped here, not scored twice.
    """
    cols: dict[str, list] = {n: [] for n in _DECODED.names}

    def add(path, digest, pixels, side, status, error, head, info):
        for k, v in zip(_DECODED.names, (path, digest, pixels, side, status, error, head)):
            cols[k].append(v)
        for k in _SLICE_NAMES:
            cols[k].append(getattr(info, k))

    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        data = data or b""
        digest = sha256_hex(data)
        if (path, digest) in already:
            continue
        res = preprocess.try_slices(data, name=path, select=select, guard=guard)
        for s in res.slices:
            add(path, digest, s.image.pixels.tobytes(), s.image.pixels.shape[0], "ok", None, s.image.head_fraction, s.info)
        if not res.slices:
            add(path, digest, None, None, "skipped" if res.skipped else "error", res.skipped or res.error, None, res.info)
    return pa.Table.from_pydict(cols, schema=_DECODED)


class Predictor:
    """Model side: one loaded package per actor; probabilities for the rows that decoded."""

    def __init__(
        self,
        model_uri: str,
        s3_endpoint_url: str | None,
        use_gpu: bool,
        files: dict,
        uri_prefix: str,
        scored_at: datetime,
        selection: str = "",
        engine: str = "torch",
        threads: int | None = None,
        review_threshold: float | None = None,
    ):
        from ..models import load_inference_model

        # Intra-op threads = the CPUs this actor was given (Ray's OMP_NUM_THREADS covers torch
        # only, and ORT would take every core): replicas and decode tasks then share the node
        # without oversubscribing it.
        self.threads = threads or actor_threads()
        self.model = load_inference_model(
            model_uri, engine=engine, use_gpu=use_gpu, threads=self.threads, s3_endpoint_url=s3_endpoint_url
        )
        self.schema = output_schema(list(self.model.class_names))
        self.files, self.uri_prefix, self.scored_at, self.selection = files, uri_prefix, scored_at, selection
        self.review_threshold = review_threshold

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
        if ok:
            pix = batch.column("pixels").to_pylist()
            side = batch.column("side").to_pylist()
            images = np.stack([np.frombuffer(pix[i], np.uint8).reshape(side[i], side[i]) for i in ok])
            logits, feats = self.model.outputs(images)
            trust = self.model.trust
            if trust is None:  # a package from before calibration: raw softmax, no flags
                probs[ok] = softmax(logits)
                conf[ok] = probs[ok].max(axis=1)
            else:
                a = trust.assess(logits, feats, review_threshold=self.review_threshold)
                probs[ok], conf[ok], ood[ok] = a.probs, a.confidence, a.ood_score
                for i, r in zip(ok, a.review_reason):
                    reasons[i] = r
        paths = batch.column("path").to_pylist()
        names = list(self.model.class_names)
        predicted = [names[int(np.argmax(probs[i]))] if is_ok[i] else None for i in range(n)]
        cols: dict[str, Any] = {
            "path": [self.uri_prefix + p for p in paths],
            "sha256": batch.column("sha256"),
            "size": [self.files[p][0] for p in paths],
            "version": [self.files[p][1] for p in paths],
            "predicted_label": predicted,
            **{PROB_PREFIX + c: pa.array(np.where(is_ok, probs[:, k], None), pa.float32()) for k, c in enumerate(names)},
            "confidence": pa.array(conf, pa.float32(), mask=np.isnan(conf)),
            "ood_score": pa.array(ood, pa.float32(), mask=np.isnan(ood)),
            "review_reason": reasons,
            "head_fraction": batch.column("head_fraction"),
            "model_id": [self.model.model_id] * n,
            "scored_at": [self.scored_at] * n,
            "status": status,
            "error": errors,
            **{k: batch.column(k) for k in _SLICE_NAMES},
            "selection": [self.selection] * n,
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
    return StagedWriter(dst, what="score").recover()


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

    from ..models import package_preprocess

    t0 = time.perf_counter()
    asked = config  # saved as given: a models:/ name stays a name, not the folder it resolved to
    config, registered = resolve_registered_model(config)  # models:/NAME/VERSION -> its package folder
    meta = read_package_meta(config.model, config.s3_endpoint_url)
    model_id, class_names = meta["model_id"], list(meta["class_names"])
    preprocess = package_preprocess(meta, config.model)
    engine = _engine(config, meta)  # before any work: an impossible choice fails here
    # The series verdicts' review threshold: the option, else the package's (none before trust).
    review = config.review_threshold if config.review_threshold is not None else float(
        (meta.get("trust") or {}).get("review_threshold", 0.0))
    src = resolve(config.input, s3_endpoint_url=config.s3_endpoint_url)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    writer = StagedWriter(dst, what="score")
    recovered = writer.recover()
    files = {p: v for p, v in src.files_with_versions().items() if not posix_basename(p).startswith(".")}
    if not files:
        raise InputError(f"no files under {config.input}: check the URI")
    asked.save_yaml(dst.join(OUTPUT_CONFIG_FILE))  # `jobs/score.py --config` takes it back; readers skip it

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
        summary.update(series=_series(dst, class_names, review), wall_s=round(time.perf_counter() - t0, 3), images_per_s=0.0)
        return log_scoring(config, summary, registered)

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    if config.use_gpu and gpus < 1:
        raise ConfigError("use_gpu is set but the Ray cluster has no GPU: drop --use-gpu or add GPU nodes")
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    replicas, replica_cpus = plan_replicas(config, cpus=cpus, gpus=gpus, node_cpus=node_cpus)
    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    staging = writer.stage(run_id)
    scored_at = datetime.now(timezone.utc)
    t_run = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # As in the ingest: on a small cluster the per-operator reservation idles half the CPUs.
    ctx.op_resource_reservation_enabled = False
    try:
        (
            # Reads and writes are I/O: at their default of 1 CPU they could never be scheduled
            # beside model replicas that hold all but DECODE_CPUS of a node (the job hung).
            ray.data.read_binary_files(list(todo), filesystem=src.pyarrow_fs, include_paths=True, num_cpus=DECODE_CPUS)
            .map_batches(
                decode_batch,
                batch_format="pyarrow",
                fn_kwargs={"preprocess": preprocess, "already": already, "select": config.select, "guard": config.guard},
                # Remote args unlike the model's keep Ray Data from fusing the decode into the
                # model actor, where it would run in turn with inference instead of beside it.
                num_cpus=DECODE_CPUS,
            )
            .map_batches(
                Predictor,
                batch_format="pyarrow",
                batch_size=config.batch_size,
                fn_constructor_args=(config.model, config.s3_endpoint_url, config.use_gpu, todo, prefix, scored_at, selection,
                                     engine),
                fn_constructor_kwargs={"review_threshold": config.review_threshold},
                compute=ray.data.ActorPoolStrategy(size=replicas),
                num_gpus=1 if config.use_gpu else 0,
                num_cpus=replica_cpus,
            )
            .write_parquet(staging.path, filesystem=staging.pyarrow_fs, ray_remote_args={"num_cpus": DECODE_CPUS})
        )
    finally:
        ctx.op_resource_reservation_enabled = saved
    staged = [p for p in (staging.files() if staging.exists() else []) if p.endswith(".parquet")]
    written = pa.concat_tables(
        [pq.read_table(p, columns=["path", "status"], filesystem=staging.pyarrow_fs) for p in staged]
    ) if staged else pa.table({"path": pa.array([], pa.string()), "status": pa.array([], pa.string())})
    # Every row of the run is on storage: the commit marks it so (from here a cut-off run is
    # committed by the next one instead of redone), then moves the files in one by one.
    writer.commit(staging)
    elapsed = time.perf_counter() - t_run
    counts = {k: int(pc.sum(pc.equal(written.column("status"), k)).as_py() or 0) for k in ("ok", "error", "skipped")}
    files_written = len(set(written.column("path").to_pylist()))
    summary.update(
        scored=counts["ok"],
        errors=counts["error"],
        not_selected=counts["skipped"],
        skipped_already_scored=summary["skipped_already_scored"] + len(todo) - files_written,
        series=_series(dst, class_names, review),
        run_id=run_id,
        replicas=replicas,
        cpus_per_replica=replica_cpus,
        engine=engine,
        wall_s=round(time.perf_counter() - t0, 3),
        images_per_s=round(len(todo) / elapsed, 2),
    )
    return log_scoring(config, summary, registered)


def _engine(config: ScoreConfig, meta: dict) -> str:
    from ..models import choose_engine, package_has_onnx, verify_onnx

    engine = choose_engine(config.engine, has_onnx=package_has_onnx(meta), use_gpu=config.use_gpu)
    if engine == "onnxruntime":  # a changed or missing file is refused here, not in every actor
        verify_onnx(config.model, s3_endpoint_url=config.s3_endpoint_url)
    return engine


def plan_replicas(config: ScoreConfig, *, cpus: float, gpus: int, node_cpus: list[float] | None = None) -> tuple[int, float]:
    """(model replicas, CPUs each; each replica runs that many threads, rounded).

    With use_gpu: one replica per GPU, 1 CPU each (default). On CPUs each node gives the model
    :data:`MODEL_SHARE` of its CPUs and reading and decoding the rest (at least
    :data:`DECODE_CPUS`), in replicas of about :data:`THREADS_PER_REPLICA` CPUs: on a 2-vCPU
    node one replica of 1.5 CPUs (2 threads) beside 0.5 CPU of decode tasks, the fastest layout
    measured (docs/benchmarks.md). ``node_cpus``: the CPUs of each node (default: one node).
    """
    if config.use_gpu:
        return config.concurrency or gpus, config.cpus_per_replica or 1.0
    nodes = [c for c in (node_cpus or [cpus]) if c >= 2 * DECODE_CPUS] or [cpus]
    model = [max(min(c * MODEL_SHARE, c - DECODE_CPUS), DECODE_CPUS) for c in nodes]
    # One replica size for the whole pool (Ray Data's actors are alike): the smallest node's.
    default_per = min(m / max(1, round(m / THREADS_PER_REPLICA)) for m in model)
    per = config.cpus_per_replica or default_per
    if config.concurrency:
        replicas = config.concurrency
        if not config.cpus_per_replica:  # the model's CPUs shared by the replicas asked for
            per = min(default_per, sum(model) / replicas)
    else:
        replicas = max(1, sum(int(m / per + 1e-9) for m in model))
    if replicas * per > cpus - DECODE_CPUS + 1e-9 or per > max(nodes) - DECODE_CPUS + 1e-9:
        raise ConfigError(
            f"{replicas} model replicas x {per:g} CPUs leave less than {DECODE_CPUS} of the cluster's {cpus:g} CPUs "
            "(or of a node's) to read and decode files, and the job would wait forever: lower concurrency or "
            "cpus_per_replica"
        )
    if abs(per - DECODE_CPUS) < 1e-9:
        # Equal remote arguments would let Ray Data fuse the decode stage into the model actor,
        # where it runs in turn with inference (issue 6): a hair less keeps them apart.
        per = DECODE_CPUS - 0.01
    return replicas, round(per, 3)


def _series(dst: Location, class_names: list[str], review_threshold: float) -> int | None:
    """Bring the per-series table up to date with every committed row; its row count, or None
    when the output holds no DICOM series or NIfTI volume."""
    return update_series_table(dst, class_names, review_threshold=review_threshold)


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
    engine = f" ({s['engine']}, {s['replicas']} model replicas x {s['cpus_per_replica']:g} CPUs)" if s.get("engine") else ""
    lines.append(f"  {s['wall_s']:.1f} s, {s['images_per_s']:.1f} images/s{engine}")
    return "\n".join(lines)
