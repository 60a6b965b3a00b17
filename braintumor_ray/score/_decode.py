"""Decode tasks (CPU, Ray Data): the plan's files -> sha256 and the preprocessed image of each slice.

They read their own files, held to the listed version; a file that killed its task twice is an
error row (:class:`_Attempts`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import uuid

import pyarrow as pa

from ..core import Location, UnreadableInputError, posix_basename, remove_child
from ..imaging import NO_GUARD, FileResult, InputGuard, MRIPreprocess, SeriesSelector, SliceInfo, sha256_hex
from ._layout import _SLICE_NAMES, SLICE_FIELDS, UNCHANGED, _output_of

logger = logging.getLogger(__name__)

KILLED_TWICE = (
    "killed its decode task twice (out of memory? a crash in a decoder?): not decoded again so that the "
    "run can finish; a changed file is tried again"
)

# Tests only: a decode task that meets a file of this name dies as the OOM killer would kill it.
KILL_DECODE_ENV = "BRAINTUMOR_TEST_KILL_DECODE"


_DECODED = pa.schema(
    [
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("pixels", pa.binary()),
        ("side", pa.int32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("head_fraction", pa.float32()),
        *SLICE_FIELDS,
        ("crop_box", pa.list_(pa.int32())),
    ]  # x0, y0, x1, y1 in the original: heat-map peaks map back through it
)


def decode_batch(
    batch: pa.Table,
    *,
    preprocess: MRIPreprocess,
    already: frozenset = frozenset(),
    select: SeriesSelector | None = None,
    guard: InputGuard | None = None,
    source: Location | None = None,
    attempts: Location | None = None,
) -> pa.Table:
    """CPU side: file bytes -> sha256 and the preprocessed image of each slice, or the reason
    the file has none (one row then: an error, or ``skipped`` by the series selector); a
    volume's slice with no content or no head is a ``skipped`` row of its own.

    ``batch`` holds each file's ``bytes``, or its listed ``path``, ``size``, ``version`` (and
    ``refused``, the listing's reason to refuse it): the file is then read here from ``source``,
    and a file that vanished, cannot be read, is over the guard's size limit or was refused
    is an error row of its own. ``attempts``: where the markers of decode attempts live
    (:class:`_Attempts`), so that a file that killed its task twice is not decoded again.

    Files whose (path, sha256) is in ``already`` were rewritten with the same content (a new
    mtime or ETag only): they are dropped here, not scored twice.
    """
    rows = _DecodedRows()
    for path, data, error in _read_files(batch, source, guard or NO_GUARD, attempts):
        if error is not None:
            rows.add(path, None, None, None, "error", error, None, SliceInfo())
            continue
        data = data or b""
        digest = sha256_hex(data)
        if (path, digest) in already:  # its new version is recorded by the commit, nothing scored
            rows.add(path, digest, None, None, UNCHANGED, None, None, SliceInfo())
            continue
        rows.add_slices(path, digest, preprocess.try_slices(data, name=path, select=select, guard=guard))
    return rows.table()


class _DecodedRows:
    """A decode task's output columns (:data:`_DECODED`), filled a row at a time."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {n: [] for n in _DECODED.names}

    def add(self, path, digest, pixels, side, status, error, head, info, box=None) -> None:
        for k, v in zip(_DECODED.names, (path, digest, pixels, side, status, error, head)):
            self.cols[k].append(v)
        for k in _SLICE_NAMES:
            self.cols[k].append(getattr(info, k))
        self.cols["crop_box"].append(list(box) if box is not None else None)

    def add_slices(self, path: str, digest: str, res: FileResult) -> None:
        """One decoded file's rows: an ``ok`` row per slice, a ``skipped`` row per empty or
        headless slice of a volume (the reason, and where it is), else one row saying why the file
        has none (``skipped`` by the series selector, or an error)."""
        for s in res.slices:
            self.add(
                path,
                digest,
                s.image.pixels.tobytes(),
                s.image.pixels.shape[0],
                "ok",
                None,
                s.image.head_fraction,
                s.info,
                s.image.crop_box,
            )
        for sk in res.skipped_slices:
            self.add(path, digest, None, None, "skipped", sk.reason, None, sk.info)
        if not res.slices and not res.skipped_slices:
            self.add(
                path,
                digest,
                None,
                None,
                "skipped" if res.skipped else "error",
                res.skipped or res.error,
                None,
                res.info,
            )

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=_DECODED)


def _read_files(batch: pa.Table, source: Location | None, guard: InputGuard, attempts: Location | None):
    """(path, bytes, None) for each file of a decode batch, or (path, None, reason) for one that
    cannot be read; each file is read only when the caller asks for it, and its attempt marker
    (when it needs one) stays for exactly as long as the caller decodes it."""
    paths = batch.column("path").to_pylist()
    if "bytes" in batch.column_names:
        for path, data in zip(paths, batch.column("bytes").to_pylist()):
            yield path, data, None
        return
    if source is None:
        raise ValueError("decode_batch: a batch without file bytes needs the source location to read them from")
    sizes, versions = batch.column("size").to_pylist(), batch.column("version").to_pylist()
    refused = batch.column("refused").to_pylist() if "refused" in batch.column_names else [None] * len(paths)
    keys = [hashlib.sha256(f"{p}\0{v}".encode()).hexdigest()[:16] for p, v in zip(paths, versions)]
    att = _Attempts(attempts, keys)
    too_big = [guard.too_many_bytes("the file holds", int(n or 0)) for n in sizes]
    decoded = [i for i in range(len(paths)) if not refused[i] and not too_big[i] and not att.killed_twice(keys[i])]
    if len(decoded) == 1:
        att.retried = True  # a batch of one file: its marker is the file's own from the first attempt
    whole = att.mark("c", att.batch) if any(not att.suspect(keys[i]) for i in decoded) else None
    kill = os.environ.get(KILL_DECODE_ENV)
    for i, path in enumerate(paths):
        if refused[i] or too_big[i]:
            yield path, None, refused[i] or f"{too_big[i]}; not read (its listed size)"
            continue
        if att.killed_twice(keys[i]):
            logger.warning(
                "score: a file killed its decode task twice: an error row (see the output), not decoded again"
            )
            yield path, None, KILLED_TWICE
            continue
        alone = att.mark("f", keys[i]) if att.suspect(keys[i]) else None
        data, error = None, None
        try:
            # Held to the listed version: a file swapped for a link or another file since is an error row.
            data = source.read_limited(
                path, guard.max_file_bytes, version=versions[i], follow_links_outside=guard.follow_links_outside_input
            )
        except UnreadableInputError as e:
            error = e.cause
        if data is not None and (err := guard.too_many_bytes("the file holds at least", len(data))):
            data, error = None, f"{err}; grown since it was listed"
        if kill and posix_basename(path) == kill and data is not None:
            os._exit(137)  # as the kernel's OOM killer ends a process: no cleanup, no exception
        yield path, data, error
        att.unmark(alone)
    att.unmark(whole)


class _Attempts:
    """Markers of decode attempts in ``OUTPUT._staging/_attempts/``: what a killed task leaves.

    A decode task writes one marker for its batch of files (``c-<batch>-<attempt>``) and, for a
    file already suspected, one for that file (``f-<file>-<attempt>``) while decoding it; it
    deletes them when done, so only a task that died (OOM killer, a decoder's segfault) leaves
    any. A batch that finds a marker of its own batch was killed before: it decodes each file
    alone, under that file's marker; a file found with two markers of its own killed its task
    twice while decoding it alone, and becomes an error row without being decoded again. Names
    are hashes of the batch's files and of each file's path and version: a retry of the task
    (the same block) and a rerun after the whole job died (the file's own markers) both find
    them; a changed file starts afresh. The run deletes them once its rows are committed.

    Cost per task: one listing, one write, one delete (3 requests on S3); 2 more for each
    suspected file. Storage that cannot be written only turns the check off (logged).
    """

    def __init__(self, loc: Location | None, keys: list[str]):
        self.loc = loc
        self.batch = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
        self.attempt = uuid.uuid4().hex[:12]
        names = self._names()
        self.retried = any(n.startswith(f"c-{self.batch}-") for n in names)
        self.alone = collections.Counter(n.split("-")[1] for n in names if n.startswith("f-") and n.count("-") == 2)

    def killed_twice(self, key: str) -> bool:
        return self.alone[key] >= 2

    def suspect(self, key: str) -> bool:
        return self.retried or self.alone[key] > 0

    def mark(self, kind: str, key: str) -> Location | None:
        if self.loc is None:
            return None
        marker = self.loc.join(f"{kind}-{key}-{self.attempt}")
        try:
            marker.write_bytes(b"")
            return marker
        except Exception as e:
            self._off(e)
            return None

    def unmark(self, marker: Location | None) -> None:
        if marker is not None and self.loc is not None:
            try:
                # The one deleter (it checks the marker is a plain file of OUTPUT._staging/_attempts).
                remove_child(_output_of(self.loc), self.loc, posix_basename(marker.path), what="score")
            except Exception as e:
                self._off(e)

    def _names(self) -> list[str]:
        if self.loc is None:
            return []
        try:
            return [posix_basename(p) for p in self.loc.fs.ls(self.loc.path, detail=False)]
        except FileNotFoundError:
            return []
        except Exception as e:
            self._off(e)
            return []

    def _off(self, e: Exception) -> None:
        logger.warning(
            "score: decode-attempt markers in %s do not work (%s: %s): a file that kills its decode task "
            "would be retried without end",
            self.loc.uri if self.loc else "?",
            type(e).__name__,
            e,
        )
        self.loc = None
