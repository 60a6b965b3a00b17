"""The Ray part of a scoring run: decode tasks and model replicas, rows into the run's staging folder."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import TYPE_CHECKING

import pyarrow as pa

from ..core import Location, resolve
from ._decode import decode_batch
from ._layout import parquet_bytes
from ._plan import DECODE_CPUS, ClusterShape, ScoringPlan

if TYPE_CHECKING:
    import ray.data

# Decode tasks read their own files (a block of the listing each): a file that vanished or cannot
# be read since it was listed is an error row of its own (Ray Data's file reader failed the run).
FILES_PER_BLOCK = 32


def _cluster_shape() -> ClusterShape:
    import ray

    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    return ClusterShape(
        cpus=int(resources.get("CPU", 1)),
        gpus=int(resources.get("GPU", 0)),
        node_cpus=tuple(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")),
    )


class _ScoreAndStage:
    """A model replica's runner: scores a batch (``predictor``, built from the plan) and writes its
    rows into the run's staging folder itself, returning only their count.

    Ray Data's ``write_parquet`` after the replicas started 3-4 new worker processes a run (each
    ~2 s of CPU importing before it wrote anything) and moved every row through the object store
    once more: ~9% of the CPU a 1,000-image run used on 2 vCPUs (2026-12-07). A batch's file is
    named by its rows' keys, so a batch scored again after its replica died overwrites its own
    file (written whole or not at all): no row is staged twice.
    """

    def __init__(self, plan: ScoringPlan, staging: Location, predictor: type):
        self.predict = predictor(plan)
        self.staging = staging

    def __call__(self, batch: pa.Table, files: dict[str, tuple[int, str]] | None = None) -> pa.Table:
        rows = self.predict(batch, files=files)
        keys = hashlib.sha256()
        for path, k in zip(batch.column("path").to_pylist(), batch.column("slice_index").to_pylist()):
            keys.update(f"{path}\0{k}\n".encode())
        # Into the folder the driver made: a worker that outlived its run (its driver killed, the
        # staging dropped by the next run) fails here instead of bringing the staging back.
        self.staging.join(f"part-{keys.hexdigest()[:32]}.parquet").write_atomic(parquet_bytes(rows), parents=False)
        return pa.table({"rows": [rows.num_rows]})


# Layout tasks: the model of this worker process, for the run that loaded it (one at a time).
_TASK_RUNNER: dict[str, _ScoreAndStage] = {}


def score_files(
    batch: pa.Table, *, plan: ScoringPlan, staging: Location, source: Location, attempts: Location, predictor: type
) -> pa.Table:
    """Layout tasks: one block of the plan's files read, decoded and scored in this task, its rows
    staged as a replica stages them (a file per ``batch_size`` rows, named by its rows: a task
    retried after its worker died overwrites its own files). The model is loaded once per worker
    process and run, with as many threads as the task's CPUs. ``plan`` comes without its file
    list (the block's own rows give each file's size and version): a task's arguments stay small
    however large the run."""
    runner = _TASK_RUNNER.get(plan.run_id)
    if runner is None:
        _TASK_RUNNER.clear()  # another run's model goes first: one model per worker
        runner = _TASK_RUNNER[plan.run_id] = _ScoreAndStage(plan, staging, predictor)
    decoded = decode_batch(
        batch,
        preprocess=plan.preprocess,
        already=plan.diff.already,
        select=plan.select,
        guard=plan.guard,
        source=source,
        attempts=attempts,
    )
    paths, sizes, versions = (batch.column(c).to_pylist() for c in ("path", "size", "version"))
    files = {p: (n, v) for p, n, v in zip(paths, sizes, versions)}
    rows = 0
    for start in range(0, decoded.num_rows, plan.batch_size):  # a volume's slices in batches of the plan's size
        rows += runner(decoded.slice(start, plan.batch_size), files=files).column("rows")[0].as_py()
    return pa.table({"rows": [rows]})


def _execute(plan: ScoringPlan, staging: Location, *, source: Location, attempts: Location, predictor: type) -> None:
    """The Ray part: the plan's files read, preprocessed and scored, the rows in the run's staging
    folder (nothing is committed here). Layout ``tasks``: :func:`score_files` tasks; ``replicas``:
    decode tasks feeding the plan's model replicas. ``predictor``: the model side's class
    (:class:`._run.Predictor`), built from the plan once per replica or task worker."""
    import ray

    # Made here, once: the workers only write into them (see _ScoreAndStage).
    staging.make_folder()
    if plan.explain != "none":
        resolve(plan.explain_stage_uri, s3_endpoint_url=plan.s3_endpoint_url).make_folder()
    todo = plan.diff.todo
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # As in the ingest: on a small cluster the per-operator reservation idles half the CPUs.
    ctx.op_resource_reservation_enabled = False
    listed = ray.data.from_items(
        [{"path": p, "size": n, "version": v, "refused": plan.refused.get(p)} for p, (n, v) in todo.items()],
        override_num_blocks=max(min(len(todo), 2 * cpus), math.ceil(len(todo) / FILES_PER_BLOCK)),
    )
    try:
        if plan.layout == "tasks":
            listed.map_batches(
                score_files,
                batch_format="pyarrow",
                batch_size=None,  # a block a task: blocks of FILES_PER_BLOCK files
                fn_kwargs={
                    "plan": dataclasses.replace(
                        plan, diff=dataclasses.replace(plan.diff, todo={}, withdrawn=()), refused={}
                    ),
                    "staging": staging,
                    "source": source,
                    "attempts": attempts,
                    "predictor": predictor,
                },
                num_cpus=plan.replica_cpus,
                # No cap unless asked for: with one, Ray Data submits a task only once its loop
                # sees another end, and the CPUs idle in between (2,000 images on 2 vCPUs: 94-96
                # images/s capped at 2, 120-126 not; Ray queues uncapped tasks by their CPUs).
                concurrency=plan.concurrency,
            ).materialize()
        else:
            _replicas(listed, plan, staging, source=source, attempts=attempts, predictor=predictor)
    finally:
        ctx.op_resource_reservation_enabled = saved


def _replicas(
    listed: ray.data.Dataset,
    plan: ScoringPlan,
    staging: Location,
    *,
    source: Location,
    attempts: Location,
    predictor: type,
) -> None:
    """Layout replicas: decode tasks read and preprocess the files, the plan's model replicas
    score them and stage the rows."""
    import ray

    (
        # The decode tasks read the files themselves (one that fails to read is its own error
        # row), at DECODE_CPUS: at Ray's default of 1 CPU they could never be scheduled beside
        # model replicas that hold all but DECODE_CPUS of a node (the job hung).
        listed.map_batches(
            decode_batch,
            batch_format="pyarrow",
            fn_kwargs={
                "preprocess": plan.preprocess,
                "already": plan.diff.already,
                "select": plan.select,
                "guard": plan.guard,
                "source": source,
                "attempts": attempts,
            },
            # Remote args unlike the model's keep Ray Data from fusing the decode into the
            # model actor, where it would run in turn with inference instead of beside it.
            num_cpus=DECODE_CPUS,
        )
        .map_batches(
            _ScoreAndStage,
            batch_format="pyarrow",
            batch_size=plan.batch_size,
            fn_constructor_args=(plan, staging, predictor),
            compute=ray.data.ActorPoolStrategy(size=plan.replicas),
            num_gpus=1 if plan.use_gpu else 0,
            num_cpus=plan.replica_cpus,
        )
        .materialize()
    )
