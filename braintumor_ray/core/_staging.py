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

import logging
from typing import TYPE_CHECKING

from ._lease import current_lease
from ._storage import Location

if TYPE_CHECKING:
    from ._lease import Lease

logger = logging.getLogger(__name__)

STAGING_SUFFIX = "._staging"
DONE_MARKER = "_SUCCESS"


def posix_basename(path: str) -> str:
    """The last part of a ``/``-separated path (local or an S3 key), trailing slash ignored."""
    return path.rstrip("/").rsplit("/", 1)[-1]


class StagedWriter:
    """Stage, commit and recover runs of files for one output folder (local or ``s3://``).

        writer = StagedWriter(dst, what="score")
        writer.recover()                    # finish or drop what earlier runs left
        run = writer.stage("20260101T000000-ab12cd34")
        ...write files under run.path...
        writer.commit(run)                  # marker, then the files into dst one by one
    """

    def __init__(self, output: Location, *, what: str = "run", lease: Lease | None = None) -> None:
        self.output = output
        self.what = what  # a word for the log lines ("score")
        self.lease = lease  # checked before each commit step: a run that lost it stops
        self.root = Location(
            uri=output.uri.rstrip("/") + STAGING_SUFFIX,
            path=output.path.rstrip("/") + STAGING_SUFFIX,
            fs=output.fs,
            is_s3=output.is_s3,
        )

    def stage(self, run_id: str) -> Location:
        """The staging folder of one run (created by whoever writes the first file into it)."""
        return self.root.join(run_id)

    def commit(self, run: Location) -> int:
        """Mark ``run`` complete, then move its files into the output; the number of files moved.

        From the marker on, a run cut off mid-commit is finished by the next :meth:`recover`
        instead of redone.
        """
        self._check_lease()
        run.join(DONE_MARKER).write_bytes(b"")
        return self._publish(run)

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
        """Move a complete run's files into the output, each file whole; safe to repeat after a kill."""
        moved = 0
        for path in run.files():
            name = posix_basename(path)
            if name == DONE_MARKER:
                continue
            self._check_lease()
            src = Location(uri=run.uri_of(path), path=path, fs=run.fs, is_s3=run.is_s3)
            src.move_to(self.output.join(name))
            moved += 1
        run.remove()  # the marker goes last: a cut-off commit is finished next time
        return moved

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()
