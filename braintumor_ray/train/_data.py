"""The ingest's Parquet splits as Ray Datasets of decoded uint8 images, ready for Ray Train."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ..core import CLASS_NAMES, InputError, Location, StorageError, resolve

logger = logging.getLogger(__name__)

COLUMNS = ["image", "image_height", "image_width", "label_index", "leaked"]
REQUIRED_SPLITS = ("train", "val")


@dataclass
class TrainData:
    """Materialised splits (in Ray's object store) and what the driver needs to know about them."""

    datasets: dict[str, Any]  # split -> ray.data.Dataset with image (N,H,W) uint8, label int64, leaked bool
    counts: dict[str, int]
    class_counts: list[int]  # training images per class, in CLASS_NAMES order
    report: dict[str, Any]  # the ingest's report.json
    image_size: int


def decode_batch(batch: pa.Table) -> dict[str, np.ndarray]:
    """Raw greyscale bytes -> (N, H, W) uint8; label_index -> int64; leaked (null = False)."""
    n = batch.num_rows
    h = batch.column("image_height").to_numpy()
    w = batch.column("image_width").to_numpy()
    if n and (np.any(h != h[0]) or np.any(w != w[0])):
        raise InputError("images of different sizes in one split: run jobs/preprocess.py again (it writes one size)")
    hh, ww = (int(h[0]), int(w[0])) if n else (0, 0)
    images = batch.column("image").to_pylist()
    pixels = np.frombuffer(b"".join(images), dtype=np.uint8).reshape(n, hh, ww) if n else np.zeros((0, 1, 1), np.uint8)
    leaked = batch.column("leaked").fill_null(False).to_numpy(zero_copy_only=False).astype(bool)
    return {"image": pixels, "label": batch.column("label_index").to_numpy().astype(np.int64), "leaked": leaked}


def read_report(data: Location) -> dict[str, Any]:
    report_loc = data.join("report.json")
    try:
        exists = report_loc.exists()
    except StorageError as e:
        raise StorageError(f"cannot read --data {data.uri}: {e}") from e
    if not exists:
        raise InputError(
            f"--data {data.uri} is not the output of jobs/preprocess.py: it has no report.json "
            "(written last, so an interrupted ingest has none). Run jobs/preprocess.py --output there first."
        )
    try:
        report = json.loads(report_loc.read_bytes())
        classes = report["class_names"]
        report["preprocess"]["image_size"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{report_loc.uri} is not an ingest report ({e}): run jobs/preprocess.py again") from e
    if list(classes) != list(CLASS_NAMES):
        raise InputError(f"{report_loc.uri} has classes {classes}; this version trains on {list(CLASS_NAMES)}")
    return report


def missing_split_hint(split: str, report: dict[str, Any]) -> str:
    """What to do about a split the ingest output lacks, from what its report says."""
    if split != "val":
        return "run jobs/preprocess.py on a folder with training images (<split>/<class>/<image> or <class>/<image>)"
    fraction = report.get("val_fraction")
    if not fraction:
        return f"it was ingested with --val-fraction {fraction}: run jobs/preprocess.py again with --val-fraction > 0"
    out = report.get("counts", {}).get("output", {})
    have_val = {lab for lab, n in out.get("val", {}).items() if n}
    no_val = [c for c in CLASS_NAMES if c not in have_val]
    per_class = out.get("train", {})
    return (
        f"no validation images for {', '.join(f'{c} ({per_class.get(c, 0)} training)' for c in no_val)} "
        f"at --val-fraction {fraction}: a class needs two or more distinct training images (duplicate groups or "
        "series) to give one to validation. Add training images, or run jobs/preprocess.py again (earlier versions "
        "carved none from small classes)"
    )


# Ingest outputs up to this size (their Parquet files, all splits) are read by the driver in one
# pass and put into the object store as they are. Ray Data's path costs three executions whatever
# the size: 7-12 s on a warm 2-CPU Ray for the 160-image test sample, against 0.1 s read here; and a
# search or training run on a few thousand images (the 3264-image set at 224 px is ~170 MB) only
# waits. Larger outputs are decoded by Ray Data tasks, in parallel and without one process holding
# them all.
DIRECT_READ_MAX_BYTES = 256 * 2**20
BLOCK_ROWS = 256  # the Ray Data path's batch size: blocks of the same size either way


def load_train_data(
    uri: str, *, s3_endpoint_url: str | None = None, seed: int = 0, direct_read_max_bytes: int = DIRECT_READ_MAX_BYTES
) -> TrainData:
    """Read, decode and materialise train/val/test from an ingest output.

    Materialising in the driver (a few hundred MB at most for this data) means the training
    workers only read blocks from the object store: with every CPU given to the workers, no Ray
    Data task has to be scheduled during training. The training split is shuffled once here
    (the ingest writes blocks in folder order, i.e. by class) and again per epoch in the workers.
    Outputs up to ``direct_read_max_bytes`` are read by this process (see DIRECT_READ_MAX_BYTES),
    larger ones by Ray Data.
    """
    data = resolve(uri, s3_endpoint_url=s3_endpoint_url)
    report = read_report(data)
    if report.get("val_missing_classes"):
        logger.warning(
            "%s has no validation images for %s (too few training images): early stopping and the best "
            "epoch do not see them",
            data.uri,
            ", ".join(report["val_missing_classes"]),
        )
    images = data.join("images")
    files: dict[str, list[str]] = {}
    size = 0
    for split in ("train", "val", "test"):
        loc = images.join(f"split={split}")
        # Parquet files only, as Ray's reader takes a folder (a copied output may hold .DS_Store or .crc files).
        sizes = {f: n for f, n in loc.file_sizes(missing_ok=True).items() if f.endswith(".parquet")}
        found = list(sizes)
        size += sum(sizes.values())
        if not found:
            if split in REQUIRED_SPLITS:
                raise InputError(
                    f"--data {data.uri} has no {split} split ({loc.uri}): " + missing_split_hint(split, report)
                )
            logger.warning("no %s split in %s: no test metrics", split, data.uri)
            continue
        files[split] = found
    if size <= direct_read_max_bytes:
        datasets, labels = _read_direct(data, files, seed=seed)
    else:
        datasets, labels = _read_with_ray_data(data, files, seed=seed)
    counts = {split: ds.count() for split, ds in datasets.items()}
    for split, n in counts.items():
        if n == 0:
            raise InputError(f"the {split} split of {data.uri} is empty: nothing to train or validate on")
    class_counts = np.bincount(labels, minlength=len(CLASS_NAMES)).tolist()
    logger.info("data %s: %s; training images per class %s", data.uri, counts, dict(zip(CLASS_NAMES, class_counts)))
    return TrainData(
        datasets=datasets,
        counts=counts,
        class_counts=class_counts,
        report=report,
        image_size=int(report["preprocess"]["image_size"]),
    )


def _read_direct(data: Location, files: dict[str, list[str]], *, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    import pyarrow.parquet as pq
    import ray
    from ray.data.extensions import ArrowTensorArray

    fs = data.pyarrow_fs
    datasets: dict[str, Any] = {}
    labels = np.zeros(0, np.int64)
    for split, paths in files.items():
        table = pa.concat_tables([pq.read_table(p, filesystem=fs, columns=COLUMNS) for p in paths])
        batch = decode_batch(table)
        if split == "train":
            order = np.random.default_rng(seed).permutation(len(batch["label"]))
            batch = {k: v[order] for k, v in batch.items()}
            labels = batch["label"]
        blocks = [
            pa.table(
                {
                    "image": ArrowTensorArray.from_numpy(batch["image"][i : i + BLOCK_ROWS]),
                    "label": pa.array(batch["label"][i : i + BLOCK_ROWS]),
                    "leaked": pa.array(batch["leaked"][i : i + BLOCK_ROWS]),
                }
            )
            for i in range(0, max(len(batch["label"]), 1), BLOCK_ROWS)
        ]
        datasets[split] = ray.data.from_arrow(blocks)
    return datasets, labels


def _read_with_ray_data(data: Location, files: dict[str, list[str]], *, seed: int) -> tuple[dict[str, Any], np.ndarray]:
    import ray

    lazy: dict[str, Any] = {}
    for split, paths in files.items():
        ds = ray.data.read_parquet(paths, filesystem=data.pyarrow_fs, columns=COLUMNS)
        ds = ds.map_batches(decode_batch, batch_format="pyarrow", batch_size=BLOCK_ROWS)
        if split == "train":
            ds = ds.random_shuffle(seed=seed)
        lazy[split] = ds
    # One split after the other: three executions side by side split the CPUs between their
    # operators and stall each other (the 128-row demo sample on 2 CPUs, warm workers, 3
    # interleaved rounds: 32-42 s side by side, 11-14 s one after the other).
    datasets = {split: ds.materialize() for split, ds in lazy.items()}
    labels = np.concatenate([b["label"] for b in datasets["train"].iter_batches(batch_size=4096, batch_format="numpy")])
    return datasets, labels
