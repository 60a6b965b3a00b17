"""The ingest's split decisions, as pure functions (no Ray, no storage): group duplicates, keep
one training image per group, carve a grouped and stratified validation split, flag evaluation
images that have a twin in the training data.

    result = assign_splits(images, val_fraction=0.15, seed=0, near_dup_distance=2)
    result.decisions["path/to/x.jpg"]   # SplitDecision(split="val", group_id=..., group_size=1, leak=None)

Each step is its own function (:func:`group_images`, :func:`keep_one_per_group`,
:func:`carve_validation`, :func:`flag_leaks`) so that each can be tested on a table of cases.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..imaging import group_duplicates

TRAIN = "train"
VAL = "val"


@dataclass(frozen=True)
class ImageFacts:
    """What the split decisions need to know of one image (or one slice of a volume)."""

    key: str  # unique: the file's path, or path + NUL + slice index for one slice of many
    sha256: str
    phash: str  # 64-bit perceptual hash, 16 hex digits
    label: str
    split: str  # as published: train (also for a class-only layout), val or test
    series: str | None = None  # a DICOM series or a volume: its kept slices share one split


@dataclass(frozen=True)
class SplitDecision:
    """Where one kept image goes, and what the shards record about its duplicates."""

    split: str  # train, val or test
    group_id: str  # the smallest sha256 in its duplicate group (16 hex digits)
    group_size: int  # images in the group, every split counted
    leak: str | None = None  # exact / near: an evaluation image whose twin is in the training data


@dataclass(frozen=True)
class Grouping:
    """Duplicate groups over a list of images (exact: same sha256; near: pHash within a distance)."""

    group_of: list[int]  # per image, its group
    members: dict[int, list[int]]  # group -> its images (indices, in input order)
    group_id: dict[int, str]  # group -> a stable, human-checkable id: the smallest sha256 in it


@dataclass(frozen=True, order=True)
class TrainGroup:
    """A duplicate group's one kept training image (ordered by id, as the carve sorts them)."""

    group_id: str
    index: int  # the kept image, an index into the images
    size: int  # images in the group


@dataclass(frozen=True)
class GroupMember:
    path: str
    split: str
    label: str


@dataclass(frozen=True)
class DuplicateGroup:
    group_id: str
    kind: str  # exact (one sha256) or near
    members: list[GroupMember]


@dataclass(frozen=True)
class LabelConflict:
    """The same picture filed under two classes (in any split): worth a person's look."""

    group_id: str
    members: list[GroupMember]


@dataclass(frozen=True)
class DuplicateReport:
    """The ``duplicates`` part of report.json."""

    near_dup_distance: int
    groups: int
    exact_groups: int
    near_groups: int
    images_in_groups: int
    dropped_from_training: list[str]
    label_conflicts: list[LabelConflict]
    group_list: list[DuplicateGroup]

    def with_paths(self, name: Callable[[str], str]) -> DuplicateReport:
        """The same report with every path (a key) renamed, e.g. to the URI a person reads."""
        rename = lambda ms: [dataclasses.replace(m, path=name(m.path)) for m in ms]  # noqa: E731
        return dataclasses.replace(
            self,
            dropped_from_training=[name(p) for p in self.dropped_from_training],
            label_conflicts=[dataclasses.replace(c, members=rename(c.members)) for c in self.label_conflicts],
            group_list=[dataclasses.replace(g, members=rename(g.members)) for g in self.group_list],
        )


@dataclass(frozen=True)
class LeakageReport:
    """One evaluation split's part of ``leakage`` in report.json."""

    total: int
    leaked: int
    exact: int
    near: int
    per_label: dict[str, dict[str, int]]  # label -> total, leaked, exact, near (those present)
    files: list[str]

    def with_paths(self, name: Callable[[str], str]) -> LeakageReport:
        return dataclasses.replace(self, files=[name(p) for p in self.files])


@dataclass(frozen=True)
class SplitResult:
    decisions: dict[str, SplitDecision]  # by key, for every kept image
    duplicates: DuplicateReport
    leakage: dict[str, LeakageReport] = field(default_factory=dict)  # by evaluation split
    val_missing_classes: list[str] = field(default_factory=list)  # trained on, yet no validation image


def assign_splits(images: list[ImageFacts], *, val_fraction: float, seed: int, near_dup_distance: int) -> SplitResult:
    """Group duplicates, keep one training image per group, carve the validation split, flag leaks.

    Kept training images of one series go to the same split, so no scan has slices on both
    sides. Every kept image gets a decision; dropped duplicates and conflicting groups get none.
    """
    grouping = group_images(images, near_dup_distance=near_dup_distance)
    kept, dropped, conflicts = keep_one_per_group(images, grouping)
    decisions, missing = carve_validation(images, kept, val_fraction=val_fraction, seed=seed)
    eval_decisions = flag_leaks(images, grouping)
    return SplitResult(
        decisions=decisions | eval_decisions,
        duplicates=duplicate_report(
            images, grouping, dropped=dropped, conflicts=conflicts, near_dup_distance=near_dup_distance
        ),
        leakage=leakage_report(images, eval_decisions),
        val_missing_classes=missing,
    )


def group_images(images: list[ImageFacts], *, near_dup_distance: int) -> Grouping:
    """Exact duplicates (sha256) and near duplicates (pHash Hamming distance <= the given bits;
    -1: none) in one group each; every other image is a group of one."""
    groups = group_duplicates(
        [m.sha256 for m in images], [int(m.phash, 16) for m in images], max_distance=near_dup_distance
    )
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    gid = {g: min(images[i].sha256 for i in idx)[:16] for g, idx in members.items()}
    return Grouping(group_of=[int(g) for g in groups], members=dict(members), group_id=gid)


def keep_one_per_group(
    images: list[ImageFacts], grouping: Grouping
) -> tuple[dict[str, list[TrainGroup]], list[str], list[LabelConflict]]:
    """Per label, the groups that keep one training image (the first path in sort order); the
    keys of training images dropped (the other copies, and every copy of a group whose
    training copies disagree on the label); the groups whose copies disagree on the label."""
    kept: dict[str, list[TrainGroup]] = defaultdict(list)
    dropped: list[str] = []
    conflicts: list[LabelConflict] = []
    for g, idx in grouping.members.items():
        if len({images[i].label for i in idx}) > 1:
            conflicts.append(LabelConflict(grouping.group_id[g], _members(images, idx)))
        train_idx = sorted((i for i in idx if images[i].split == TRAIN), key=lambda i: images[i].key)
        if not train_idx:
            continue
        if len({images[i].label for i in train_idx}) > 1:
            # Within training neither label can be trusted: the group is left out.
            dropped.extend(images[i].key for i in train_idx)
            continue
        keep = train_idx[0]
        dropped.extend(images[i].key for i in train_idx[1:])
        kept[images[keep].label].append(TrainGroup(grouping.group_id[g], keep, len(idx)))
    return dict(kept), dropped, conflicts


def val_count(units: int, val_fraction: float) -> int:
    """How many of a class's ``units`` (groups, or series) go to validation: the share rounded
    half up, but at least one when the class has two or more (a small class is still validated)
    and never all of them (the class keeps a training image). None at ``val_fraction`` 0."""
    if val_fraction <= 0 or units < 2:
        return 0
    return min(units - 1, max(1, math.floor(val_fraction * units + 0.5)))


def split_units(images: list[ImageFacts], groups: list[TrainGroup]) -> list[list[TrainGroup]]:
    """The unit of the validation carve: a duplicate group, or all groups whose kept image
    shares a series; sorted, so that the seed alone decides the carve."""
    by_series: dict[object, list[TrainGroup]] = defaultdict(list)
    for g in sorted(groups):
        by_series[images[g.index].series or ("group", g.group_id)].append(g)
    return sorted(by_series.values())


def carve_validation(
    images: list[ImageFacts], kept: dict[str, list[TrainGroup]], *, val_fraction: float, seed: int
) -> tuple[dict[str, SplitDecision], list[str]]:
    """Decisions (train or val) for the kept training images, stratified by label, whole units at
    a time; and the labels that have training images but could not get a validation one (a
    single unit), when ``val_fraction`` asks for a validation split."""
    rng = np.random.default_rng(seed)
    decisions: dict[str, SplitDecision] = {}
    missing: list[str] = []
    # A unit is whole across labels: a volume labelled per slice by its mask (tumour slices and
    # no_tumor slices of one patient) goes to one split, stratified under its most common label.
    by_label: dict[str, list[list[TrainGroup]]] = defaultdict(list)
    for unit in split_units(images, [g for label in sorted(kept) for g in kept[label]]):
        count = Counter(images[g.index].label for g in unit)
        by_label[min(count, key=lambda lab: (-count[lab], lab))].append(unit)
    for label in sorted(set(kept) | set(by_label)):
        units = sorted(by_label.get(label, []))
        order = rng.permutation(len(units))  # drawn for every label, so each carve keeps its seed's draw
        n_val = val_count(len(units), val_fraction)
        if val_fraction > 0 and n_val == 0:
            missing.append(label)
        for rank, k in enumerate(order):
            for g in units[k]:
                decisions[images[g.index].key] = SplitDecision(VAL if rank < n_val else TRAIN, g.group_id, g.size)
    return decisions, missing


def flag_leaks(images: list[ImageFacts], grouping: Grouping) -> dict[str, SplitDecision]:
    """Decisions for the published evaluation images: their split kept whole, each flagged
    ``exact`` (its sha256 is in training) or ``near`` (its group has a training image) or not."""
    train_sha = {m.sha256 for m in images if m.split == TRAIN}
    groups_with_train = {grouping.group_of[i] for i, m in enumerate(images) if m.split == TRAIN}
    out: dict[str, SplitDecision] = {}
    for i, m in enumerate(images):
        if m.split == TRAIN:
            continue
        g = grouping.group_of[i]
        leak = "exact" if m.sha256 in train_sha else ("near" if g in groups_with_train else None)
        out[m.key] = SplitDecision(m.split, grouping.group_id[g], len(grouping.members[g]), leak)
    return out


def duplicate_report(
    images: list[ImageFacts],
    grouping: Grouping,
    *,
    dropped: list[str],
    conflicts: list[LabelConflict],
    near_dup_distance: int,
) -> DuplicateReport:
    gid = grouping.group_id
    groups = [
        DuplicateGroup(gid[g], "exact" if len({images[i].sha256 for i in idx}) == 1 else "near", _members(images, idx))
        for g, idx in sorted(grouping.members.items(), key=lambda kv: gid[kv[0]])
        if len(idx) > 1
    ]
    return DuplicateReport(
        near_dup_distance=near_dup_distance,
        groups=len(groups),
        exact_groups=sum(g.kind == "exact" for g in groups),
        near_groups=sum(g.kind == "near" for g in groups),
        images_in_groups=sum(len(g.members) for g in groups),
        dropped_from_training=sorted(dropped),
        label_conflicts=conflicts,
        group_list=groups,
    )


def leakage_report(images: list[ImageFacts], eval_decisions: dict[str, SplitDecision]) -> dict[str, LeakageReport]:
    """Per evaluation split: how many images have a twin in training, in all and per label."""
    per_label: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    files: dict[str, list[str]] = defaultdict(list)
    for m in images:
        if m.split == TRAIN:
            continue
        c = per_label[m.split][m.label]
        c["total"] += 1
        leak = eval_decisions[m.key].leak
        if leak:
            c[leak] += 1
            c["leaked"] += 1
            files[m.split].append(m.key)
    return {
        split: LeakageReport(
            total=sum(c["total"] for c in labels.values()),
            leaked=sum(c["leaked"] for c in labels.values()),
            exact=sum(c["exact"] for c in labels.values()),
            near=sum(c["near"] for c in labels.values()),
            per_label={lab: dict(sorted(c.items())) for lab, c in sorted(labels.items())},
            files=sorted(files[split]),
        )
        for split, labels in sorted(per_label.items())
    }


def _members(images: list[ImageFacts], idx: list[int]) -> list[GroupMember]:
    return [
        GroupMember(images[i].key, images[i].split, images[i].label) for i in sorted(idx, key=lambda i: images[i].key)
    ]
