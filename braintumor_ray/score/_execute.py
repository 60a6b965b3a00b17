"""The Ray part of a scoring run: decode tasks and model replicas, rows into the run's staging folder."""

from __future__ import annotations

import hashlib
import math

import pyarrow as pa

from ..core import Location
from ._decode import decode_batch
from ._layout import parquet_bytes
from ._plan import DECODE_CPUS, ClusterShape, ScoringPlan

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

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.predict(batch)
        keys = hashlib.sha256()
        for path, k in zip(batch.column("path").to_pylist(), batch.column("slice_index").to_pylist()):
            keys.update(f"{path}\0{k}\n".encode())
        self.staging.join(f"part-{keys.hexdigest()[:32]}.parquet").write_atomic(parquet_bytes(rows))
        return pa.table({"rows": [rows.num_rows]})


def _execute(plan: ScoringPlan, staging: Location, *, source: Location, attempts: Location, predictor: type) -> None:
    """The Ray part: decode tasks read and preprocess the plan's files, the plan's replicas score
    them, the rows land in the run's staging folder (nothing is committed here). ``predictor``:
    the model side's class (:class:`._run.Predictor`), built on each replica from the plan."""
    import ray

    todo = plan.diff.todo
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # As in the ingest: on a small cluster the per-operator reservation idles half the CPUs.
    ctx.op_resource_reservation_enabled = False
    try:
        (
            # The decode tasks read the files themselves (one that fails to read is its own error
            # row), at DECODE_CPUS: at Ray's default of 1 CPU they could never be scheduled beside
            # model replicas that hold all but DECODE_CPUS of a node (the job hung).
            ray.data.from_items(
                [{"path": p, "size": n, "version": v, "refused": plan.refused.get(p)} for p, (n, v) in todo.items()],
                override_num_blocks=max(min(len(todo), 2 * cpus), math.ceil(len(todo) / FILES_PER_BLOCK)),
            )
            .map_batches(
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
    finally:
        ctx.op_resource_reservation_enabled = saved
