"""The ingest's report: typed records, serialised to ``report.json`` (written last, so its
presence says the shards beside it are complete), and the summary a person reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core import CLASS_NAMES
from ._splits import DuplicateReport, LeakageReport

REPORT_FILE = "report.json"


@dataclass(frozen=True)
class FileError:
    """A file that could not be used (a row of errors.parquet): where, why, and what its folder said."""

    path: str
    reason: str
    split: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class IngestCounts:
    files_listed: int
    ignored_files: int
    images_read: int
    images_ok: int  # images and slices
    errors: int
    not_selected: int
    input: dict[str, dict[str, int]]  # split -> label -> files, as published
    output: dict[str, dict[str, int]]  # split -> label -> rows written
    # Slices of volumes left out one by one: no content or no head (a volume's empty ends), and
    # slices whose segmentation mask marks some lesion but under IngestConfig.mask_min_lesion.
    slices_skipped: int = 0
    slices_unlabelled: int = 0


@dataclass(frozen=True)
class IngestReport:
    """Everything ``report.json`` holds, in its key order (``to_dict`` is its JSON form)."""

    input: str
    output: str
    images: str
    layout: str
    class_names: list[str]
    preprocess: dict[str, Any]
    image_format: str
    val_fraction: float
    seed: int
    # Classes with training images but no validation image (one duplicate group or series:
    # it stays in training); empty when val_fraction is 0.
    val_missing_classes: list[str]
    counts: IngestCounts
    duplicates: DuplicateReport
    leakage: dict[str, LeakageReport]
    errors: list[FileError]  # sorted by path
    selection: str
    not_selected: list[dict[str, str]]  # path, reason; the first 1000
    ignored: list[str]  # the first 100
    timing: dict[str, float]
    # How paths and UIDs are named (path_mode, uid_mode, key_id): outputs with one key id join.
    identifiers: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def format_summary(report: IngestReport | dict) -> str:
    """One screen for a person: what was read, kept, dropped, leaked and refused."""
    if isinstance(report, IngestReport):
        report = report.to_dict()
    c = report["counts"]
    lines = [
        f"ingest {report['input']} -> {report['output']}",
        f"  files listed {c['files_listed']}, images read {c['images_read']}, ok {c['images_ok']}, "
        f"errors {c['errors']}, ignored (not images) {c['ignored_files']}"
        + (f", left out by the series selector {c['not_selected']}" if c.get("not_selected") else ""),
    ]
    if c.get("slices_skipped") or c.get("slices_unlabelled"):
        lines.append(
            f"  slices of volumes left out: {c.get('slices_skipped', 0)} with no content or no head, "
            f"{c.get('slices_unlabelled', 0)} whose mask marks too little lesion to label"
        )
    lines += [f"  {'split':<6}" + "".join(f"{n:>12}" for n in CLASS_NAMES) + f"{'total':>8}"]
    for split, labels in report["counts"]["output"].items():
        lines.append(
            f"  {split:<6}" + "".join(f"{labels.get(n, 0):>12}" for n in CLASS_NAMES) + f"{sum(labels.values()):>8}"
        )
    missing = report.get("val_missing_classes") or []
    if missing:
        lines.append(
            f"  no validation images for {', '.join(missing)}: one training image (or duplicate group, or "
            "series) each, kept for training; add images to validate them"
        )
    d = report["duplicates"]
    lines.append(
        f"  duplicate groups {d['groups']} (exact {d['exact_groups']}, near {d['near_groups']}, pHash <= "
        f"{d['near_dup_distance']} bits); dropped from training {len(d['dropped_from_training'])}; "
        f"label conflicts {len(d['label_conflicts'])}"
    )
    for split, lk in report["leakage"].items():
        per = ", ".join(f"{lab} {v.get('leaked', 0)}/{v.get('total', 0)}" for lab, v in lk["per_label"].items())
        lines.append(
            f"  {split}: {lk['leaked']}/{lk['total']} have a twin in training (exact {lk['exact']}, near {lk['near']}): {per}"
        )
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
