"""Whole files into an output folder, by way of a staging folder beside it.

A writer stages each run's files in ``OUTPUT._staging/<run>/``, writes the ``_SUCCESS`` marker
once every file of the run is on storage, then moves the files into ``OUTPUT`` one by one (a
rename on disk, a copy then a delete on S3) and deletes the run's folder, marker last. A reader
of ``OUTPUT`` sees whole files only; a run cut off at any point is finished (marker present) or
dropped (no marker) by :meth:`StagedWriter.recover`, which the next run calls first.

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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable

from ._errors import StorageError
from ._lease import current_lease
from ._storage import Location

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

    def read(self) -> dict[str, dict[str, Any]] | None:
        """The files it names (name -> entry), or None when the output has no manifest."""
        if not self.location.exists():
            return None
        try:
            doc = json.loads(self.location.read_bytes())
            files = doc["files"]
            if doc.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
                raise ValueError(f"format {doc.get('format')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{self.location.uri} is not a readable manifest ({e}): restore it from a backup, or "
                               "score into a new output (its rows cannot be told from planted ones)") from e
        return files

    def write(self, files: dict[str, dict[str, Any]]) -> None:
        doc = {"format": MANIFEST_FORMAT, "files": dict(sorted(files.items()))}
        self.location.write_atomic(json.dumps(doc, indent=1, sort_keys=True).encode())

    def committed(self, suffix: str = ".parquet") -> list[CommittedFile]:
        """The committed files ending in ``suffix``, sorted, each read and its sha256 checked.

        A file the manifest does not name, or whose bytes are not the ones it names, is left
        out with a warning. An output without a manifest (written before manifests) gives every
        such file, with a warning: the next scoring run adopts them.
        """
        listed = self.read()
        present = {posix_basename(p): p for p in (self.output.files() if self.output.exists() else [])
                   if p.endswith(suffix) and not posix_basename(p).startswith(("_", "."))}
        if listed is None:
            if present:
                logger.warning("%s: %s has no %s (written before manifests): its %d %s files are read as they are",
                               self.what, self.output.uri, MANIFEST_FILE, len(present), suffix)
            return [CommittedFile(n, p, self.output.join(n).read_bytes(), {}) for n, p in sorted(present.items())]
        out = []
        for name in sorted(set(present) - set(listed)):
            logger.warning("%s: %s is not in %s: not a committed file of this output (planted, or copied in by "
                           "hand), ignored", self.what, self.output.join(name).uri, MANIFEST_FILE)
        for name, entry in sorted(listed.items()):
            if not name.endswith(suffix):
                continue
            if name not in present:
                logger.warning("%s: %s names %s, which is gone: its rows are missing from %s", self.what,
                               MANIFEST_FILE, name, self.output.uri)
                continue
            data = self.output.join(name).read_bytes()
            if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                logger.warning("%s: %s is not the file that was committed (its sha256 differs from %s's): ignored",
                               self.what, self.output.join(name).uri, MANIFEST_FILE)
                continue
            out.append(CommittedFile(name, present[name], data, entry))
        return out


def _entry(data: bytes, describe: Callable[[bytes], dict[str, Any]] | None) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "committed_at": datetime.now(timezone.utc).isoformat(),
            **(describe(data) if describe else {})}


class StagedWriter:
    """Stage, commit and recover runs of files for one output folder (local or ``s3://``).

        writer = StagedWriter(dst, what="score")
        writer.recover()                    # finish or drop what earlier runs left
        run = writer.stage("20260101T000000-ab12cd34")
        ...write files under run.path...
        writer.commit(run)                  # marker, then the files into dst one by one
    """

    def __init__(self, output: Location, *, what: str = "run", lease: Lease | None = None,
                 describe: Callable[[bytes], dict[str, Any]] | None = None, manifest: bool = False) -> None:
        self.output = output
        self.what = what  # a word for the log lines ("score")
        self.lease = lease  # checked before each commit step: a run that lost it stops
        # With a manifest each commit names its files in OUTPUT/_manifest.json (describe: the
        # extra keys of a file's entry, from its bytes).
        self.manifest = Manifest(output, what=what) if manifest or describe else None
        self.describe = describe
        self.root = Location(
            uri=output.uri.rstrip("/") + STAGING_SUFFIX,
            path=output.path.rstrip("/") + STAGING_SUFFIX,
            fs=output.fs,
            is_s3=output.is_s3,
        )

    def stage(self, run_id: str) -> Location:
        """The staging folder of one run (created by whoever writes the first file into it)."""
        return self.root.join(run_id)

    def commit(self, run: Location, *, replace_all: bool = False) -> int:
        """Mark ``run`` complete, then move its files into the output; the number of files moved.

        From the marker on, a run cut off mid-commit is finished by the next :meth:`recover`
        instead of redone. With a manifest, the run's entries are written before the marker and
        added to the manifest after the move (``replace_all``: they replace every earlier file,
        which is then deleted).
        """
        self._check_lease()
        if self.manifest is not None:
            entries = {posix_basename(p): _entry(run.fs.cat_file(p), self.describe) for p in self._payload(run)}
            run.join(ENTRIES_FILE).write_bytes(json.dumps({"replace_all": replace_all, "files": entries}).encode())
        run.join(DONE_MARKER).write_bytes(b"")
        return self._publish(run)

    def adopt(self, suffix: str = ".parquet") -> int:
        """Give an output written before manifests one: its ``suffix`` files as they are now (logged)."""
        if self.manifest is None or self.manifest.read() is not None or not self.output.exists():
            return 0
        names = [p for p in self.output.files() if p.endswith(suffix) and not posix_basename(p).startswith(("_", "."))]
        if not names:
            return 0
        self._check_lease()
        files = {posix_basename(p): _entry(self.output.fs.cat_file(p), self.describe) | {"adopted": True} for p in names}
        self.manifest.write(files)
        logger.warning("%s: %s was written before manifests: its %d files are taken as committed as they are now, "
                       "and named in %s", self.what, self.output.uri, len(files), MANIFEST_FILE)
        return len(files)

    def _payload(self, run: Location) -> list[str]:
        return [p for p in run.files() if posix_basename(p) not in (DONE_MARKER, ENTRIES_FILE)]

    def recover(self) -> dict[str, int]:
        """Finish what earlier runs left: commit staged runs that completed, drop those that did not."""
        done = dropped = 0
        if not self.root.exists():
            return {"committed_runs": 0, "dropped_runs": 0}
        self._check_lease()
        # Holding the lease is the protection; a caller without it (score.recover) looks whose it is.
        live = current_lease(self.output) if self.lease is None else None
        live_owner = live["owner"] if live and live["live"] else None
        for path in sorted(self.root.fs.ls(self.root.path, detail=False)):
            run = posix_basename(path)
            if run.startswith("_"):
                continue  # not a run: bookkeeping kept across runs (scoring's decode-attempt markers)
            run_loc = self.root.join(run)
            if live and run == live_owner:
                logger.warning("%s: leaving the staging of run %s alone: that run holds the lease on %s (live "
                               "until %s)", self.what, run, self.output.uri, live["expires"])
                continue
            if run_loc.join(DONE_MARKER).exists():
                self._publish(run_loc)
                done += 1
            else:
                logger.warning("%s: dropping the unfinished run %s (cut off before its rows were complete)", self.what, run)
                run_loc.remove()
                dropped += 1
        return {"committed_runs": done, "dropped_runs": dropped}

    def _publish(self, run: Location) -> int:
        """Move a complete run's files into the output, each file whole, then name them in the
        manifest; safe to repeat after a kill."""
        staged = None
        if self.manifest is not None:
            if run.join(ENTRIES_FILE).exists():
                staged = json.loads(run.join(ENTRIES_FILE).read_bytes())
            else:  # staged by a version before manifests
                staged = {"replace_all": False, "files": {posix_basename(p): _entry(run.fs.cat_file(p), self.describe)
                                                          for p in self._payload(run)}}
        moved = 0
        for path in self._payload(run):
            name = posix_basename(path)
            self._check_lease()
            src = Location(uri=run.uri_of(path), path=path, fs=run.fs, is_s3=run.is_s3)
            src.move_to(self.output.join(name))
            moved += 1
        if staged is not None:
            self._check_lease()
            before = self.manifest.read() or {}
            files = {} if staged["replace_all"] else dict(before)
            self.manifest.write(files | staged["files"])
            for name in sorted(set(before) - set(staged["files"])) if staged["replace_all"] else ():
                self.output.join(name).remove()  # replaced (--rescore-all): out of the manifest first
        run.remove()  # the marker goes last: a cut-off commit is finished next time
        return moved

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()
