"""Whole files into an output folder, by way of a staging folder beside it.

A writer stages each run's files in ``OUTPUT._staging/<run>/``, writes the ``_SUCCESS`` marker
once every file of the run is on storage, then moves the files into ``OUTPUT`` one by one (a
rename on disk, a copy then a delete on S3) and deletes the run's folder, marker last. A reader
of ``OUTPUT`` sees whole files only; a run cut off at any point is finished (marker present) or
dropped (no marker) by :meth:`StagedWriter.recover`, which the next run calls first.

Recovery finishes only the run that was committing or holding the output when it was cut off:
the one ``OUTPUT._staging/_committing.json`` names (written under the lease just before the
marker) or the one whose lease this run took over. Any other folder in the staging (planted,
copied in, another tool's) is left alone and named in a warning, and a run's entry list is
validated before anything moves: a staged folder is never a way to delete or overwrite files.

A commit may also carry files built from the output's files as they will be (``derived``: a
report, a table in a sibling) and files of its siblings that stay until a later commit retires
them (``objects``: scoring's DICOM objects): both are staged in the run's folder and listed in the
same manifest write as its files. Objects may also be files that others (Ray actors: scoring's heat
maps) wrote into the run's folder (:meth:`StagedWriter.object_stage`), hashed one at a time by
:meth:`StagedWriter.staged_objects` and published by the same commit.

:func:`remove_child` is the only code that deletes files of an output or its siblings.

Runs on one output take turns through its :class:`~._lease.Lease`: given the lease, the writer
checks it before each commit step, and :meth:`StagedWriter.recover` never touches the staging
of a run that holds a live lease, whoever calls it.

The staging folder sits beside the output, not inside it: a glob over the output (DuckDB's,
pyarrow's) never meets it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ._errors import ConfigError, StorageError
from ._lease import current_lease
from ._storage import Location, _guard

if TYPE_CHECKING:
    from ._lease import Lease

logger = logging.getLogger(__name__)

STAGING_SUFFIX = "._staging"
DONE_MARKER = "_SUCCESS"
# In the output: the files the job committed, with their sha256 (see Manifest). In a staged run:
# the entries that run adds to it, written before its marker.
MANIFEST_FILE = "_manifest.json"
ENTRIES_FILE = "_ENTRIES.json"
MANIFEST_FORMAT = 1
# In OUTPUT._staging/: the run whose commit began (its marker may or may not be written yet).
COMMITTING_FILE = "_committing.json"


def _check_files(run: Location, files: dict, replaces: Any, payload: dict[str, str]) -> None:
    """A staged run's file entries as the commit wrote them, or a ``ValueError`` saying why not:
    plain names with a sha256, ``replaces`` a list of names, every staged file listed and its
    bytes those the entry hashed (no link)."""
    bad = [
        n
        for n in files
        if not _plain_name(n)
        or n.startswith("_")
        or not isinstance(files[n], dict)
        or not isinstance(files[n].get("sha256"), str)
    ]
    if bad:
        raise ValueError(f"entries that are not plain file names with a sha256: {bad[:3]!r}")
    if replaces is not None and (not isinstance(replaces, list) or not all(isinstance(n, str) for n in replaces)):
        raise ValueError("'replaces' is not a list of names")
    extra = sorted(set(payload) - set(files))
    if extra:
        raise ValueError(f"staged files it does not list: {extra[:3]!r}")
    for n, p in payload.items():
        if not run.is_s3 and os.path.islink(p):
            raise ValueError(f"{n} is a link")
        if hashlib.sha256(run.fs.cat_file(p)).hexdigest() != files[n]["sha256"]:
            raise ValueError(f"{n}'s bytes do not match its sha256")


def _plain_name(name: Any) -> bool:
    """A file or folder name of its own: no separator, not ``.``/``..``, not absolute, not empty."""
    return (
        isinstance(name, str)
        and bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and not name.startswith("~")
    )


# In a staged run: the derived files it commits beside its rows (see StagedWriter.commit), each
# at its key's path below this folder.
DERIVED_DIR = "_derived"
# In a staged run: the objects it adds to the output's siblings (see StagedWriter.commit), each at
# its key's path below this folder.
OBJECTS_DIR = "_objects"


def files_digest(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 over a manifest's files, their names and sha256s: what derived files were built
    from (their entries' ``of``)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name].get('sha256')}\n".encode())
    return h.hexdigest()


def remove_child(output: Location, folder: Location, name: str, *, what: str = "run", tree: bool = False) -> bool:
    """Delete ``folder/name``: the one place that deletes what a job wrote. True when it was deleted
    (or was already gone); False, with a warning, when it is refused.

    ``folder`` must be ``output`` itself or one of its own siblings (``OUTPUT<suffix>``, or a
    folder right inside one, such as a run's folder in ``OUTPUT._staging``): same filesystem, on
    S3 the same bucket and prefix. ``name`` must be a plain child name (no ``/``, no ``..``, not
    absolute); on disk neither the folder nor the child may be a link (a link would take the
    delete outside the output). ``tree``: the child is a folder, deleted with what it holds (a
    staged run); otherwise it must be a plain file.
    """
    base = output.path.rstrip("/")
    where = folder.path.rstrip("/")
    # OUTPUT, a sibling OUTPUT_x / OUTPUT.x, or one folder inside a sibling (a staged run).
    rest = where[len(base) :].split("/") if where.startswith(base) else None
    inside = where == base or (
        rest is not None and len(rest) <= 2 and rest[0][:1] in ("_", ".") and all(_plain_name(r) for r in rest)
    )
    if folder.is_s3 != output.is_s3 or type(folder.fs) is not type(output.fs) or not inside:
        raise StorageError(
            f"{what}: refusing to delete under {folder.uri}: it is neither {output.uri} nor one of its "
            "sibling folders (a bug: report it)"
        )
    target = folder.join(name) if _plain_name(name) else None
    if target is None:
        logger.warning(
            "%s: refusing to delete %r in %s: not a plain file name (a '..', an absolute path or a "
            "separator would reach outside it); left as it is",
            what,
            name,
            folder.uri,
        )
        return False
    if not output.is_s3:
        parts = [where] + ([base] if where != base else [])
        if any(os.path.islink(p) for p in parts) or os.path.islink(target.path):
            logger.warning(
                "%s: refusing to delete %s: it, or the folder holding it, is a link (the delete would "
                "leave the output); left as it is",
                what,
                target.uri,
            )
            return False
        if not os.path.lexists(target.path):
            return True
        if not tree and not os.path.isfile(target.path):
            logger.warning("%s: refusing to delete %s: not a plain file; left as it is", what, target.uri)
            return False
    elif not tree:
        if not target.exists():
            return True
        _guard(target, "delete", target.fs.rm, target.path)
        return True
    target.remove()
    return True


def file_sha256(loc: Location, path: str) -> str:
    """The sha256 of one file of ``loc``'s filesystem, read in chunks (a run's maps are never all
    in memory at once)."""
    h = hashlib.sha256()
    with _guard(loc, "read", loc.fs.open, path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def posix_basename(path: str) -> str:
    """The last part of a ``/``-separated path (local or an S3 key), trailing slash ignored."""
    return path.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CommittedFile:
    """A file of the output that the manifest names, read whole and its sha256 checked."""

    name: str
    path: str
    data: bytes = field(repr=False)
    entry: dict[str, Any]


class Manifest:
    """``OUTPUT/_manifest.json``: what the job committed, ``{"format": 1, "files": {name:
    {"sha256", "committed_at", ...}}}`` (the writer's ``describe`` adds its own keys: rows,
    model ids). Only the files it names, with those bytes, are committed rows: a Parquet file
    planted in the output, or one rewritten in place, is never read as one (a warning names
    it). Replaced whole (:meth:`Location.write_atomic`) at each commit, under the lease.
    """

    def __init__(self, output: Location, *, what: str = "run") -> None:
        self.output, self.what = output, what
        self.location = output.join(MANIFEST_FILE)
        self._parsed: tuple[bytes, dict[str, Any]] | None = None  # the last bytes read, parsed (read_doc)

    def read(self) -> dict[str, dict[str, Any]] | None:
        """The files it names (name -> entry), or None when the output has no manifest."""
        doc = self.read_doc()
        return None if doc is None else doc["files"]

    def read_doc(self) -> dict[str, Any] | None:
        """The whole manifest: ``files``, ``derived`` and ``objects`` (key -> entry, see
        :meth:`StagedWriter.commit`; empty when none was committed), or None when the output has no
        manifest."""
        if not self.location.exists():
            return None
        raw = self.location.read_bytes()
        # A run reads the manifest four or five times before its plan (recovery, adoption, the
        # identifiers, the facts): parsed once while its bytes stay the same (25 MB and 0.25 s a
        # parse with 100,000 maps listed, load 5), so that a rerun with nothing new does no work per map.
        if self._parsed is not None and self._parsed[0] == raw:
            return dict(self._parsed[1])
        try:
            doc = json.loads(raw)
            files, derived, objects = doc["files"], doc.get("derived", {}), doc.get("objects", {})
            if doc.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
                raise ValueError(f"format {doc.get('format')!r}")
            for what, table in (("derived", derived), ("objects", objects)):
                if not isinstance(table, dict) or not all(isinstance(e, dict) for e in table.values()):
                    raise ValueError(f"{what!r} is not a table of entries")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StorageError(
                f"{self.location.uri} is not a readable manifest ({e}): restore it from a backup, or "
                "score into a new output (its rows cannot be told from planted ones)"
            ) from e
        self._parsed = (raw, {"files": files, "derived": derived, "objects": objects})
        return dict(self._parsed[1])

    def write(
        self,
        files: dict[str, dict[str, Any]],
        derived: dict[str, dict[str, Any]] | None = None,
        objects: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Replace the manifest. ``derived``: the derived files' entries, which stand only beside
        the files they were built from (a write without them drops them). ``objects``: the files
        the job committed in the output's siblings (``SUFFIX/NAME`` -> entry; a write without them
        drops them)."""
        doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "files": dict(sorted(files.items()))}
        if derived:
            doc["derived"] = dict(sorted(derived.items()))
        if objects:
            doc["objects"] = dict(sorted(objects.items()))
        self.location.write_atomic(json.dumps(doc, indent=1, sort_keys=True).encode())

    def committed(
        self, suffix: str = ".parquet", *, listed: dict[str, dict[str, Any]] | None = None
    ) -> list[CommittedFile]:
        """The committed files ending in ``suffix``, sorted, each read and its sha256 checked.

        A file the manifest does not name, or whose bytes are not the ones it names, is left
        out with a warning. An output without a manifest (written before manifests) gives every
        such file, with a warning: the next scoring run adopts them. ``listed``: the manifest's
        files when the caller read it already.
        """
        listed = self.read() if listed is None else listed
        present = {
            posix_basename(p): p
            for p in (self.output.files() if self.output.exists() else [])
            if p.endswith(suffix) and not posix_basename(p).startswith(("_", "."))
        }
        if listed is None:
            if present:
                logger.warning(
                    "%s: %s has no %s (written before manifests): its %d %s files are read as they are",
                    self.what,
                    self.output.uri,
                    MANIFEST_FILE,
                    len(present),
                    suffix,
                )
            return [CommittedFile(n, p, self.output.join(n).read_bytes(), {}) for n, p in sorted(present.items())]
        out = []
        for name in sorted(set(present) - set(listed)):
            logger.warning(
                "%s: %s is not in %s: not a committed file of this output (planted, or copied in by hand), ignored",
                self.what,
                self.output.join(name).uri,
                MANIFEST_FILE,
            )
        for name, entry in sorted(listed.items()):
            if not name.endswith(suffix):
                continue
            if name not in present:
                logger.warning(
                    "%s: %s names %s, which is gone: its rows are missing from %s",
                    self.what,
                    MANIFEST_FILE,
                    name,
                    self.output.uri,
                )
                continue
            data = self.output.join(name).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                logger.warning(
                    "%s: %s is not the file that was committed (its sha256 differs from %s's): ignored",
                    self.what,
                    self.output.join(name).uri,
                    MANIFEST_FILE,
                )
                continue
            out.append(CommittedFile(name, present[name], data, entry))
        return out


def committed_table(files: list[CommittedFile], schema: Any = None, fill: dict[str, Any] | None = None) -> Any:
    """The rows of committed Parquet files as one Arrow table: the one reading of an output's
    history per run (the files' bytes were checked by :meth:`Manifest.committed`).

    ``schema``: the table's columns and types; a column a file lacks (it predates the column) is
    ``fill``'s value for it, else null, and a column the schema lacks is dropped. Without a
    schema the files' own columns, merged (a column a file lacks is null).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fill = fill or {}
    # Files of one schema are joined first and conformed once: conforming each of 3,125 files
    # (100,000 rows in the blocks of one run) column by column took 20 s under load, against
    # one pass per schema (in practice one or two).
    # ParquetFile.read, no thread pool: half the time of read_table's dataset path on small files
    # (0.9 against 2.1 ms a file under load); a pool of reader threads doubled it (9.3 against 4.7 s
    # for 3,125 files), the files being too small for their decoding to outweigh the GIL.
    by_schema: dict[Any, list] = {}
    for cf in files:
        t = pq.ParquetFile(pa.BufferReader(cf.data)).read(use_threads=False).replace_schema_metadata(None)
        by_schema.setdefault(t.schema, []).append(t)
    tables = []
    for group in by_schema.values():
        t = pa.concat_tables(group)
        if schema is not None:
            cols = [
                t.column(f.name).cast(f.type)
                if f.name in t.column_names
                else pa.array([fill.get(f.name)] * t.num_rows, f.type)
                for f in schema
            ]
            t = pa.Table.from_arrays(cols, schema=schema)
        tables.append(t)
    if not tables:
        return schema.empty_table() if schema is not None else pa.table({})
    return pa.concat_tables(tables, promote_options="default" if schema is not None else "permissive")


def latest_mask(rows: Any, by: tuple[str, ...] = ("path",)) -> Any:
    """Which rows are the latest of their file: the one rule for "the latest rows per file".

    A file's latest rows are those with its latest ``scored_at`` (all of a run's rows of a file
    share it: one per slice). Rows without a time were written before it was a column: they are
    the oldest, and a file whose rows all lack one has all of them as its latest. ``by``: what
    names a file (``("model_id", "path")`` where an output may hold two models' rows).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = np.ones(rows.num_rows, dtype=bool)
    if rows.num_rows == 0:
        return pa.array(mask)
    # Only files with more than one row can have older ones (``by`` ends with the file's name):
    # most files of an output have one row, and grouping 100,000 rows took seconds.
    names = rows.column(by[-1])
    counts = pc.value_counts(names)
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return pa.array(mask)
    idx = np.flatnonzero(pc.is_in(names, value_set=repeated).to_numpy(zero_copy_only=False))
    sub = rows.select([*by, "scored_at"]).take(pa.array(idx))
    df = pa.table({**{f"k{i}": sub.column(k) for i, k in enumerate(by)}, "t": sub.column("scored_at")}).to_pandas()
    last = df.groupby([f"k{i}" for i in range(len(by))], dropna=False, sort=False)["t"].transform("max")
    mask[idx] = np.asarray((df["t"] == last) | last.isna(), dtype=bool)
    return pa.array(mask)


def latest_rows(rows: Any, by: tuple[str, ...] = ("path",)) -> Any:
    """The latest rows of each file (:func:`latest_mask`), in their order."""
    return rows.filter(latest_mask(rows, by)) if rows.num_rows else rows


def _entry(data: bytes, describe: Callable[[bytes], dict[str, Any]] | None) -> dict[str, Any]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "committed_at": datetime.now(UTC).isoformat(),
        **(describe(data) if describe else {}),
    }


class StagedWriter:
    """Stage, commit and recover runs of files for one output folder (local or ``s3://``).

    writer = StagedWriter(dst, what="score")
    writer.recover()                    # finish or drop what earlier runs left
    run = writer.stage("20260101T000000-ab12cd34")
    ...write files under run.path...
    writer.commit(run)                  # marker, then the files into dst one by one
    """

    def __init__(
        self,
        output: Location,
        *,
        what: str = "run",
        lease: Lease | None = None,
        describe: Callable[[bytes], dict[str, Any]] | None = None,
        manifest: bool = False,
        derived: tuple[str, ...] = (),
        objects: tuple[str, ...] = (),
    ) -> None:
        self.output = output
        # The siblings whose files its commits may add or retire (``"_dicom"``: OUTPUT_dicom/NAME,
        # keyed "_dicom/NAME"), each listed in the manifest's "objects" until a commit retires it.
        self.objects = objects
        # The derived files its commits may carry, by key: "NAME" is OUTPUT/NAME, "SUFFIX/NAME"
        # is OUTPUT<SUFFIX>/NAME (a sibling). A fixed list: a staged entry list names no other path.
        self.derived = derived
        self.what = what  # a word for the log lines ("score")
        self.lease = lease  # checked before each commit step: a run that lost it stops
        # With a manifest each commit names its files in OUTPUT/_manifest.json (describe: the
        # extra keys of a file's entry, from its bytes).
        self.manifest = Manifest(output, what=what) if manifest or describe else None
        self.describe = describe
        self.root = output.sibling(STAGING_SUFFIX)

    def stage(self, run_id: str) -> Location:
        """The staging folder of one run (created by whoever writes the first file into it)."""
        return self.root.join(run_id)

    def derived_location(self, key: str) -> Location:
        """Where the derived file ``key`` (one of :attr:`derived`) is published."""
        if key not in self.derived:
            raise StorageError(f"{self.what}: {key!r} is not a derived file of {self.output.uri} (a bug: report it)")
        suffix, _, name = key.rpartition("/")
        base = self.output.path.rstrip("/") + suffix
        folder = Location(uri=self.output.uri_of(base), path=base, fs=self.output.fs, is_s3=self.output.is_s3)
        return folder.join(name)

    def _object_key(self, key: Any) -> bool:
        """``SUFFIX/NAME``: SUFFIX one of :attr:`objects`, NAME a plain file name of the job's (no ``_``
        or ``.`` first: the sibling's own bookkeeping, such as a ledger, is never an object)."""
        if not isinstance(key, str):
            return False
        suffix, _, name = key.partition("/")
        return suffix in self.objects and _plain_name(name) and not name.startswith(("_", "."))

    def object_location(self, key: str) -> Location:
        """Where the object ``key`` (see :meth:`_object_key`) is published; a StorageError for any
        other key."""
        if not self._object_key(key):
            raise StorageError(f"{self.what}: {key!r} is not an object of {self.output.uri} (a bug: report it)")
        suffix, _, name = key.partition("/")
        return self.output.sibling(suffix).join(name)

    def object_stage(self, run: Location, suffix: str) -> Location:
        """Where a run's objects of the sibling ``suffix`` (one of :attr:`objects`) are staged by
        whoever writes them (``OUTPUT._staging/<run>/_objects/<suffix>/NAME``): a commit that
        takes :meth:`staged_objects`' entries publishes them."""
        if suffix not in self.objects:
            raise StorageError(
                f"{self.what}: {suffix!r} is not an object sibling of {self.output.uri} (a bug: report it)"
            )
        return run.join(OBJECTS_DIR, suffix)

    def staged_objects(self, run: Location, suffix: str) -> dict[str, dict[str, Any]]:
        """The objects of ``suffix`` staged as files in ``run`` (:meth:`object_stage`): key
        (``SUFFIX/NAME``) -> entry with the sha256 of its bytes, each file hashed alone (a run may
        stage 100,000 heat maps). A file that is not a plain object name is a StorageError."""
        folder = self.object_stage(run, suffix)
        base = folder.path.rstrip("/") + "/"
        out = {}
        for path in folder.files() if folder.exists() else []:
            key = f"{suffix}/{path[len(base) :]}"
            if not self._object_key(key):
                raise StorageError(f"{self.what}: {path} is not an object this run may commit (a bug: report it)")
            out[key] = {"sha256": file_sha256(folder, path), "committed_at": datetime.now(UTC).isoformat()}
        return out

    def adopt_objects(self, entries: dict[str, dict[str, Any]]) -> int:
        """List objects already in the output's siblings in the manifest, as they are (``entries``:
        key -> entry with its sha256, which the caller checked against the bytes there): an output
        whose objects an older version named elsewhere. The manifest's files and derived entries
        stay as they are. Under the lease; the number listed."""
        if self.manifest is None or not entries:
            return 0
        for key in entries:
            self.object_location(key)
        self._check_lease()
        doc = self.manifest.read_doc()
        if doc is None:
            return 0
        self.manifest.write(doc["files"], derived=doc["derived"], objects=doc["objects"] | entries)
        return len(entries)

    def commit(
        self,
        run: Location,
        *,
        replace_all: bool = False,
        data: dict[str, bytes] | None = None,
        derived: dict[str, tuple[bytes, dict[str, Any]]] | None = None,
        objects: dict[str, bytes] | None = None,
        staged: dict[str, dict[str, Any]] | None = None,
        retire: tuple[str, ...] = (),
    ) -> int:
        """Mark ``run`` complete, then move its files into the output; the number of files moved.

        ``data``: the bytes of the run's files by name, when the caller holds them already (the
        scoring job read its staged rows once): their entries are computed from these bytes, not
        read again; a file it does not name is read.

        ``derived``: files built from the output's files as they will be after this commit (the
        scoring job's series table and report), key -> (bytes, extra entry keys): staged in the
        run, published with its files and listed in the manifest's ``derived`` with their sha256
        and ``of`` (:func:`files_digest` of the files after the commit). They replace the derived
        entries before; a commit without them keeps those only while they were built from the
        files the manifest lists after it (a commit of objects alone), and drops them otherwise.

        ``objects``: files for the output's siblings (:meth:`object_location`), key -> bytes: staged
        in the run, published with its files and listed in the manifest's ``objects`` with their
        sha256 until a later commit names them in ``retire``; a retired object leaves the manifest in
        that commit's one write and is deleted after it (:func:`remove_child`). ``staged``: objects
        already staged as files in the run (:meth:`staged_objects`' entries), listed the same way.

        From the marker on, a run cut off mid-commit is finished by the next :meth:`recover`
        instead of redone. With a manifest, the run's entries are written before the marker and
        added to the manifest after the move (``replace_all``: they replace every earlier file the
        job wrote, which is then deleted; the names to delete are fixed here, so that a commit cut
        off mid-delete is finished by the next run).
        """
        name = self._check_commit(run, derived=derived or {}, objects=[*(objects or {}), *(staged or {}), *retire])
        for key, (blob, _) in (derived or {}).items():
            run.join(DERIVED_DIR, *key.split("/")).write_atomic(blob)
        for key, blob in (objects or {}).items():
            run.join(OBJECTS_DIR, *key.split("/")).write_atomic(blob)
        if self.manifest is not None:
            doc = self._entries_doc(self.manifest, run, replace_all=replace_all, data=data or {}, derived=derived or {})
            doc["objects"] = dict(staged or {}) | {k: _entry(blob, None) for k, blob in (objects or {}).items()}
            doc["retire"] = sorted(set(retire) - set(doc["objects"]))
            run.join(ENTRIES_FILE).write_bytes(json.dumps(doc).encode())
        self.root.join(COMMITTING_FILE).write_atomic(json.dumps({"run": name}).encode())
        run.join(DONE_MARKER).write_bytes(b"")
        published = self._publish(run)
        assert published is not None, "only a recovery's publish is refused"
        return published

    def _check_commit(self, run: Location, *, derived: dict[str, Any], objects: list[str]) -> str:
        """The lease still held, ``run`` one of this writer's run folders (its name returned), and
        the derived keys and object keys (staged, given or retired) ones it may commit; anything
        else is a bug of the caller's."""
        self._check_lease()
        name = posix_basename(run.path)
        if run.path.rstrip("/") != self.root.join(name).path or not _plain_name(name) or name.startswith("_"):
            raise StorageError(f"{self.what}: {run.uri} is not a run folder of {self.root.uri} (a bug: report it)")
        if derived and self.manifest is None:
            raise StorageError(f"{self.what}: derived files are committed only with a manifest (a bug: report it)")
        if objects and self.manifest is None:
            raise StorageError(f"{self.what}: objects are committed only with a manifest (a bug: report it)")
        for key in derived:
            self.derived_location(key)  # one of the writer's keys, or a bug
        for key in objects:
            self.object_location(key)  # one of the writer's siblings and a plain name, or a bug
        return name

    def _entries_doc(
        self,
        manifest: Manifest,
        run: Location,
        *,
        replace_all: bool,
        data: dict[str, bytes],
        derived: dict[str, tuple[bytes, dict[str, Any]]],
    ) -> dict[str, Any]:
        """What a commit adds to the manifest, fixed before its marker: the run's files' entries
        (from ``data`` where it holds a file's bytes), with ``replace_all`` the earlier files
        they replace (adopted ones leave the manifest but stay on storage), the derived files'."""
        entries = {
            (n := posix_basename(p)): _entry(data[n] if n in data else run.fs.cat_file(p), self.describe)
            for p in self._payload(run)
        }
        before = manifest.read() or {}
        replaces = (
            sorted(n for n, e in before.items() if n not in entries and not e.get("adopted")) if replace_all else []
        )
        kept = sorted(n for n, e in before.items() if e.get("adopted")) if replace_all else []
        if kept:
            logger.warning(
                "%s: %d files of %s were adopted (found there before manifests, maybe not written by "
                "this job): they leave the manifest but are not deleted: %s",
                self.what,
                len(kept),
                self.output.uri,
                ", ".join(kept[:5]),
            )
        return {
            "replace_all": replace_all,
            "files": entries,
            "replaces": replaces,
            "derived": {k: _entry(blob, None) | extra for k, (blob, extra) in derived.items()},
        }

    def adopt(self, suffix: str = ".parquet", *, foreign: Callable[[bytes], str | None] | None = None) -> int:
        """Give an output written before manifests one: its ``suffix`` files as they are now (logged).

        ``foreign``: the reason a file's bytes are not this job's (another tool's Parquet), or None;
        any such file refuses the output (:class:`ConfigError` naming the files and the fix)
        instead of being adopted, and so never deleted by a later ``--rescore-all``.
        """
        if self.manifest is None or self.manifest.read() is not None or not self.output.exists():
            return 0
        names = [p for p in self.output.files() if p.endswith(suffix) and not posix_basename(p).startswith(("_", "."))]
        if not names:
            return 0
        self._check_lease()
        data = {p: self.output.fs.cat_file(p) for p in names}
        if foreign is not None:
            theirs = {posix_basename(p): why for p, b in data.items() if (why := foreign(b))}
            if theirs:
                first = sorted(theirs)[:3]
                raise ConfigError(
                    f"{self.what}: {self.output.uri} holds files this job did not write ({len(theirs)}, e.g. "
                    + "; ".join(f"{n}: {theirs[n]}" for n in first)
                    + f"), and no {MANIFEST_FILE}: it is not an output of this job. Choose a new or empty folder for "
                    "--output (nothing there was changed)"
                )
        files = {posix_basename(p): _entry(b, self.describe) | {"adopted": True} for p, b in data.items()}
        self.manifest.write(files)
        logger.warning(
            "%s: %s was written before manifests: its %d files are taken as committed as they are now, and named in %s",
            self.what,
            self.output.uri,
            len(files),
            MANIFEST_FILE,
        )
        return len(files)

    def _payload(self, run: Location) -> list[str]:
        inner = tuple(run.join(d).path.rstrip("/") + "/" for d in (DERIVED_DIR, OBJECTS_DIR))
        return [
            p
            for p in sorted(run.file_sizes(missing_ok=True))  # none: a commit that only retires objects
            if posix_basename(p) not in (DONE_MARKER, ENTRIES_FILE) and not p.startswith(inner)
        ]

    def _staged_derived(self, run: Location, folder: str = DERIVED_DIR) -> dict[str, str]:
        """The derived files (or, ``folder`` :data:`OBJECTS_DIR`, the objects) staged in ``run``: key ->
        path (a key the writer does not know included, for :meth:`_entries` to refuse)."""
        inner = run.join(folder)
        if not inner.exists():
            return {}
        base = inner.path.rstrip("/") + "/"
        return {p[len(base) :]: p for p in inner.files() if not posix_basename(p).startswith(".")}

    def _remove_run(self, run: str) -> None:
        remove_child(self.output, self.root, run, what=self.what, tree=True)

    def _resumable(self) -> set[str]:
        """The runs recovery may finish or drop: the one whose commit began (``_committing.json``)
        and the one whose lease this run took over (or, without a lease, a dead holder's)."""
        runs: set[str] = set()
        pointer = self.root.join(COMMITTING_FILE)
        if pointer.exists():
            try:
                run = json.loads(pointer.read_bytes())["run"]
                if _plain_name(run) and not run.startswith("_"):
                    runs.add(run)
                else:
                    raise ValueError(f"run {run!r}")
            except (ValueError, KeyError, TypeError) as e:
                logger.warning("%s: %s is not readable (%s): ignored", self.what, pointer.uri, e)
        if self.lease is not None:
            took = self.lease.took_over or {}
            if isinstance(took.get("owner"), str):
                runs.add(took["owner"])
        else:
            rec = current_lease(self.output)
            if rec and not rec["live"] and isinstance(rec.get("owner"), str):
                runs.add(rec["owner"])
        return runs

    def recover(self) -> dict[str, int]:
        """Finish what the run cut off on this output left: commit its staged files if it completed
        (marker and valid entries), drop them if it did not. Any other staged folder is left alone,
        named in a warning (the lease makes it nobody's run: planted, copied, or a bug's)."""
        done = dropped = 0
        if not self.root.exists():
            return {"committed_runs": 0, "dropped_runs": 0}
        self._check_lease()
        # Holding the lease is the protection; a caller without it (score.recover) looks whose it is.
        live = current_lease(self.output) if self.lease is None else None
        live_owner = live["owner"] if live and live["live"] else None
        resumable = self._resumable()
        for path in sorted(self.root.fs.ls(self.root.path, detail=False)):
            run = posix_basename(path)
            if run.startswith("_"):
                continue  # not a run: bookkeeping kept across runs (scoring's decode-attempt markers)
            run_loc = self.root.join(run)
            if live and run == live_owner:
                logger.warning(
                    "%s: leaving the staging of run %s alone: that run holds the lease on %s (live until %s)",
                    self.what,
                    run,
                    self.output.uri,
                    live["expires"],
                )
                continue
            if self.lease is not None and run == self.lease.owner:
                continue
            if run not in resumable:
                logger.warning(
                    "%s: %s is not the staging of the run cut off on %s (neither its lease nor its "
                    "commit record names it): left alone, and never published. Delete it if nobody needs "
                    "it",
                    self.what,
                    run_loc.uri,
                    self.output.uri,
                )
                continue
            if run_loc.join(DONE_MARKER).exists():
                if self._publish(run_loc, recovering=True) is not None:
                    done += 1
            else:
                logger.warning(
                    "%s: dropping the unfinished run %s (cut off before its rows were complete)", self.what, run
                )
                self._remove_run(run)
                dropped += 1
        self._clear_pointer(resumable)
        return {"committed_runs": done, "dropped_runs": dropped}

    def _clear_pointer(self, runs: set[str]) -> None:
        """The commit record, once the run it names is gone from the staging."""
        pointer = self.root.join(COMMITTING_FILE)
        if pointer.exists() and not any(self.root.join(r).exists() for r in runs):
            remove_child(self.output, self.root, COMMITTING_FILE, what=self.what)

    def _entries(self, run: Location, *, recovering: bool = True) -> dict[str, Any] | None:
        """The run's validated entry list, or None (with a warning naming the run and why).
        ``recovering``: the staged objects' bytes are hashed again (a commit in progress hashed them
        itself moments before, under the lease: 100,000 maps are not read twice)."""
        payload = {posix_basename(p): p for p in self._payload(run)}
        if self.manifest is None:
            return {"replace_all": False, "files": {}, "replaces": [], "derived": {}, "objects": {}, "retire": []}
        if not run.join(ENTRIES_FILE).exists():  # staged by a version before manifests
            return {
                "replace_all": False,
                "files": {n: _entry(run.fs.cat_file(p), self.describe) for n, p in payload.items()},
                "replaces": [],
                "derived": {},
                "objects": {},
                "retire": [],
            }
        try:
            doc = json.loads(run.join(ENTRIES_FILE).read_bytes())
            files, replace_all = doc["files"], doc.get("replace_all", False)
            replaces = doc.get("replaces")
            derived, objects, retire = doc.get("derived", {}), doc.get("objects", {}), doc.get("retire", [])
            if not isinstance(files, dict) or not isinstance(replace_all, bool):
                raise ValueError("'files' is not a table of names or 'replace_all' is not true/false")
            self._check_derived(run, derived)
            self._check_objects(run, objects, retire, verify=recovering)
            _check_files(run, files, replaces, payload)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            logger.warning(
                "%s: the staged run %s has an entry list that cannot be trusted (%s): left alone, nothing "
                "published from it. Delete the folder once you have looked at it",
                self.what,
                run.uri,
                e,
            )
            return None
        if replaces is None and replace_all:  # staged by a version before the names were fixed at commit
            replaces = sorted(
                n for n, e in (self.manifest.read() or {}).items() if n not in files and not e.get("adopted")
            )
        return {
            "replace_all": replace_all,
            "files": files,
            "replaces": replaces or [],
            "derived": derived,
            "objects": objects,
            "retire": retire,
        }

    def _check_objects(self, run: Location, objects: Any, retire: Any, *, verify: bool = True) -> None:
        """A staged run's objects and retired keys: this writer's siblings' plain names, a sha256 for
        each object, and every staged object listed (``verify``: with its bytes; ValueError otherwise)."""
        if not isinstance(objects, dict) or not isinstance(retire, list):
            raise ValueError("'objects' is not a table of files or 'retire' is not a list")
        bad = [k for k in [*objects, *retire] if not self._object_key(k)]
        if bad:
            raise ValueError(
                f"objects or retired names that are not plain files of this output's siblings: {bad[:3]!r}"
            )
        if not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in objects.values()):
            raise ValueError("objects without a sha256")
        for key, path in self._staged_derived(run, OBJECTS_DIR).items():
            if key not in objects:
                raise ValueError(f"staged object {key!r} it does not list")
            if not run.is_s3 and os.path.islink(path):
                raise ValueError(f"{key} is a link")
            if verify and file_sha256(run, path) != objects[key]["sha256"]:
                raise ValueError(f"{key}'s bytes do not match its sha256")

    def _check_derived(self, run: Location, derived: Any) -> None:
        """A staged run's derived entries: the writer's own keys with a sha256 each, and every staged
        derived file listed with its bytes (ValueError otherwise)."""
        if not isinstance(derived, dict):
            raise ValueError("'derived' is not a table of files")
        bad = [k for k, e in derived.items() if k not in self.derived or not isinstance(e, dict)]
        if bad or not all(isinstance(e.get("sha256"), str) for e in derived.values()):
            raise ValueError(f"derived entries that are not this output's derived files with a sha256: {bad[:3]!r}")
        for key, path in self._staged_derived(run).items():
            if key not in derived:
                raise ValueError(f"staged derived file {key!r} it does not list")
            if not run.is_s3 and os.path.islink(path):
                raise ValueError(f"{key} is a link")
            if hashlib.sha256(run.fs.cat_file(path)).hexdigest() != derived[key]["sha256"]:
                raise ValueError(f"{key}'s bytes do not match its sha256")

    def _publish(self, run: Location, *, recovering: bool = False) -> int | None:
        """Move a complete run's files into the output, each file whole, then name them in the
        manifest and delete the files it replaces; safe to repeat after a kill. None when the
        run's entries cannot be trusted (recovery only: nothing is moved)."""
        staged = self._entries(run, recovering=recovering)
        if staged is None:
            return None
        moved = 0
        for path in self._payload(run):
            name = posix_basename(path)
            self._check_lease()
            src = Location(uri=run.uri_of(path), path=path, fs=run.fs, is_s3=run.is_s3)
            src.move_to(self.output.join(name))
            moved += 1
        for key, path in self._staged_derived(run).items():  # each replaces the one before, whole
            self._check_lease()
            src = Location(uri=run.uri_of(path), path=path, fs=run.fs, is_s3=run.is_s3)
            src.move_to(self.derived_location(key))
        for key, path in self._staged_derived(run, OBJECTS_DIR).items():
            self._check_lease()
            src = Location(uri=run.uri_of(path), path=path, fs=run.fs, is_s3=run.is_s3)
            src.move_to(self.object_location(key))
        if self.manifest is not None:
            self._check_lease()
            doc = self.manifest.read_doc() or {"files": {}, "derived": {}, "objects": {}}
            before = doc["files"]
            replaced = set(staged["replaces"])
            files = {
                n: e for n, e in before.items() if not (staged["replace_all"] and (n in replaced or e.get("adopted")))
            } | staged["files"]
            of = files_digest(files)
            derived = {k: e | {"of": of} for k, e in staged["derived"].items()}
            if not derived:  # a commit of objects alone: the derived files built from these files stand
                derived = {k: e for k, e in doc["derived"].items() if e.get("of") == of}
            retired = set(staged["retire"])
            objects = {k: e for k, e in doc["objects"].items() if k not in retired} | staged["objects"]
            self.manifest.write(files, derived=derived, objects=objects)
            for name in staged["replaces"]:  # out of the manifest first: a cut-off delete leaves no listed hole
                if name not in staged["files"]:
                    remove_child(self.output, self.output, name, what=self.what)
            for key in sorted(retired - set(staged["objects"])):  # unlisted first, as the replaced files
                suffix, _, name = key.partition("/")
                remove_child(self.output, self.output.sibling(suffix), name, what=self.what)
        self._remove_run(posix_basename(run.path))  # the marker goes with it: a cut-off commit is finished next time
        if not recovering:
            self._clear_pointer({posix_basename(run.path)})
        return moved

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()
