"""Several Ray nodes on one machine (ray.cluster_utils.Cluster, as Ray's own tests do): the
stages spread their work over the nodes and survive losing one."""

from __future__ import annotations

import collections
import os
import threading
import time

import pyarrow.dataset as pads
import pytest

from braintumor_ray import make_sample_dataset
from braintumor_ray.ingest import IngestConfig, run_ingest
from braintumor_ray.score import ScoreConfig, run_scoring

from _net import free_port

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's local Ray (this module runs last: conftest orders it)
        ray.shutdown()
    # The head runs the driver only (as on a real cluster); workers have one CPU each.
    # A free dashboard port: the default 8265 may belong to another Ray on the machine.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": free_port()})
    # Cluster writes its address to /tmp/ray/ray_current_cluster, which any address-less ray.init()
    # on the machine then joins (the suite's other process, a developer's run: seen). This module
    # connects by address, so the file goes at once (Cluster.shutdown would remove it anyway).
    from ray._common.utils import reset_ray_address

    reset_ray_address()
    workers = [c.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _gcs() -> str:
    import ray

    # Other Ray instances may run on this machine: ask this cluster, not "the latest".
    return ray.get_runtime_context().gcs_address


def _task_nodes(*name_parts: str) -> collections.Counter:
    """The nodes that ran tasks whose name holds any of ``name_parts``: one 3 s wait and one
    listing however many kinds of task a test asks about."""
    from ray.util.state import list_tasks

    time.sleep(3)  # task events reach the GCS in batches
    tasks = list_tasks(address=_gcs(), limit=10000, detail=True, raise_on_missing_output=False)
    return collections.Counter(t.node_id for t in tasks if any(p in (t.name or "") for p in name_parts) and t.node_id)


def test_ingest_spreads_over_nodes(cluster, tmp_path):
    make_sample_dataset(str(tmp_path / "raw"), per_class=16, test_per_class=4, size=96)
    report = run_ingest(IngestConfig(input=str(tmp_path / "raw"), output=str(tmp_path / "out"), images_per_block=8))
    assert report["counts"]["errors"] == 0
    nodes = _task_nodes("preprocess_batch")
    assert len(nodes) >= 2, f"decode tasks ran on {dict(nodes)}"


def _archive(root, n):
    make_sample_dataset(root, per_class=n, test_per_class=0, leaks=0, size=96, seed=4)
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)


def _scoring_nodes(layout: str) -> set[str]:
    """Nodes where the run's model works now: its actors (replicas), or its running tasks."""
    from ray.util.state import list_actors, list_tasks

    if layout == "replicas":
        actors = list_actors(address=_gcs(), filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
        return {a.node_id for a in actors if "MapWorker" in (a.class_name or "")}
    tasks = list_tasks(address=_gcs(), filters=[("state", "=", "RUNNING")], detail=True, raise_on_missing_output=False)
    return {t.node_id for t in tasks if "score_files" in (t.name or "") and t.node_id}


@pytest.mark.parametrize("layout", ["replicas", "tasks"])
def test_scoring_survives_losing_a_node(cluster, package, tmp_path, layout):
    """A node that runs the model is taken away mid-run: its model actor is restarted elsewhere
    (replicas) or its task run again on another node (tasks); every file lands exactly once."""
    import ray

    c, workers = cluster
    # Tasks score faster than actors start: more files, so that one is caught running.
    files = _archive(str(tmp_path / "archive"), 40 if layout == "replicas" else 150)
    result: dict = {}

    def score():
        try:
            result["summary"] = run_scoring(
                ScoreConfig(model=package, input=str(tmp_path / "archive"), output=str(tmp_path / "p"), concurrency=2,
                            batch_size=2, layout=layout)
            )
        except BaseException as e:  # surfaced by the assertion below
            result["error"] = e

    t = threading.Thread(target=score)
    t.start()
    # Wait until the model is up and working, then take away a node where it works.
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None and t.is_alive():
        busy = _scoring_nodes(layout)
        victim = next((w for w in workers if w.node_id in busy and w.node_id != ray.get_runtime_context().get_node_id()), None)
        time.sleep(0.2)
    assert victim is not None, "the model never came up"
    assert t.is_alive(), "the job ended before a node could be taken away: make the archive larger"
    c.remove_node(victim)
    workers.remove(victim)
    # A replacement, as an autoscaler would start; the later tests may take it away in turn.
    workers.append(c.add_node(num_cpus=1))
    t.join(timeout=300)
    assert "error" not in result, result.get("error")
    rows = pads.dataset(str(tmp_path / "p"), format="parquet").to_table(columns=["path", "status"]).to_pylist()
    assert sorted(r["path"] for r in rows) == files, "every file exactly once"
    assert all(r["status"] == "ok" for r in rows)
    # (was test_scoring_spreads_over_nodes, a scoring run of its own) the work spread over the nodes.
    assert result["summary"]["scored"] == len(files) and result["summary"]["layout"] == layout
    assert len(_task_nodes("decode_batch", "Predictor", "score_files")) >= 2


def _train_worker_nodes() -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=_gcs(), filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    return {a.node_id for a in actors if "RayTrainWorker" in (a.class_name or "")}


def test_two_worker_training_spreads_over_nodes_and_survives_losing_one(cluster, train_data_dir, tmp_path):
    import ray

    from braintumor_ray.train import TrainConfig, run_training

    c, workers = cluster
    storage = tmp_path / "runs"
    cfg = TrainConfig.smoke_test(data=train_data_dir, storage=str(storage), name="mn", num_workers=2, epochs=8,
                                 early_stop_patience=0, onnx=False)
    result: dict = {}

    def train():
        try:
            result["metrics"] = run_training(cfg)
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=train)
    t.start()
    # Wait until a checkpoint is surely registered (a folder appears before Ray Train records it;
    # a second folder means the first was reported), then take away a node with a worker. Folders
    # are counted as seen, not as they stand: Ray Train keeps only the best one (num_to_keep 1), so
    # an epoch that does not beat it leaves its folder for a moment only. Counting the folders
    # standing, a suite run of 2026-12-07 took the node away once the 8 epochs were done: no restore.
    deadline = time.time() + 240
    seen: set[str] = set()
    while time.time() < deadline and t.is_alive() and len(seen) < 2:
        seen.update(p.name for p in storage.glob("mn/checkpoint_*"))
        time.sleep(0.1)
    nodes = _train_worker_nodes()
    assert len(nodes) == 2, f"the two DDP workers shared a node: {nodes}"
    assert t.is_alive(), "training ended before a node could be taken away: more epochs"
    victim = next(w for w in workers if w.node_id in nodes and w.node_id != ray.get_runtime_context().get_node_id())
    c.remove_node(victim)
    workers.remove(victim)
    workers.append(c.add_node(num_cpus=1))  # the autoscaler's replacement
    t.join(timeout=400)
    assert "error" not in result, result.get("error")
    m = result["metrics"]
    assert m["restores"] and m["restores"][0] >= 1, m["restores"]  # from a checkpoint, not from zero
    assert [h["epoch"] for h in m["epochs"]][-1] == 8
    assert (storage / "mn" / "metrics.json").exists() and (storage / "mn" / "model" / "model.json").exists()
