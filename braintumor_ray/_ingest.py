"""The ingest: MRI image folders (local or S3) -> preprocessed Parquet shards + report.json.

Ray Data reads and preprocesses the files in parallel; the driver then sees only the small
per-image facts (hashes, labels, splits), groups duplicates, carves the validation split and
flags test leakage, and Ray Data writes the final shards.

Output layout under ``output``::

    train/*.parquet  val/*.parquet  test/*.parquet   one row per kept image
    errors.parquet                                   one row per file that could not be used
    report.json                                      counts, duplicates, leakage, errors
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._errors import ConfigError, InputError, StorageError
from ._hashing import group_duplicates, phash, sha256_hex
from ._labels import CLASS_NAMES, canonical_label, canonical_split
from .storage import Location, resolve
from .transforms import MRIPreprocess

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
SPLITS = ("train", "val", "test")
REPORT_FILE = "report.json"
IMAGES_DIR = "images"
ERRORS_FILE = "errors.parquet"

# Schema of the workers' per-file output (before the driver adds labels and splits).
_DECODED_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("image", pa.binary()),
        ("image_height", pa.int16()),
        ("image_width", pa.int16()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("orig_mode", pa.string()),
        ("crop_x0", pa.int32()),
        ("crop_y0", pa.int32()),
        ("crop_x1", pa.int32()),
        ("crop_y1", pa.int32()),
        ("cropped", pa.bool_()),
        ("error", pa.string()),
    ]
)


@dataclass(kw_only=True)
class IngestConfig:
    """What to read, where to write, and how.

    Args:
        input: folder of ``<split>/<class>/<image>`` or ``<class>/<image>``; local or ``s3://``.
        output: folder for the Parquet shards and ``report.json``; local or ``s3://``.
        preprocess: crop and resize settings, shared with training and scoring.
        val_fraction: share of each class's training groups moved to the validation split.
        seed: seed of the validation split.
        near_dup_distance: largest pHash Hamming distance (bits of 64) that counts as a near
            duplicate; -1 turns near-duplicate matching off. 2 catches re-encoded copies and
            neighbouring slices of one scan in the real data; at 4, different patients match.
        s3_endpoint_url: endpoint of an S3-compatible store (else ``AWS_ENDPOINT_URL`` or AWS).
        overwrite: replace a non-empty ``output`` instead of refusing.
        images_per_block: images per Ray Data block: the unit of parallel work, and the most
            rows one Parquet file holds.
    """

    input: str
    output: str
    preprocess: MRIPreprocess = field(default_factory=MRIPreprocess)
    val_fraction: float = 0.15
    seed: int = 0
    near_dup_distance: int = 2
    s3_endpoint_url: str | None = None
    overwrite: bool = False
    images_per_block: int = 128

    def __post_init__(self) -> None:
        if not self.input or not self.output:
            raise ConfigError("input and output are both required: give a local path or s3://bucket/prefix")
        if not 0.0 <= self.val_fraction < 0.9:
            raise ConfigError(f"val_fraction={self.val_fraction} is out of range: use 0 <= val_fraction < 0.9")
        if not -1 <= self.near_dup_distance <= 32:
            raise ConfigError(f"near_dup_distance={self.near_dup_distance} is out of range: use -1..32 bits")
        if self.images_per_block < 1:
            raise ConfigError(f"images_per_block={self.images_per_block} must be at least 1")


@dataclass(frozen=True)
class _Planned:
    path: str  # path inside the filesystem
    label: str
    split: str  # train / val / test as published; train for a class-only layout
    source_split: str  # the folder name as published ("" for a class-only layout)


def plan_inputs(files: list[str], root: str) -> tuple[list[_Planned], list[dict], list[str], str]:
    """Sort a listing into images to read, errors (path, reason) and ignored files.

    The layout is ``<split>/<class>/<file>`` when any top folder is a split name, else
    ``<class>/<file>``.
    """
    rels = [(f, f[len(root) :].lstrip("/").split("/")) for f in files]
    has_splits = any(len(p) >= 3 and canonical_split(p[0]) for _, p in rels)
    depth = 3 if has_splits else 2
    layout = "<split>/<class>/<image>" if has_splits else "<class>/<image>"
    planned, errors, ignored = [], [], []
    for path, parts in rels:
        name = parts[-1]
        if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
            ignored.append(path)
            continue
        if len(parts) != depth:
            errors.append(_error(path, f"unexpected location: expected {layout} under the input"))
            continue
        split = canonical_split(parts[0]) if has_splits else "train"
        if split is None:
            errors.append(_error(path, f"unknown split folder {parts[0]!r}: expected Training, Testing or Validation"))
            continue
        label = canonical_label(parts[-2])
        if label is None:
            errors.append(
                _error(
                    path,
                    f"unknown class folder {parts[-2]!r}: expected one of {', '.join(CLASS_NAMES)} "
                    "(or a variant such as glioma_tumor, notumor)",
                    split=split,
                )
            )
            continue
        planned.append(_Planned(path, label, split, parts[0] if has_splits else ""))
    return planned, errors, ignored, layout


def _error(path: str, reason: str, split: str | None = None, label: str | None = None) -> dict:
    return {"path": path, "reason": reason, "split": split, "label": label}


def preprocess_batch(batch: pa.Table, *, preprocess: MRIPreprocess) -> pa.Table:
    """Worker side: bytes -> hashes, preprocessed image, crop box; an error string per bad file."""
    cols: dict[str, list] = {name: [] for name in _DECODED_SCHEMA.names}
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        data = data or b""
        row: dict[str, Any] = dict.fromkeys(_DECODED_SCHEMA.names)
        row["path"], row["sha256"] = path, sha256_hex(data)
        out, row["error"] = preprocess.try_call(data)
        if out is not None:
            row.update(
                phash=f"{phash(out.pixels):016x}",
                image=out.pixels.tobytes(),
                image_height=out.pixels.shape[0],
                image_width=out.pixels.shape[1],
                orig_width=out.orig_width,
                orig_height=out.orig_height,
                orig_mode=out.orig_mode,
                crop_x0=out.crop_box[0],
                crop_y0=out.crop_box[1],
                crop_x1=out.crop_box[2],
                crop_y1=out.crop_box[3],
                cropped=out.cropped,
            )
        for k, v in row.items():
            cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=_DECODED_SCHEMA)


def assign_splits(
    meta: list[dict], *, val_fraction: float, seed: int, near_dup_distance: int
) -> tuple[dict[str, dict], dict]:
    """Driver side: group duplicates, keep one training image per group, carve a grouped,
    stratified validation split, flag test images with a twin in the training data.

    ``meta`` rows have path, sha256, phash, label, split. Returns per-path output columns for
    every kept row, and the duplicates/leakage parts of the report.
    """
    n = len(meta)
    groups = group_duplicates(
        [m["sha256"] for m in meta], [int(m["phash"], 16) for m in meta], max_distance=near_dup_distance
    )
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    # A stable, human-checkable id: the smallest sha256 in the group.
    gid = {g: min(meta[i]["sha256"] for i in idx)[:16] for g, idx in members.items()}

    assigned: dict[str, dict] = {}
    dropped, conflicts, train_groups = [], [], defaultdict(list)
    for g, idx in members.items():
        if len({meta[i]["label"] for i in idx}) > 1:
            # The same picture filed under two classes, in any split: worth a person's look.
            conflicts.append({"group_id": gid[g], "members": [_member(meta[i]) for i in sorted(idx, key=lambda i: meta[i]["path"])]})
        train_idx = sorted((i for i in idx if meta[i]["split"] == "train"), key=lambda i: meta[i]["path"])
        if not train_idx:
            continue
        if len({meta[i]["label"] for i in train_idx}) > 1:
            # Within training neither label can be trusted: the group is left out.
            dropped.extend(meta[i]["path"] for i in train_idx)
            continue
        keep = train_idx[0]
        dropped.extend(meta[i]["path"] for i in train_idx[1:])
        train_groups[meta[keep]["label"]].append((gid[g], keep, len(idx)))

    rng = np.random.default_rng(seed)
    for label in sorted(train_groups):
        items = sorted(train_groups[label])
        order = rng.permutation(len(items))
        n_val = int(math.floor(val_fraction * len(items) + 0.5))
        for rank, k in enumerate(order):
            g, i, size = items[k]
            assigned[meta[i]["path"]] = {"split": "val" if rank < n_val else "train", "group_id": g, "group_size": size, "leak": None}

    # Published evaluation splits stay whole; each image learns whether training has its twin.
    train_sha = {m["sha256"] for m in meta if m["split"] == "train"}
    groups_with_train = {int(groups[i]) for i in range(n) if meta[i]["split"] == "train"}
    leak_rows = []
    for i, m in enumerate(meta):
        if m["split"] == "train":
            continue
        g = int(groups[i])
        leak = "exact" if m["sha256"] in train_sha else ("near" if g in groups_with_train else None)
        assigned[m["path"]] = {"split": m["split"], "group_id": gid[g], "group_size": len(members[g]), "leak": leak}
        if leak:
            leak_rows.append({**_member(m), "leak": leak})

    dup_groups = [
        {
            "group_id": gid[g],
            "kind": "exact" if len({meta[i]["sha256"] for i in idx}) == 1 else "near",
            "members": [_member(meta[i]) for i in sorted(idx, key=lambda i: meta[i]["path"])],
        }
        for g, idx in sorted(members.items(), key=lambda kv: gid[kv[0]])
        if len(idx) > 1
    ]
    per_label: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for m in meta:
        if m["split"] != "train":
            per_label[m["split"]][m["label"]]["total"] += 1
    for r in leak_rows:
        per_label[r["split"]][r["label"]][r["leak"]] += 1
        per_label[r["split"]][r["label"]]["leaked"] += 1
    report = {
        "duplicates": {
            "near_dup_distance": near_dup_distance,
            "groups": len(dup_groups),
            "exact_groups": sum(g["kind"] == "exact" for g in dup_groups),
            "near_groups": sum(g["kind"] == "near" for g in dup_groups),
            "images_in_groups": sum(len(g["members"]) for g in dup_groups),
            "dropped_from_training": sorted(dropped),
            "label_conflicts": conflicts,
            "group_list": dup_groups,
        },
        "leakage": {
            split: {
                "total": sum(c["total"] for c in labels.values()),
                "leaked": sum(c["leaked"] for c in labels.values()),
                "exact": sum(c["exact"] for c in labels.values()),
                "near": sum(c["near"] for c in labels.values()),
                "per_label": {lab: dict(sorted(c.items())) for lab, c in sorted(labels.items())},
                "files": sorted((r["path"] for r in leak_rows if r["split"] == split)),
            }
            for split, labels in sorted(per_label.items())
        },
    }
    return assigned, report


def _member(m: dict) -> dict:
    return {"path": m["path"], "split": m["split"], "label": m["label"]}


def add_decisions(batch: pa.Table, *, decisions: dict[str, dict], planned: dict[str, dict]) -> pa.Table:
    """Join the driver's decisions onto the workers' rows; rows without one (errors, dropped
    duplicates) are left out."""
    paths = batch.column("path").to_pylist()
    keep = [p in decisions for p in paths]
    batch = batch.filter(pa.array(keep, pa.bool_())).drop_columns(["error"])
    paths = [p for p, k in zip(paths, keep) if k]
    d = [decisions[p] for p in paths]
    pl = [planned[p] for p in paths]
    cols = {
        "label": pa.array([x["label"] for x in pl], pa.string()),
        "label_index": pa.array([CLASS_NAMES.index(x["label"]) for x in pl], pa.int8()),
        "split": pa.array([x["split"] for x in d], pa.string()),
        "source_split": pa.array([x["source_split"] for x in pl], pa.string()),
        "group_id": pa.array([x["group_id"] for x in d], pa.string()),
        "group_size": pa.array([x["group_size"] for x in d], pa.int32()),
        "leaked": pa.array([x["leak"] is not None for x in d], pa.bool_()),
        "leak": pa.array([x["leak"] for x in d], pa.string()),
    }
    for name, arr in cols.items():
        batch = batch.append_column(name, arr)
    # Users see URIs; the filesystem path was only the join key.
    uris = pa.array([x["uri"] for x in pl], pa.string())
    return batch.set_column(batch.schema.get_field_index("path"), "path", uris)


def run_ingest(config: IngestConfig) -> dict:
    """Run the ingest on the connected Ray cluster (a local one is started if none is)."""
    import ray

    t0 = time.perf_counter()
    src = resolve(config.input, s3_endpoint_url=config.s3_endpoint_url)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    if not dst.is_empty():
        if not config.overwrite:
            raise StorageError(f"output {dst.uri} is not empty: choose a new output, or pass --overwrite to replace it")
        dst.remove()
    files = src.files()
    planned, errors, ignored, layout = plan_inputs(files, src.path)
    if not planned:
        raise InputError(
            f"no usable image files under {src.uri} ({len(files)} files found, {len(errors)} in unexpected "
            f"places, {len(ignored)} not images). Expected {layout} with class folders such as glioma_tumor, "
            "no_tumor; image extensions " + ", ".join(IMAGE_EXTENSIONS)
        )
    logger.info("ingest: %d images to read from %s (%s), %d listing errors", len(planned), src.uri, layout, len(errors))

    if not ray.is_initialized():
        ray.init()
    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # Each stage here is a single fused read+map operator; Ray Data's per-operator reservation
    # then holds back half the CPUs (on 2 CPUs only one task ran at a time, measured).
    ctx.op_resource_reservation_enabled = False
    timing: dict[str, float] = {"list_s": time.perf_counter() - t0}
    try:
        decoded, decisions, hygiene, good = _decode_and_decide(config, src, planned, errors, timing)
        _write_shards(decoded, src, dst, planned, decisions, timing)
    finally:
        ctx.op_resource_reservation_enabled = saved

    counts_in: dict[str, Counter] = defaultdict(Counter)
    for p in planned:
        counts_in[p.split][p.label] += 1
    by_path = {p.path: p for p in planned}
    counts_out: dict[str, Counter] = defaultdict(Counter)
    for path, d in decisions.items():
        counts_out[d["split"]][by_path[path].label] += 1
    for e in errors:
        e["path"] = src.uri_of(e["path"])
    _write_errors(dst.join(ERRORS_FILE), errors)
    _relabel_paths(hygiene, src)
    wall = time.perf_counter() - t0
    report = {
        "input": src.uri,
        "output": dst.uri,
        "images": dst.join(IMAGES_DIR).uri,
        "layout": layout,
        "class_names": list(CLASS_NAMES),
        "preprocess": config.preprocess.to_dict(),
        "image_format": "raw uint8 greyscale, row-major, image_height x image_width",
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "counts": {
            "files_listed": len(files),
            "ignored_files": len(ignored),
            "images_read": len(planned),
            "images_ok": len(good),
            "errors": len(errors),
            "input": {s: dict(sorted(counts_in[s].items())) for s in SPLITS if s in counts_in},
            "output": {s: dict(sorted(counts_out[s].items())) for s in SPLITS if s in counts_out},
        },
        **hygiene,
        "errors": sorted(errors, key=lambda e: e["path"]),
        "ignored": [src.uri_of(p) for p in ignored[:100]],
        "timing": {**{k: round(v, 3) for k, v in timing.items()}, "wall_s": round(wall, 3), "images_per_s": round(len(planned) / wall, 2)},
    }
    # report.json is written last: its presence says the shards beside it are complete.
    dst.join(REPORT_FILE).write_bytes(json.dumps(report, indent=2).encode())
    logger.info("ingest: wrote %s", dst.join(REPORT_FILE).uri)
    return report


def _decode_and_decide(config: IngestConfig, src: Location, planned: list[_Planned], errors: list[dict], timing: dict):
    """Read and preprocess every image once (kept in Ray's object store), then decide splits."""
    import ray

    t = time.perf_counter()
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_blocks = max(2 * n_cpus, math.ceil(len(planned) / config.images_per_block))
    decoded = (
        ray.data.read_binary_files(
            [p.path for p in planned], filesystem=src.pyarrow_fs, include_paths=True, override_num_blocks=n_blocks
        )
        .map_batches(preprocess_batch, batch_format="pyarrow", fn_kwargs={"preprocess": config.preprocess})
        .materialize()
    )
    meta = _to_arrow(decoded.select_columns(["path", "sha256", "phash", "error"])).to_pylist()
    timing["decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    by_path = {p.path: p for p in planned}
    good = []
    for row in meta:
        p = by_path[row["path"]]
        if row["error"]:
            errors.append(_error(p.path, row["error"], p.split, p.label))
        else:
            good.append({**row, "label": p.label, "split": p.split})
    if not good:
        raise InputError(
            f"none of the {len(planned)} image files under {src.uri} could be decoded: "
            + "; ".join(f"{e['path']}: {e['reason']}" for e in errors[:5])
        )
    decisions, hygiene = assign_splits(
        good, val_fraction=config.val_fraction, seed=config.seed, near_dup_distance=config.near_dup_distance
    )
    timing["dedup_s"] = time.perf_counter() - t
    return decoded, decisions, hygiene, good


def _write_shards(decoded, src: Location, dst: Location, planned: list[_Planned], decisions: dict, timing: dict) -> None:
    t = time.perf_counter()
    extra = {p.path: {"label": p.label, "source_split": p.source_split, "uri": src.uri_of(p.path)} for p in planned}
    # One pass: join the decisions, write one folder per split (hive style: images/split=train/).
    decoded.map_batches(
        add_decisions, batch_format="pyarrow", fn_kwargs={"decisions": decisions, "planned": extra}
    ).write_parquet(dst.join(IMAGES_DIR).path, filesystem=dst.pyarrow_fs, partition_cols=["split"])
    timing["write_s"] = time.perf_counter() - t


def _to_arrow(ds) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def _relabel_paths(hygiene: dict, src: Location) -> None:
    for g in hygiene["duplicates"]["group_list"] + hygiene["duplicates"]["label_conflicts"]:
        for m in g["members"]:
            m["path"] = src.uri_of(m["path"])
    d = hygiene["duplicates"]
    d["dropped_from_training"] = [src.uri_of(p) for p in d["dropped_from_training"]]
    for split in hygiene["leakage"].values():
        split["files"] = [src.uri_of(p) for p in split["files"]]


def _write_errors(loc: Location, errors: list[dict]) -> None:
    schema = pa.schema([("path", pa.string()), ("reason", pa.string()), ("split", pa.string()), ("label", pa.string())])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(errors, schema=schema), buf)
    loc.write_bytes(buf.getvalue().to_pybytes())


def format_summary(report: dict) -> str:
    """One screen for a person: what was read, kept, dropped, leaked and refused."""
    c = report["counts"]
    lines = [
        f"ingest {report['input']} -> {report['output']}",
        f"  files listed {c['files_listed']}, images read {c['images_read']}, ok {c['images_ok']}, "
        f"errors {c['errors']}, ignored (not images) {c['ignored_files']}",
        f"  {'split':<6}" + "".join(f"{n:>12}" for n in CLASS_NAMES) + f"{'total':>8}",
    ]
    for split, labels in report["counts"]["output"].items():
        lines.append(f"  {split:<6}" + "".join(f"{labels.get(n, 0):>12}" for n in CLASS_NAMES) + f"{sum(labels.values()):>8}")
    d = report["duplicates"]
    lines.append(
        f"  duplicate groups {d['groups']} (exact {d['exact_groups']}, near {d['near_groups']}, pHash <= "
        f"{d['near_dup_distance']} bits); dropped from training {len(d['dropped_from_training'])}; "
        f"label conflicts {len(d['label_conflicts'])}"
    )
    for split, lk in report["leakage"].items():
        per = ", ".join(f"{lab} {v.get('leaked', 0)}/{v.get('total', 0)}" for lab, v in lk["per_label"].items())
        lines.append(f"  {split}: {lk['leaked']}/{lk['total']} have a twin in training (exact {lk['exact']}, near {lk['near']}): {per}")
    if report["errors"]:
        lines.append(f"  errors ({len(report['errors'])}, all in errors.parquet and report.json):")
        for e in report["errors"][:8]:
            lines.append(f"    {e['path']}: {e['reason']}")
        if len(report["errors"]) > 8:
            lines.append(f"    ... {len(report['errors']) - 8} more")
    t = report["timing"]
    lines.append(
        f"  {t['wall_s']:.1f} s ({t['images_per_s']:.1f} images/s): list {t['list_s']:.1f}, decode {t['decode_s']:.1f}, "
        f"dedup {t['dedup_s']:.1f}, write {t['write_s']:.1f}"
    )
    return "\n".join(lines)
