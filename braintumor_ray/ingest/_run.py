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
    config.yaml                                      the effective IngestConfig (for --config)
    report.json                                      counts, duplicates, leakage, errors
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..core import (
    CLASS_NAMES,
    CONFIG_FILE,
    Identifiers,
    ImageDecodeError,
    InputError,
    Location,
    StorageError,
    UnreadableInputError,
    canonical_label,
    canonical_split,
    check_disjoint,
    resolve,
    unreadable_reason,
)
from ..imaging import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    NO_GUARD,
    FileResult,
    InputGuard,
    MRIPreprocess,
    SeriesSelector,
    mask_slice_counts,
    phash,
    sha256_hex,
    sniff_kind,
)
from ._config import IngestConfig
from ._report import REPORT_FILE, FileError, IngestCounts, IngestReport
from ._splits import ImageFacts, SplitDecision, assign_splits

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")
MEDICAL_EXTENSIONS = DICOM_SUFFIXES + NIFTI_SUFFIXES
# Inside the job, one slice of a multi-slice file is ``path + _SLICE_SEP + index``: no real
# path holds a NUL, so a key never collides with a file's own path.
_SLICE_SEP = "\x00"
SPLITS = ("train", "val", "test")
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
        # ok, error, not_selected (series selector), ignored (not an image after all), skipped (a
        # volume's slice with no content or no head), unlabelled (its mask marks too little lesion)
        ("outcome", pa.string()),
        ("error", pa.string()),  # the reason, for error, not_selected and skipped
        ("slice_label", pa.string()),  # the slice's label from a segmentation mask (null: the folder's)
    ]
)
_SLICE_NAMES = ("sop_instance_uid", "series_instance_uid", "study_instance_uid", "instance_number", "slice_index")


@dataclass(frozen=True)
class _Planned:
    path: str  # path inside the filesystem
    label: str
    split: str  # train / val / test as published; train for a class-only layout
    source_split: str  # the folder name as published ("" for a class-only layout)
    mask: str | None = None  # the segmentation mask beside a volume (IngestConfig.mask_pattern)
    # A volume or series below a folder of its own under the class folder (a patient's folder:
    # BraTS20_001/, PAT1/STUDY1/...): that folder, which keeps all of a patient's slices in one split.
    patient: str | None = None


@dataclass(frozen=True)
class InputPlan:
    """A listing sorted out: the images to read, the files refused (and why), the files ignored."""

    images: list[_Planned]
    errors: list[FileError]
    ignored: list[str]
    layout: str  # <split>/<class>/<image> or <class>/<image>


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


def plan_inputs(files: list[str], root: str, *, mask_pattern: str | None = None) -> InputPlan:
    """Sort a listing into images to read, errors (path, reason) and ignored files.

    The layout is ``<split>/<class>/<file>`` when any top folder is a split name, else
    ``<class>/<file>``; DICOM and NIfTI files (and extensionless files, which may be DICOM)
    may also sit deeper below their class folder. Files named like ``mask_pattern`` are
    segmentation masks, not images: each volume gets the one mask in its folder.
    """
    masks = _masks_by_folder(files, mask_pattern)
    if masks:
        taken = {m for ms in masks.values() for m in ms}
        files = [f for f in files if f not in taken]
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
        placed = _place(path, parts, kind, has_splits=has_splits)
        if isinstance(placed, FileError):
            errors.append(placed)
            continue
        split, label = placed
        # A NIfTI mask labels NIfTI volumes only (a DICOM series beside it has another grid).
        beside = masks.get(path.rsplit("/", 1)[0], []) if path.lower().endswith(NIFTI_SUFFIXES) else []
        if len(beside) > 1:
            errors.append(
                FileError(
                    path,
                    f"{len(beside)} segmentation masks match {mask_pattern!r} beside this volume: "
                    "keep one per folder (one patient's volumes and their mask)",
                    split,
                    label,
                )
            )
            continue
        patient = root.rstrip("/") + "/" + "/".join(parts[:depth]) if len(parts) > depth else None
        planned.append(
            _Planned(path, label, split, parts[0] if has_splits else "", beside[0] if beside else None, patient)
        )
    return InputPlan(planned, errors, ignored, layout)


def _masks_by_folder(files: list[str], mask_pattern: str | None) -> dict[str, list[str]]:
    """The listed files named like ``mask_pattern`` (case-insensitive), by their folder."""
    masks: dict[str, list[str]] = defaultdict(list)
    if mask_pattern:
        pattern = mask_pattern.lower()
        for f in files:
            if fnmatch.fnmatchcase(f.rsplit("/", 1)[-1].lower(), pattern):
                masks[f.rsplit("/", 1)[0]].append(f)
    return masks


def _place(path: str, parts: list[str], kind: str, *, has_splits: bool) -> tuple[str, str] | FileError:
    """The split and class a file's folders give it (``parts``: its path below the input), or the
    error row naming the folder out of place. An image sits right in its class folder; a DICOM or
    NIfTI file may sit deeper."""
    depth = 3 if has_splits else 2
    layout = "<split>/<class>/<image>" if has_splits else "<class>/<image>"
    if len(parts) < depth or (kind == "image" and len(parts) != depth):
        return FileError(path, f"unexpected location: expected {layout} under the input")
    split = canonical_split(parts[0]) if has_splits else "train"
    if split is None:
        return FileError(path, f"unknown split folder {parts[0]!r}: expected Training, Testing or Validation")
    label = canonical_label(parts[depth - 2])
    if label is None:
        return FileError(
            path,
            f"unknown class folder {parts[depth - 2]!r}: expected one of {', '.join(CLASS_NAMES)} "
            "(or a variant such as glioma_tumor, notumor)",
            split=split,
        )
    return split, label


# What a segmentation mask says of a slice (the decoded rows' slice_label): enough lesion (the
# folder's tumour class), none (no_tumor); a slice in between is UNLABELLED and left out.
LESION, NO_LESION, UNLABELLED = "lesion", "none", "unlabelled"
NO_TUMOR = "no_tumor"


def mask_labels(res: FileResult, mask: bytes, *, guard: InputGuard, min_lesion: float) -> list[str]:
    """Per kept slice of a volume, what its segmentation mask says: ``LESION`` when the mask marks
    at least ``min_lesion`` of the slice's head area (the crop's head fraction of its pixels),
    ``NO_LESION`` when it marks nothing, ``UNLABELLED`` in between. The mask must have the
    volume's grid (same slices, same pixels a slice); raises ImageDecodeError saying why not."""
    shape, counts = mask_slice_counts(mask, guard=guard)
    n = len(res.slices) + len(res.skipped_slices)
    first = res.slices[0].image if res.slices else None
    if shape[2] != n or (first is not None and shape[0] * shape[1] != first.orig_width * first.orig_height):
        raise ImageDecodeError(
            f"its grid {'x'.join(map(str, shape))} is not the volume's ({n} slices"
            + (f" of {first.orig_width}x{first.orig_height}" if first else "")
            + "): "
            "give the mask of this volume, resampled to its grid"
        )
    out = []
    for s in res.slices:
        k = s.info.slice_index or 0
        area = max(s.image.head_fraction, 1e-9) * s.image.orig_width * s.image.orig_height
        marked = int(counts[k])
        out.append(NO_LESION if marked == 0 else LESION if marked >= min_lesion * area else UNLABELLED)
    return out


def preprocess_batch(
    batch: pa.Table,
    *,
    preprocess: MRIPreprocess,
    select: SeriesSelector | None = None,
    guard: InputGuard | None = None,
    source: Location | None = None,
    mask_min_lesion: float = 0.01,
) -> pa.Table:
    """Worker side: bytes -> hashes, preprocessed image, crop box (one row per slice of a DICOM
    or NIfTI file); one row with the reason per bad file or file the selector leaves out, and
    per slice of a volume with no content or no head (``skipped``).

    ``batch`` holds each file's ``bytes``, or only its ``path``: the file is then read here from
    ``source`` (at most guard.max_file_bytes of it), and one that vanished or cannot be read
    since it was listed is an error row, not the end of the job. A ``mask`` column names each
    volume's segmentation mask (read from ``source``), which labels its slices
    (:func:`mask_labels`)."""
    cols: dict[str, list] = {name: [] for name in _DECODED_SCHEMA.names}
    paths = batch.column("path").to_pylist()
    given = batch.column("bytes").to_pylist() if "bytes" in batch.column_names else [None] * len(paths)
    masks = batch.column("mask").to_pylist() if "mask" in batch.column_names else [None] * len(paths)
    guard = guard or NO_GUARD
    for path, data, mask in zip(paths, given, masks):
        unread = None
        if "bytes" not in batch.column_names:
            assert source is not None, "a batch of paths is read from its source"
            try:
                data = source.read_limited(
                    path,
                    guard.max_file_bytes,  # an oversized file is refused by try_slices
                    follow_links_outside=guard.follow_links_outside_input,
                )
            except UnreadableInputError as e:
                unread = e.cause
        data = data or b""
        # Training images are one page a file: a multi-page TIFF, GIF, WebP or APNG is an error row
        # (its label would be copied to every page, or page one taken silently).
        res = (
            preprocess.try_slices(data, name=path, select=select, guard=guard, pages=False)
            if unread is None
            else FileResult(error=unread)
        )
        res, labels = _label_slices(res, mask, source, guard, mask_min_lesion)
        digest = sha256_hex(data) if unread is None else None
        rows = [_skipped_row(path, sk) for sk in res.skipped_slices]
        if not res.slices and not res.skipped_slices:
            rows.append(_file_row(path, res, digest, data if unread is None else None))
        many = len(res.slices) + len(res.skipped_slices) > 1
        rows += [
            _slice_row(path, i, s, label, digest, many, mask_min_lesion)
            for i, (s, label) in enumerate(zip(res.slices, labels))
        ]
        for row in rows:
            for k, v in row.items():
                cols[k].append(v)
    return pa.Table.from_pydict(cols, schema=_DECODED_SCHEMA)


def _label_slices(
    res: FileResult, mask: str | None, source: Location | None, guard: InputGuard, min_lesion: float
) -> tuple[FileResult, Sequence[str | None]]:
    """Each slice's label from the volume's segmentation mask (None: the folder's), or the file
    made an error row when the mask cannot be read."""
    labels: Sequence[str | None] = [None] * len(res.slices)
    if not mask or not (res.slices or res.skipped_slices):
        return res, labels
    assert source is not None, "a mask is read from the batch's source"
    try:
        data = source.read_limited(mask, guard.max_file_bytes)
        return res, mask_labels(res, data, guard=guard, min_lesion=min_lesion)
    except UnreadableInputError as e:
        why = e.cause
    except ImageDecodeError as e:
        why = str(e)
    except Exception as e:  # anything else the mask's decoding raised
        why = unreadable_reason(e)
    name = mask.rsplit("/", 1)[-1]
    return FileResult(error=f"segmentation mask {name}: {why}", info=res.slices[0].info if res.slices else res.info), []


def _skipped_row(path: str, sk: Any) -> dict[str, Any]:
    """A volume's empty or headless slice: left out on its own."""
    row: dict[str, Any] = dict.fromkeys(_DECODED_SCHEMA.names)
    row.update(path=path, key=f"{path}{_SLICE_SEP}{sk.info.slice_index}", outcome="skipped", error=sk.reason)
    row.update({k: getattr(sk.info, k) for k in _SLICE_NAMES})
    return row


def _file_row(path: str, res: FileResult, digest: str | None, data: bytes | None) -> dict[str, Any]:
    """The one row of a file with no slice: left out by the selector, not an image, or an error
    (``data``: its bytes when they were read)."""
    row: dict[str, Any] = dict.fromkeys(_DECODED_SCHEMA.names)
    row.update(path=path, key=path, sha256=digest, error=res.skipped or res.error)
    row.update({k: getattr(res.info, k) for k in _SLICE_NAMES})
    if res.skipped:
        row["outcome"] = "not_selected"
    elif data is not None and file_kind(path.rsplit("/", 1)[-1]) == "maybe" and sniff_kind(data, path) == "image":
        row["outcome"] = "ignored"  # an extensionless file that is neither DICOM nor an image: a README
    else:
        row["outcome"] = "error"
    return row


def _slice_row(
    path: str, i: int, s: Any, label: str | None, digest: str | None, many: bool, mask_min_lesion: float
) -> dict[str, Any]:
    """One preprocessed slice (or the file's one image)."""
    out = s.image
    row: dict[str, Any] = dict.fromkeys(_DECODED_SCHEMA.names)
    index = i if s.info.slice_index is None else s.info.slice_index
    # The slices of one volume share a file: their hash is of their own pixels, so that
    # exact-duplicate grouping sees slices (blank ones are all one), not the file.
    row.update(path=path, key=f"{path}{_SLICE_SEP}{index}" if many else path)
    row.update(
        outcome="unlabelled" if label == UNLABELLED else "ok", slice_label=None if label == UNLABELLED else label
    )
    if label == UNLABELLED:
        row["error"] = f"the segmentation mask marks some lesion on this slice, under {mask_min_lesion:g} of its head"
    row["sha256"] = sha256_hex(out.pixels.tobytes()) if many else digest
    row.update({k: getattr(s.info, k) for k in _SLICE_NAMES})
    x0, y0, x1, y1 = out.crop_box
    row.update(
        phash=f"{phash(out.pixels):016x}",
        image=out.pixels.tobytes(),
        image_height=out.pixels.shape[0],
        image_width=out.pixels.shape[1],
        orig_width=out.orig_width,
        orig_height=out.orig_height,
        orig_mode=out.orig_mode,
        crop_x0=x0,
        crop_y0=y0,
        crop_x1=x1,
        crop_y1=y1,
        cropped=out.cropped,
    )
    return row


def add_decisions(
    batch: pa.Table, *, decisions: dict[str, SplitDecision], planned: dict[str, dict], ids: Identifiers | None = None
) -> pa.Table:
    """Join the driver's decisions (by key: path, or path and slice) onto the workers' rows;
    rows without one (errors, dropped duplicates, files left out) are left out. ``ids``: how the
    UIDs are written (the ``uri`` of ``planned`` is already the path as written)."""
    keys = batch.column("key").to_pylist()
    keep = [k in decisions for k in keys]
    batch = batch.filter(pa.array(keep, pa.bool_()))
    paths = batch.column("path").to_pylist()
    d = [decisions[k] for k, kept in zip(keys, keep) if kept]
    marks = batch.column("slice_label").to_pylist()
    batch = batch.drop_columns(["error", "key", "outcome", "slice_label"])
    pl = [planned[p] for p in paths]
    labels = [NO_TUMOR if m == NO_LESION else x["label"] for x, m in zip(pl, marks)]
    cols = {
        "label": pa.array(labels, pa.string()),
        "label_index": pa.array([CLASS_NAMES.index(x) for x in labels], pa.int8()),
        "split": pa.array([x.split for x in d], pa.string()),
        "source_split": pa.array([x["source_split"] for x in pl], pa.string()),
        "group_id": pa.array([x.group_id for x in d], pa.string()),
        "group_size": pa.array([x.group_size for x in d], pa.int32()),
        "leaked": pa.array([x.leak is not None for x in d], pa.bool_()),
        "leak": pa.array([x.leak for x in d], pa.string()),
    }
    for name, arr in cols.items():
        batch = batch.append_column(name, arr)
    if ids is not None and ids.uid_mode != "full":  # after the split: it grouped series by their real UIDs
        for k in ("sop_instance_uid", "series_instance_uid", "study_instance_uid"):
            i = batch.schema.get_field_index(k)
            batch = batch.set_column(i, k, pa.array([ids.uid(u) for u in batch.column(k).to_pylist()], pa.string()))
    # Users see URIs (as path_mode names them); the filesystem path was only the join key.
    uris = pa.array([x["uri"] for x in pl], pa.string())
    return batch.set_column(batch.schema.get_field_index("path"), "path", uris)


def run_ingest(config: IngestConfig) -> dict:
    """Run the ingest on the connected Ray cluster (a local one is started if none is).

    Returns the report (an :class:`IngestReport`) in its JSON form, as written to report.json.
    """
    import ray

    t0 = time.perf_counter()
    src = resolve(config.input, s3_endpoint_url=config.s3_endpoint_url)
    dst = resolve(config.output, s3_endpoint_url=config.s3_endpoint_url)
    # Before anything is listed or deleted: --overwrite of an output that holds the input
    # would remove the input with it.
    check_disjoint(src, dst)
    ids = Identifiers.from_env(config.path_mode, config.uid_mode, root=src.uri)  # no key: fails before any work
    _clear_output(dst, overwrite=config.overwrite)
    files, plan = _list_inputs(src, config)
    logger.info(
        "ingest: %d images to read from %s (%s), %d listing errors",
        len(plan.images),
        src.uri,
        plan.layout,
        len(plan.errors),
    )

    if not ray.is_initialized():
        ray.init()
    timing: dict[str, float] = {"list_s": time.perf_counter() - t0}
    with _no_reservation():
        decoded = _decode(config, src, plan.images)
        timing["decode_s"] = decoded.seconds
        errors = plan.errors + decoded.errors
        if not decoded.images:
            raise _nothing_usable(src, ids, plan, decoded, errors)
        t = time.perf_counter()
        splits = assign_splits(
            decoded.images,
            val_fraction=config.val_fraction,
            seed=config.seed,
            near_dup_distance=config.near_dup_distance,
        )
        timing["dedup_s"] = time.perf_counter() - t
        # The effective settings (`jobs/preprocess.py --config` takes them back), before the first
        # shard: an output cut off while writing is then still recognisably an ingest's, which
        # --overwrite replaces (and nothing else).
        config.save_yaml(dst.join(CONFIG_FILE))
        _write_shards(decoded.dataset, src, dst, plan.images, splits.decisions, timing, ids)
    return _finish(config, src, dst, ids, files, plan, decoded, splits, errors, timing, t0)


def _clear_output(dst: Location, *, overwrite: bool) -> None:
    """An output that is not empty is refused, or with ``--overwrite`` removed when it is an
    earlier ingest's (:func:`_check_replaceable`)."""
    if dst.is_empty():
        return
    if not overwrite:
        raise StorageError(f"output {dst.uri} is not empty: choose a new output, or pass --overwrite to replace it")
    _check_replaceable(dst)
    dst.remove()


def _nothing_usable(
    src: Location, ids: Identifiers, plan: InputPlan, decoded: _Decoded, errors: list[FileError]
) -> InputError:
    """The error of an input none of whose files could be used, with the first five reasons (paths
    as the identifier settings show them)."""
    return InputError(
        f"none of the {len(plan.images)} image files under {src.uri} could be used ({len(errors)} errors, "
        f"{len(decoded.not_selected)} left out by the series selector): "
        + "; ".join(f"{ids.path(src.uri_of(e.path))}: {ids.scrub(e.reason, src.uri_of(e.path))}" for e in errors[:5])
    )


def _finish(
    config: IngestConfig,
    src: Location,
    dst: Location,
    ids: Identifiers,
    files: list,
    plan: InputPlan,
    decoded: _Decoded,
    splits: Any,
    errors: list[FileError],
    timing: dict[str, float],
    t0: float,
) -> dict:
    """After the shards: errors.parquet, then report.json, last (its presence says the shards
    beside it are complete); the report's JSON form."""
    # Paths are renamed here, after grouping and splitting, which used the real ones.
    errors = [
        dataclasses.replace(e, path=ids.path(src.uri_of(e.path)), reason=ids.scrub(e.reason, src.uri_of(e.path)))
        for e in errors
    ]
    _write_errors(dst.join(ERRORS_FILE), errors)
    report = _report(config, src, dst, ids, files, plan, decoded, splits, errors, timing, time.perf_counter() - t0)
    if report.val_missing_classes:
        logger.warning(
            "ingest: no validation images for %s (one training group or series each)",
            ", ".join(report.val_missing_classes),
        )
    out = report.to_dict()
    dst.join(REPORT_FILE).write_bytes(json.dumps(out, indent=2).encode())
    logger.info("ingest: wrote %s", dst.join(REPORT_FILE).uri)
    return out


@contextlib.contextmanager
def _no_reservation() -> Iterator[None]:
    """Ray Data's per-operator resource reservation off, for the ingest's stages only."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    # Each stage here is a single fused read+map operator; Ray Data's per-operator reservation
    # then holds back half the CPUs (on 2 CPUs only one task ran at a time, measured).
    ctx.op_resource_reservation_enabled = False
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


def _list_inputs(src: Location, config: IngestConfig) -> tuple[list, Any]:
    """(every file listed, the plan: images with their split and class, errors, ignored files)."""
    listed = src.listing(
        follow_links_outside=config.guard.follow_links_outside_input, max_depth=config.max_folder_depth
    )
    files = list(listed.files)
    plan = plan_inputs(files, src.path, mask_pattern=config.mask_pattern)
    if listed.refused:  # links leaving the input, dangling links, FIFOs: error rows, never read
        refused = [p for p in plan.images if p.path in listed.refused]
        plan = dataclasses.replace(
            plan,
            images=[p for p in plan.images if p.path not in listed.refused],
            errors=plan.errors + [FileError(p.path, listed.refused[p.path], p.split, p.label) for p in refused],
        )
    if not plan.images:
        raise InputError(
            f"no usable image files under {src.uri} ({len(files)} files found, {len(plan.errors)} in unexpected "
            f"places, {len(plan.ignored)} not images). Expected {plan.layout} with class folders such as glioma_tumor, "
            "no_tumor; image extensions "
            + ", ".join(IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS)
            + " or DICOM files without one"
        )
    return files, plan


def _report(
    config: IngestConfig,
    src: Location,
    dst: Location,
    ids: Identifiers,
    files: list,
    plan: Any,
    decoded: Any,
    splits: Any,
    errors: list,
    timing: dict[str, float],
    wall: float,
) -> IngestReport:
    """``report.json``, every path in it shown as the identifier settings say."""
    name = lambda key: _uri_of_key(src, key, ids)  # noqa: E731
    return IngestReport(
        input=src.uri,
        output=dst.uri,
        images=dst.join(IMAGES_DIR).uri,
        layout=plan.layout,
        class_names=list(CLASS_NAMES),
        preprocess=config.preprocess.to_dict(),
        image_format="raw uint8 greyscale, row-major, image_height x image_width",
        val_fraction=config.val_fraction,
        seed=config.seed,
        val_missing_classes=splits.val_missing_classes,
        counts=_counts(files, plan, decoded, splits.decisions),
        duplicates=splits.duplicates.with_paths(name),
        leakage={split: lk.with_paths(name) for split, lk in splits.leakage.items()},
        errors=sorted(errors, key=lambda e: e.path),
        selection=config.select.describe(),
        not_selected=sorted(
            ({"path": ids.path(src.uri_of(p)), "reason": ids.scrub(r, src.uri_of(p))} for p, r in decoded.not_selected),
            key=lambda e: e["path"],
        )[:1000],
        ignored=[ids.path(src.uri_of(p)) for p in (plan.ignored + decoded.ignored)[:100]],
        timing={
            **{k: round(v, 3) for k, v in timing.items()},
            "wall_s": round(wall, 3),
            "images_per_s": round(len(plan.images) / wall, 2),
        },
        identifiers=ids.describe(),
    )


def _check_replaceable(dst: Location) -> None:
    """``--overwrite`` replaces an earlier ingest's output, nothing else: every file under ``dst``
    must be one the ingest writes, and its config.yaml or report.json must be there. Anything
    else is refused, naming the first file not recognised."""
    files = dst.files()
    rel = [f[len(dst.path) :].lstrip("/") for f in files]
    for f, r in zip(files, rel):
        top = r.split("/", 1)[0]
        if not (r in (ERRORS_FILE, CONFIG_FILE, REPORT_FILE) or (top == IMAGES_DIR and r.endswith(".parquet"))):
            raise StorageError(
                f"--overwrite: output {dst.uri} is not an earlier ingest output ({dst.uri_of(f)} is not a file the "
                "ingest writes), so it is not replaced. Choose a new output, or delete that folder yourself."
            )
    if not {CONFIG_FILE, REPORT_FILE} & set(rel):
        raise StorageError(
            f"--overwrite: output {dst.uri} holds neither {CONFIG_FILE} nor {REPORT_FILE}, so it is not recognisably an "
            "earlier ingest output and is not replaced. Choose a new output, or delete that folder yourself."
        )


def _counts(files: list[str], plan: InputPlan, decoded: _Decoded, decisions: dict[str, SplitDecision]) -> IngestCounts:
    counts_in: dict[str, Counter] = defaultdict(Counter)
    for p in plan.images:
        counts_in[p.split][p.label] += 1
    label_of = {m.key: m.label for m in decoded.images}
    counts_out: dict[str, Counter] = defaultdict(Counter)
    for key, d in decisions.items():
        counts_out[d.split][label_of[key]] += 1
    return IngestCounts(
        files_listed=len(files),
        ignored_files=len(plan.ignored) + len(decoded.ignored),
        images_read=len(plan.images) - len(decoded.ignored),
        images_ok=len(decoded.images),
        errors=len(plan.errors) + len(decoded.errors),
        not_selected=len(decoded.not_selected),
        slices_skipped=decoded.slices_left_out.get("no_content_or_head", 0),
        slices_unlabelled=decoded.slices_left_out.get("mask_unlabelled", 0),
        input={s: dict(sorted(counts_in[s].items())) for s in SPLITS if s in counts_in},
        output={s: dict(sorted(counts_out[s].items())) for s in SPLITS if s in counts_out},
    )


@dataclass(frozen=True)
class _Decoded:
    """Every planned file read and preprocessed once (the rows kept in Ray's object store)."""

    dataset: Any  # the materialised ray.data.Dataset of preprocess_batch rows
    images: list[ImageFacts]  # the usable images and slices, by key
    errors: list[FileError]  # files that could not be decoded
    not_selected: list[tuple[str, str]]  # (path, reason) of files the series selector left out
    ignored: list[str]  # extensionless files that turned out to be neither DICOM nor an image
    seconds: float
    slices_left_out: dict[str, int] = dataclasses.field(default_factory=dict)  # why -> slices of volumes left out


def _decode(config: IngestConfig, src: Location, planned: list[_Planned]) -> _Decoded:
    """Read and preprocess every planned file in Ray Data; sort the outcomes on the driver."""
    import ray

    t = time.perf_counter()
    n_cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    n_blocks = max(2 * n_cpus, math.ceil(len(planned) / config.images_per_block))
    dataset = (
        # The tasks read the files themselves: one that vanished or cannot be read is an error row.
        ray.data.from_items(
            [{"path": p.path, "mask": p.mask or ""} for p in planned], override_num_blocks=min(n_blocks, len(planned))
        )
        .map_batches(
            preprocess_batch,
            batch_format="pyarrow",
            fn_kwargs={
                "preprocess": config.preprocess,
                "select": config.select,
                "guard": config.guard,
                "source": src,
                "mask_min_lesion": config.mask_min_lesion,
            },
        )
        .materialize()
    )
    cols = ["key", "path", "sha256", "phash", "outcome", "error", "series_instance_uid", "slice_index", "slice_label"]
    rows = _to_arrow(dataset.select_columns(cols)).to_pylist()
    by_path = {p.path: p for p in planned}
    images, errors, not_selected, ignored = [], [], [], []
    left_out: Counter = Counter()
    for row in rows:
        p = by_path[row["path"]]
        if row["outcome"] in ("skipped", "unlabelled") or (row["slice_label"] == LESION and p.label == NO_TUMOR):
            # A volume's empty or headless slice, one its mask cannot label, or lesion in a no_tumor folder.
            left_out["no_content_or_head" if row["outcome"] == "skipped" else "mask_unlabelled"] += 1
        elif row["outcome"] == "error":
            errors.append(FileError(p.path, row["error"], p.split, p.label))
        elif row["outcome"] == "not_selected":
            not_selected.append((p.path, row["error"]))
        elif row["outcome"] == "ignored":
            ignored.append(p.path)
        else:
            # The series that keeps slices together in one split: a DICOM series, or a volume.
            # A patient's folder, when the file has one, keeps all of the patient's volumes and series together.
            series = row["series_instance_uid"] or (row["path"] if row["slice_index"] is not None else None)
            series = p.patient if series and p.patient else series
            label = NO_TUMOR if row["slice_label"] == NO_LESION else p.label
            images.append(ImageFacts(row["key"], row["sha256"], row["phash"], label, p.split, series))
    return _Decoded(dataset, images, errors, not_selected, ignored, time.perf_counter() - t, dict(left_out))


def _write_shards(
    decoded,
    src: Location,
    dst: Location,
    planned: list[_Planned],
    decisions: dict[str, SplitDecision],
    timing: dict,
    ids: Identifiers,
) -> None:
    t = time.perf_counter()
    extra = {
        p.path: {"label": p.label, "source_split": p.source_split, "uri": ids.path(src.uri_of(p.path))} for p in planned
    }
    # One pass: join the decisions, write one folder per split (hive style: images/split=train/).
    decoded.map_batches(
        add_decisions, batch_format="pyarrow", fn_kwargs={"decisions": decisions, "planned": extra, "ids": ids}
    ).write_parquet(dst.join(IMAGES_DIR).path, filesystem=dst.pyarrow_fs, partition_cols=["split"])
    timing["write_s"] = time.perf_counter() - t


def _to_arrow(ds) -> pa.Table:
    import ray

    return pa.concat_tables(ray.get(ds.to_arrow_refs()))


def _uri_of_key(src: Location, key: str, ids: Identifiers | None = None) -> str:
    """A key as a person reads it: the file's URI (as ``ids`` names it), and ``#slice=N`` for one slice of a volume."""
    path, _, index = key.partition(_SLICE_SEP)
    uri = src.uri_of(path)
    return (ids.path(uri) if ids else uri) + (f"#slice={index}" if index else "")


def _write_errors(loc: Location, errors: list[FileError]) -> None:
    schema = pa.schema([("path", pa.string()), ("reason", pa.string()), ("split", pa.string()), ("label", pa.string())])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist([dataclasses.asdict(e) for e in errors], schema=schema), buf)
    loc.write_bytes(buf.getvalue().to_pybytes())
