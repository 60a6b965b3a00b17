"""The ingest: MRI image folders (local or S3) -> preprocessed Parquet shards + report.json.

Ray Data reads and preprocesses the files in parallel; the driver then sees only the small
per-image facts (hashes, labels, splits), groups duplicates, carves the validation split and
flags test leakage, and Ray Data writes the final shards.

DICOM files and NIfTI volumes may sit at any depth below their class folder (exports nest
patient/study/series folders); each of their slices is one image, keyed ``path\x00slice``
inside the job and stored with its UIDs and slice index. The validation split keeps the
slices of one DICOM series or NIfTI volume together.

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

from ._config import IngestConfig
from ..core import CLASS_NAMES, ConfigError, InputError, Location, StorageError, canonical_label, canonical_split, resolve
from ..imaging import DICOM_SUFFIXES, NIFTI_SUFFIXES, MRIPreprocess, SeriesSelector, group_duplicates, phash, sha256_hex, sniff_kind

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
MEDICAL_EXTENSIONS = DICOM_SUFFIXES + NIFTI_SUFFIXES
# Inside the job, one slice of a multi-slice file is ``path + _SLICE_SEP + index``: no real
# path holds a NUL, so a key never collides with a file's own path.
_SLICE_SEP = "\x00"
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
        ("sop_instance_uid", pa.string()),
        ("series_instance_uid", pa.string()),
        ("study_instance_uid", pa.string()),
        ("instance_number", pa.int32()),
        ("slice_index", pa.int32()),
        ("key", pa.string()),  # path, or path + _SLICE_SEP + slice for a file of many slices
        ("outcome", pa.string()),  # ok, error, not_selected (series selector), ignored (not an image after all)
        ("error", pa.string()),  # the reason, for error and not_selected
    ]
)
_SLICE_NAMES = ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "instance_number", "slice_index")


@dataclass(frozen=True)
class _Planned:
    path: str  # path inside the filesystem
    label: str
    split: str  # train / val / test as published; train for a class-only layout
    source_split: str  # the folder name as published ("" for a class-only layout)


def file_kind(name: str) -> str | None:
    """What a file's name promises: ``image`` (JPEG, PNG...), ``medical`` (.dcm, .nii...),
    ``maybe`` (no extension, or a UID-like all-digit one, as DICOM exports name files) or None."""
    lower = name.lower()
    if name.startswith("."):
        return None
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    if lower.endswith(MEDICAL_EXTENSIONS):
        return "medical"
    ext = lower.rsplit(".", 1)[1] if "." in lower else ""
    return "maybe" if ext == "" or ext.isdigit() else None


def plan_inputs(files: list[str], root: str) -> tuple[list[_Planned], list[dict], list[str], str]:
    """Sort a listing into images to read, errors (path, reason) and ignored files.

    The layout is ``<split>/<class>/<file>`` when any top folder is a split name, else
    ``<class>/<file>``; DICOM and NIfTI files (and extensionless files, which may be DICOM)
    may also sit deeper below their class folder.
    """
    rels = [(f, f[len(root) :].lstrip("/").split("/")) for f in files]
    has_splits = any(len(p) >= 3 and canonical_split(p[0]) for _, p in rels)
    depth = 3 if has_splits else 2
    layout = "<split>/<class>/<image>" if has_splits else "<class>/<image>"
    planned, errors, ignored = [], [], []
    for path, parts in rels:
        kind = file_kind(parts[-1])
        if kind is None:
            ignored.append(path)
            continue
        if len(parts) < depth or (kind == "image" and len(parts) != depth):
            errors.append(_error(path, f"unexpected location: expected {layout} under the input"))
            continue
        split = canonical_split(parts[0]) if has_splits else "train"
        if split is None:
            errors.append(_error(path, f"unknown split folder {parts[0]!r}: expected Training, Testing or Validation"))
            continue
        label = canonical_label(parts[depth - 2])
        if label is None:
            errors.append(
                _error(
                    path,
                    f"unknown class folder {parts[depth - 2]!r}: expected one of {', '.join(CLASS_NAMES)} "
                    "(or a variant such as glioma_tumor, notumor)",
                    split=split,
                )
            )
            continue
        planned.append(_Planned(path, label, split, parts[0] if has_splits else ""))
    return planned, errors, ignored, layout


def _error(path: str, reason: str, split: str | None = None, label: str | None = None) -> dict:
    return {"path": path, "reason": reason, "split": split, "label": label}


def preprocess_batch(batch: pa.Table, *, preprocess: MRIPreprocess, select: SeriesSelector | None = None) -> pa.Table:
    """Worker side: bytes -> hashes, preprocessed image, crop box (one row per slice of a DICOM
    or NIfTI file); one row with the reason per bad file or file the selector leaves out."""
    cols: dict[str, list] = {name: [] for name in _DECODED_SCHEMA.names}
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist()):
        data = data or b""
        digest = sha256_hex(data)
        res = preprocess.try_slices(data, name=path, select=select)
        if not res.slices:
            row: dict[str, Any] = dict.fromkeys(_DECODED_SCHEMA.names)
            row.update(path=path, key=path, sha256=digest, error=res.skipped or res.error)
            row.update({k: getattr(res.info, k) for k in _SLICE_NAMES})
            if res.skipped:
                row["outcome"] = "not_selected"
            elif file_kind(path.rsplit("/", 1)[-1]) == "maybe" and sniff_kind(data, path) == "image":
                row["outcome"] = "ignored"  # an extensionless file that is neither DICOM nor an image: a README
            else:
                row["outcome"] = "error"
            for k, v in row.items():
                cols[k].append(v)
        for i, s in enumerate(res.slices):
            out = s.image
            row = dict.fromkeys(_DECODED_SCHEMA.names)
            many = len(res.slices) > 1
            # The slices of one volume share a file: their hash is of their own pixels, so that
            # exact-duplicate grouping sees slices (blank ones are all one), not the file.
            row.update(path=path, outcome="ok", key=f"{path}{_SLICE_SEP}{i}" if many else path)
            row["sha256"] = sha256_hex(out.pixels.tobytes()) if many else digest
            row.update({k: getattr(s.info, k) for k in _SLICE_NAMES})
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

    ``meta`` rows have path (a unique key), sha256, phash, label, split, and optionally series
    (a DICOM SeriesInstanceUID or a volume's path): kept training images of one series go to
    the same split, so no scan has slices on both sides. Returns per-path output columns for
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
        # The unit of the split: a duplicate group, or all groups whose kept image shares a series.
        by_series: dict[Any, list] = defaultdict(list)
        for item in sorted(train_groups[label]):
            by_series[meta[item[1]].get("series") or ("group", item[0])].append(item)
        units = sorted(by_series.values())
        order = rng.permutation(len(units))
        n_val = int(math.floor(val_fraction * len(units) + 0.5))
        for rank, k in enumerate(order):
            for g, i, size in units[k]:
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
    """Join the driver's decisions (by key: path, or path and slice) onto the workers' rows;
    rows without one (errors, dropped duplicates, files left out) are left out."""
    keys = batch.column("key").to_pylist()
    keep = [k in decisions for k in keys]
    batch = batch.filter(pa.array(keep, pa.bool_()))
    paths = batch.column("path").to_pylist()
    d = [decisions[k] for k, kept in zip(keys, keep) if kept]
    batch = batch.drop_columns(["error", "key", "outcome"])
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
            "no_tumor; image extensions " + ", ".join(IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS) + " or DICOM files without one"
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
        n_ignored = len(ignored)
        decoded, decisions, hygiene, good, not_selected = _decode_and_decide(config, src, planned, errors, ignored, timing)
        n_ignored_late = len(ignored) - n_ignored  # extensionless files that were not DICOM
        _write_shards(decoded, src, dst, planned, decisions, timing)
    finally:
        ctx.op_resource_reservation_enabled = saved

    counts_in: dict[str, Counter] = defaultdict(Counter)
    for p in planned:
        counts_in[p.split][p.label] += 1
    label_of = {g["path"]: g["label"] for g in good}  # by key
    counts_out: dict[str, Counter] = defaultdict(Counter)
    for key, d in decisions.items():
        counts_out[d["split"]][label_of[key]] += 1
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
            "images_read": len(planned) - n_ignored_late,
            "images_ok": len(good),  # images and slices
            "errors": len(errors),
            "not_selected": len(not_selected),
            "input": {s: dict(sorted(counts_in[s].items())) for s in SPLITS if s in counts_in},
            "output": {s: dict(sorted(counts_out[s].items())) for s in SPLITS if s in counts_out},
        },
        **hygiene,
        "errors": sorted(errors, key=lambda e: e["path"]),
        "selection": config.select.describe(),
        "not_selected": sorted(({"path": src.uri_of(p), "reason": r} for p, r in not_selected), key=lambda e: e["path"])[:1000],
        "ignored": [src.uri_of(p) for p in ignored[:100]],
        "timing": {**{k: round(v, 3) for k, v in timing.items()}, "wall_s": round(wall, 3), "images_per_s": round(len(planned) / wall, 2)},
    }
    # report.json is written last: its presence says the shards beside it are complete.
    dst.join(REPORT_FILE).write_bytes(json.dumps(report, indent=2).encode())
    logger.info("ingest: wrote %s", dst.join(REPORT_FILE).uri)
    return report


def _decode_and_decide(
    config: IngestConfig, src: Location, planned: list[_Planned], errors: list[dict], ignored: list[str], timing: dict
):
    """Read and preprocess every image once (kept in Ray's object store), then decide splits.

    Adds to ``errors`` and ``ignored``; returns the decoded dataset, the decisions (by key),
    the hygiene report, the good rows and the (path, reason) of files the selector left out.
    """
    import ray

    t = time.perf_counter()
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_blocks = max(2 * n_cpus, math.ceil(len(planned) / config.images_per_block))
    decoded = (
        ray.data.read_binary_files(
            [p.path for p in planned], filesystem=src.pyarrow_fs, include_paths=True, override_num_blocks=n_blocks
        )
        .map_batches(
            preprocess_batch, batch_format="pyarrow", fn_kwargs={"preprocess": config.preprocess, "select": config.select}
        )
        .materialize()
    )
    cols = ["key", "path", "sha256", "phash", "outcome", "error", "series_instance_uid", "slice_index"]
    meta = _to_arrow(decoded.select_columns(cols)).to_pylist()
    timing["decode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    by_path = {p.path: p for p in planned}
    good, not_selected = [], []
    for row in meta:
        p = by_path[row["path"]]
        if row["outcome"] == "error":
            errors.append(_error(p.path, row["error"], p.split, p.label))
        elif row["outcome"] == "not_selected":
            not_selected.append((p.path, row["error"]))
        elif row["outcome"] == "ignored":
            ignored.append(p.path)
        else:
            # The series that keeps slices together in one split: a DICOM series, or a volume.
            series = row["series_instance_uid"] or (row["path"] if row["slice_index"] is not None else None)
            good.append({"path": row["key"], "sha256": row["sha256"], "phash": row["phash"], "label": p.label, "split": p.split, "series": series})
    if not good:
        raise InputError(
            f"none of the {len(planned)} image files under {src.uri} could be used ({len(errors)} errors, "
            f"{len(not_selected)} left out by the series selector): "
            + "; ".join(f"{e['path']}: {e['reason']}" for e in errors[:5])
        )
    decisions, hygiene = assign_splits(
        good, val_fraction=config.val_fraction, seed=config.seed, near_dup_distance=config.near_dup_distance
    )
    timing["dedup_s"] = time.perf_counter() - t
    return decoded, decisions, hygiene, good, not_selected


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


def _uri_of_key(src: Location, key: str) -> str:
    """A key as a person reads it: the file's URI, and ``#slice=N`` for one slice of a volume."""
    path, _, index = key.partition(_SLICE_SEP)
    return src.uri_of(path) + (f"#slice={index}" if index else "")


def _relabel_paths(hygiene: dict, src: Location) -> None:
    for g in hygiene["duplicates"]["group_list"] + hygiene["duplicates"]["label_conflicts"]:
        for m in g["members"]:
            m["path"] = _uri_of_key(src, m["path"])
    d = hygiene["duplicates"]
    d["dropped_from_training"] = [_uri_of_key(src, p) for p in d["dropped_from_training"]]
    for split in hygiene["leakage"].values():
        split["files"] = [_uri_of_key(src, p) for p in split["files"]]


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
        f"errors {c['errors']}, ignored (not images) {c['ignored_files']}"
        + (f", left out by the series selector {c['not_selected']}" if c.get("not_selected") else ""),
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
