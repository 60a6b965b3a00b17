"""The Ray part of a scoring run: decode tasks and model replicas, rows into the run's staging folder."""

from __future__ import annotations

import math

from ..core import Location
from ._decode import decode_batch
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
                predictor,
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
