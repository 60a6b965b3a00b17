"""A lease on an output: one run at a time writes it, however the runs were started.

The lease is a small JSON object beside the output, ``OUTPUT._lease.json`` (not inside it,
where dataset readers would meet it, nor in the staging folder, which ``recover()`` deletes)::

    {"owner": "<run id>", "host": "...", "pid": 123, "started": "...", "heartbeat": "...",
     "expires": "...", "ttl_s": 120.0}

- **Taken atomically.** On S3 a conditional PUT (``If-None-Match: *``: AWS S3 since 2024,
  MinIO, moto); on local disk a complete temporary file hard-linked into place (``link`` fails
  when the name exists, as ``O_CREAT|O_EXCL`` does, and no reader sees a half-written file).
- **Renewed** every ``ttl_s / 4`` by a daemon thread, each renewal conditional on still being
  the owner (S3: ``If-Match`` the ETag this run last wrote; disk: the content it last wrote,
  compared and replaced under ``flock``). A renewal that finds another owner marks the lease
  lost, and :meth:`Lease.check` (called before every commit) stops the run.
- **Taken over when stale**: past ``expires``, or at once when the holder ran on this machine
  (same host, boot and PID namespace) and its process is gone, as after a SIGKILL and a rerun
  on the same node. With ``If-Match`` the stale ETag on S3, and on disk by compare-and-rename
  under ``flock``, so of two runs that find one stale lease exactly one wins. A warning names
  the old holder.
- **Released** on leaving the ``with`` block, exceptions and Ctrl-C included. A run killed
  outright (SIGKILL, a lost node) leaves its lease to expire after ``ttl_s``.

Clocks: ``expires`` is the holder's wall clock; a live holder's is always at least 3/4 of the
TTL ahead (it renews every quarter), so hosts' clocks may differ by up to 90 s at the default
120 s before a live lease could look stale elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from ._errors import ConfigError, LeaseError, LeaseHeldError, LeaseLostError, NoSpaceError, StorageError
from ._storage import Location, canonical_location

logger = logging.getLogger(__name__)

LEASE_SUFFIX = "._lease.json"
# Local disk only: the file whose flock serialises every change of the lease (never deleted:
# deleting a lock file lets two processes lock two different files).
LOCK_SUFFIX = "._lease.lock"


def lease_location(output: Location) -> Location:
    """Where the lease of ``output`` lives: ``OUTPUT._lease.json``, beside the output's canonical
    form (:func:`canonical_location`: its real path; bucket and key). Named after the output as
    typed, a symlinked spelling of the same folder (or ``s3a://``, a doubled slash) had a lease
    of its own: two runs wrote the output at once, and one run's commits dropped out."""
    return canonical_location(output).sibling(LEASE_SUFFIX)


def current_lease(output: Location) -> dict[str, Any] | None:
    """The lease record on ``output``, or None when there is none. ``"live"``: not expired, and
    not held by a process known to be gone."""
    cur = _store(lease_location(output)).read()
    if cur is None:
        return None
    rec = _parse(cur[0], lease_location(output))
    return rec | {"live": not _expired(rec) and not _holder_gone(rec)}


class Lease:
    """Hold ``output`` for one run (``owner``, e.g. the run id) while the ``with`` block runs.

        with Lease(dst, owner=run_id, ttl_s=120, wait_s=0, what="score") as lease:
            ...
            lease.check()      # before committing: raises LeaseError if the lease was lost

    ``wait_s``: how long to wait for another run's lease to be released or to expire before
    refusing (0: refuse at once).
    """

    def __init__(
        self,
        output: Location,
        *,
        owner: str,
        ttl_s: float = 120.0,
        wait_s: float = 0.0,
        what: str = "run",
        poll_s: float | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ConfigError(f"lease ttl_s={ttl_s} must be > 0 seconds")
        self.output, self.owner, self.ttl_s, self.wait_s, self.what = output, owner, float(ttl_s), float(wait_s), what
        # Polling while waiting: often enough to follow a short TTL, at most one GET per 5 s.
        self.poll_s = poll_s if poll_s is not None else min(max(self.ttl_s / 4, 0.05), 5.0)
        self.location = lease_location(output)
        self._store = _store(self.location)
        self._started = _iso(_now())
        self._version: str | None = None  # its version (ETag on S3, sha256 on disk)
        self._deadline = 0.0  # time.monotonic() past which another run may take the lease over
        self._lost: str | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict[str, Any] | None = None  # the stale holder this run replaced
        self.waited_s = 0.0

    # --- holding ---------------------------------------------------------------------------------
    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> Lease:
        """Take the lease (waiting up to ``wait_s`` for a live holder) and start the heartbeat."""
        self._stop.clear()
        self._lost, self.took_over, self.waited_s = None, None, 0.0
        t0 = time.monotonic()
        while (holder := self._try_acquire()) is not None:
            waited = time.monotonic() - t0
            if waited >= self.wait_s:
                raise self._held_error(holder, waited)
            if not self.waited_s:
                logger.info(
                    "%s: %s is held by %s; waiting up to %.0f s for it to be released or to expire",
                    self.what,
                    self.output.uri,
                    _describe(holder),
                    self.wait_s,
                )
            self.waited_s = waited or 1e-6
            time.sleep(max(0.0, min(self.poll_s, self.wait_s - waited)))
        if self.waited_s:
            self.waited_s = round(time.monotonic() - t0, 3)
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.owner}", daemon=True)
        self._thread.start()
        return self

    def held(self) -> bool:
        """Whether this run still holds the lease (never lost, renewed within the TTL)."""
        return self._lost is None and self._version is not None and time.monotonic() < self._deadline

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless the lease is still held (call before committing)."""
        if self.held():
            return
        if self._lost:
            why = self._lost
        elif self._version is None:
            why = "it was never taken, or already released"
        else:
            why = f"it was not renewed within its {self.ttl_s:g} s TTL (storage unreachable?)"
        raise LeaseLostError(
            f"{self.what}: run {self.owner} no longer holds the lease on {self.output.uri} ({why}), so it commits "
            f"nothing; its staged files are dropped by the run that holds the output now. Run the job again once "
            f"that run has finished",
            output=self.output.uri,
            owner=self.owner,
            reason=why,
        )

    def renew(self) -> bool:
        """One heartbeat: push ``expires`` forward if this run still owns the lease. False once lost."""
        with self._mutex:
            if self._lost is not None or self._version is None:
                return False
            started = time.monotonic()
            data = self._record()
            try:
                self._wrote(self._store.replace(data, self._version), started)
                return True
            except _Conflict:
                cur = self._store_read_quietly()
                if cur is not None and cur[0] == data:  # our write landed; its reply was lost
                    self._wrote(cur[1], started)
                    return True
                holder = _describe(_parse_quietly(cur[0])) if cur is not None else "no run (the lease was deleted)"
                self._lost = f"the lease now names {holder}"
                logger.error(
                    "%s: lost the lease on %s: %s. This run will not commit", self.what, self.output.uri, self._lost
                )
                return False

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this run's (errors are logged, not raised)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.ttl_s)
        with self._mutex:
            if self._version is None or self._lost is not None:
                self._version = None
                return
            try:
                self._store.delete(self._version)
            except _Conflict:
                logger.warning(
                    "%s: the lease on %s is no longer run %s's; left as it is", self.what, self.output.uri, self.owner
                )
            except Exception as e:  # the run's own outcome matters more than the lease's tidy end
                logger.warning(
                    "%s: could not release the lease %s (%s); it expires by itself within %g s",
                    self.what,
                    self.location.uri,
                    e,
                    self.ttl_s,
                )
            self._version = None

    def describe(self) -> dict[str, Any]:
        """For a run's summary: the owner, and whom it took over from or how long it waited."""
        out: dict[str, Any] = {"owner": self.owner, "ttl_s": self.ttl_s, "waited_s": self.waited_s}
        if self.took_over:
            out["took_over_from"] = self.took_over.get("owner")
        return out

    # --- internals -------------------------------------------------------------------------------
    def _try_acquire(self) -> dict[str, Any] | None:
        """Take the lease if it is free or stale: None; else the live holder's record."""
        rec: dict[str, Any] = {}
        # Each pass either takes the lease, finds a live holder, or saw another run change the
        # lease in between (it then looks again); a few passes settle any race.
        for _ in range(8):
            started = time.monotonic()
            data = self._record()
            try:
                self._wrote(self._store.create(data), started)
                return None
            except _Conflict:
                pass
            cur = self._store.read()
            if cur is None:  # released in between
                continue
            raw, version = cur
            rec = _parse(raw, self.location)
            if rec.get("owner") == self.owner and rec.get("pid") == os.getpid() and rec.get("started") == self._started:
                self._wrote(version, started)  # our own create, its reply lost: ours
                return None
            gone = _holder_gone(rec)
            if not gone and not _expired(rec):
                return rec
            data = self._record()
            try:
                self._wrote(self._store.replace(data, version), started)
            except _Conflict:  # another run took it over first
                continue
            self.took_over = rec
            logger.warning(
                "%s: took over the stale lease on %s from %s: %s; its unfinished staging is dropped",
                self.what,
                self.output.uri,
                _describe(rec),
                "its process is gone from this machine" if gone else "it stopped renewing it (killed or stalled)",
            )
            return None
        return rec

    def _wrote(self, version: str, started: float) -> None:
        self._version, self._deadline = version, started + self.ttl_s

    def _record(self) -> bytes:
        now = _now()
        rec = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "heartbeat": _iso(now),
            "expires": _iso(now + timedelta(seconds=self.ttl_s)),
            "ttl_s": self.ttl_s,
            "output": self.output.uri,
            **_machine(),
        }
        return json.dumps(rec, indent=1).encode()

    def _beat(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
                interval = self.ttl_s / 4
            except Exception as e:  # a storage hiccup: try again soon; held() turns false at the deadline
                logger.warning("%s: could not renew the lease on %s (%s); trying again", self.what, self.output.uri, e)
                interval = self.ttl_s / 16

    def _store_read_quietly(self) -> tuple[bytes, str] | None:
        try:
            return self._store.read()
        except Exception:
            return None

    def _held_error(self, holder: dict[str, Any], waited: float) -> LeaseHeldError:
        waited_note = f" after waiting {waited:.0f} s" if self.wait_s > 0 else ""
        expires = _iso(_expiry(holder))
        return LeaseHeldError(
            f"{self.output.uri} is being written by another {self.what} run{waited_note}: {_describe(holder)}. "
            f"Two runs on one output would do the same work twice and could delete each other's staged files, so "
            f"this run stops here. Wait for it with --wait SECONDS (this run then starts once that lease is released or "
            f"expires), or run again later; if that run is dead, its lease expires by itself at "
            f"{expires} "
            f"(lease: {self.location.uri})",
            output=self.output.uri,
            holder=str(holder.get("owner", "")),
            host=holder.get("host"),
            pid=holder.get("pid") if isinstance(holder.get("pid"), int) else None,
            expires=expires,
            waited_s=round(waited, 3) if self.wait_s > 0 else 0.0,  # one try, no wait asked for
        )


def _describe(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "an unreadable lease"
    return (
        f"run {rec.get('owner')} (host {rec.get('host')}, pid {rec.get('pid')}, started {rec.get('started')}, "
        f"last heartbeat {rec.get('heartbeat')}, expires {rec.get('expires')})"
    )


_MACHINE: dict[str, str] = {}


def _machine() -> dict[str, str]:
    """This process's boot and PID namespace (Linux; empty elsewhere): with the host name they
    tell whether a lease's pid can be looked up here."""
    if not _MACHINE:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _MACHINE["boot_id"] = f.read().strip()
            _MACHINE["pid_ns"] = os.readlink("/proc/self/ns/pid")
        except OSError:
            _MACHINE.update(boot_id="", pid_ns="")
    return dict(_MACHINE)


def _holder_gone(rec: dict[str, Any]) -> bool:
    """Whether the lease's holder ran in this machine's PID namespace and its process no longer
    exists (a killed run, rerun on the same node: no need to wait out its TTL)."""
    me = _machine()
    if not me["boot_id"] or rec.get("host") != socket.gethostname():
        return False
    if rec.get("boot_id") != me["boot_id"] or rec.get("pid_ns") != me["pid_ns"]:
        return False  # another container or boot: its pid means nothing here
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return False  # alive (or its pid reused: then the TTL decides)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds")


# The longest ttl a run may set (the jobs' lease_ttl_s): a record claiming more, or none, is held to it.
MAX_TTL_S = 86400.0


def _when(text: Any) -> datetime:
    """A record's time. One without a time zone (a hand edit: runs always write +00:00) is read
    as UTC, the zone every run writes, rather than crash the comparison with an aware clock."""
    t = datetime.fromisoformat(text)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _ttl(rec: dict[str, Any]) -> float:
    ttl = rec.get("ttl_s")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_S:
        return MAX_TTL_S
    return float(ttl)


def _expiry(rec: dict[str, Any]) -> datetime:
    """When a lease is stale: its ``expires``, but never later than ``ttl_s`` after its last
    heartbeat (a live holder writes ``expires = heartbeat + ttl_s`` at every renewal, so a
    later one is an edit and is not believed). A heartbeat more than ``ttl_s`` ahead of this
    clock is none a live holder writes (hosts' clocks may differ by less than 3/4 of the ttl,
    see the module doc): that lease is stale now."""
    ttl = timedelta(seconds=_ttl(rec))
    beat, now = _when(rec["heartbeat"]), _now()
    if beat - now > ttl:
        return now
    return min(_when(rec["expires"]), beat + ttl)


def _expired(rec: dict[str, Any]) -> bool:
    return _expiry(rec) <= _now()


def _parse(raw: bytes, where: Location) -> dict[str, Any]:
    rec = _parse_quietly(raw)
    if rec is None:
        raise LeaseError(
            f"the lease {where.uri} is not a lease record (owner, host, expires ...). Unless a run is writing the "
            f"output right now, delete that file and run again"
        )
    return rec


def _parse_quietly(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
        if not isinstance(rec, dict):
            return None
        _when(rec["expires"]), _when(rec["heartbeat"])
        return rec
    except (ValueError, TypeError, KeyError):
        return None


class _Conflict(Exception):
    """The lease is not in the state the caller expected (another run created, changed or removed it)."""


def _store(loc: Location) -> _LocalStore | _S3Store:
    return _S3Store(loc) if loc.is_s3 else _LocalStore(loc.path)


class _LocalStore:
    """Local disk: every change under an exclusive ``flock`` of ``OUTPUT._lease.lock``; the
    version of the lease is the sha256 of its bytes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path[: -len(LEASE_SUFFIX)] + LOCK_SUFFIX if path.endswith(LEASE_SUFFIX) else path + ".lock"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(
                f"cannot open {self.lock_path}, the lock of the output's lease: {e}. Check that the "
                f"folder exists and this user may write it"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # per open file: two Lease objects of one process exclude each other too
            yield
        except OSError as e:
            raise StorageError(
                f"cannot write the lease {self.path}: {e}. Check the disk and the folder's permissions"
            ) from e
        finally:
            os.close(fd)  # releases the lock

    def _read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        if not os.path.exists(self.path):  # nothing to lock for (and no lock file left behind by a look)
            return None
        with self._locked():
            return self._read()

    def _write_temp(self, data: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: no temporary file left behind, and one line that says so
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(self.path) from e
            raise
        return tmp

    def create(self, data: bytes) -> str:
        with self._locked():
            tmp = self._write_temp(data)
            try:
                os.link(tmp, self.path)  # fails if the name exists (O_EXCL's rule), content already whole
            except FileExistsError:
                raise _Conflict() from None
            except OSError:  # a filesystem without hard links
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    raise _Conflict() from None
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, expected: str) -> str:
        with self._locked():
            cur = self._read()
            if cur is None or cur[1] != expected:
                raise _Conflict()
            os.replace(self._write_temp(data), self.path)
        return hashlib.sha256(data).hexdigest()

    def delete(self, expected: str) -> None:
        with self._locked():
            cur = self._read()
            if cur is None or cur[1] != expected:
                raise _Conflict()
            os.unlink(self.path)


class _S3Store:
    """S3: conditional writes; the version of the lease is its ETag."""

    def __init__(self, loc: Location) -> None:
        self.loc, self.fs, self.path = loc, loc.fs, loc.path

    def read(self) -> tuple[bytes, str] | None:
        # The ETag first: if the object changes before the body is read, a write conditional on
        # that ETag fails and the caller looks again; it never acts on a newer body as if older.
        try:
            etag = self.fs.info(self.path)["ETag"]
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise StorageError(f"cannot read the lease {self.loc.uri}: {type(e).__name__}: {e}") from e
        return data, etag

    def create(self, data: bytes) -> str:
        return self._put(data, mode="create")

    def replace(self, data: bytes, expected: str) -> str:
        return self._put(data, IfMatch=expected)

    def _put(self, data: bytes, **kwargs: Any) -> str:
        try:
            reply = self.fs.pipe_file(self.path, data, **kwargs)
        except FileExistsError:  # s3fs's name for a failed If-None-Match
            raise _Conflict() from None
        except FileNotFoundError:  # If-Match on an object deleted meanwhile
            raise _Conflict() from None
        except Exception as e:
            if _precondition_failed(e):
                raise _Conflict() from None
            raise StorageError(
                f"cannot write the lease {self.loc.uri}: {type(e).__name__}: {e}. A store without "
                f"conditional writes (If-None-Match, If-Match) cannot hold a lease"
            ) from e
        return (reply or {}).get("ETag") or self.fs.info(self.path)["ETag"]

    def delete(self, expected: str) -> None:
        bucket, _, key = self.path.partition("/")
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expected)
        except FileNotFoundError:
            return
        except Exception as e:
            if _precondition_failed(e):
                raise _Conflict() from None
            if _error_code(e) not in ("NotImplemented", "501"):
                raise
            # A store without conditional deletes: compare, then delete (a narrow race, only
            # with a run that took the lease over in between, which needs it expired first).
            cur = self.read()
            if cur is None:
                return
            if cur[1] != expected:
                raise _Conflict() from None
            self.fs.rm_file(self.path)


def _error_code(e: BaseException | None) -> str | None:
    """The S3 error code behind an exception s3fs translated (it keeps the ClientError as the cause)."""
    for _ in range(8):
        if e is None:
            break
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            err = resp.get("Error") or {}
            return str(err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
        e = e.__cause__ or e.__context__
    return None


def _precondition_failed(e: BaseException) -> bool:
    # 409 ConditionalRequestConflict: AWS's answer to two conditional writes at the same moment.
    return _error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
