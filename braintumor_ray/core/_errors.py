"""Exceptions that jobs turn into one clear message instead of a traceback.

One class per kind of cause (:class:`ConfigError`, :class:`StorageError`, :class:`InputError`),
and below them one per case a caller handles, carrying that case's facts as fields, so callers
and tests read ``e.holder`` or ``e.expected`` instead of matching the message. The message is
always the cause, then the fix. Fields are keyword arguments with defaults: an error pickled
across Ray's processes comes back with its message and its fields.
"""

from __future__ import annotations


class BraintumorError(Exception):
    """Base class: the message states the cause, then the fix."""


class ConfigError(BraintumorError, ValueError):
    """An option has a value the job cannot use."""


class StorageError(BraintumorError):
    """A URI cannot be read or written (missing, no credentials, unreachable endpoint)."""


class InputError(BraintumorError):
    """The input holds nothing the job can work on."""


class ImageDecodeError(ValueError):
    """One file is not a usable image; the ingest records it and carries on."""


class NoSpaceError(StorageError):
    """The storage holding ``uri`` is full (ENOSPC, a quota): the job stops with nothing
    half-written, and the next run continues from what is committed."""

    def __init__(self, uri: str) -> None:
        super().__init__(
            f"no space left on the device holding {uri}: nothing was half-written (every file beside the rows is "
            "replaced whole, and rows commit only once complete); free some space and run again, the next run "
            "continues from what is committed"
        )
        self.uri = uri

    def __reduce__(self) -> tuple[type[NoSpaceError], tuple[str]]:
        return (type(self), (self.uri,))


class LeaseError(StorageError):
    """Another run holds the output's lease, or this run lost its lease and must not commit."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease on ``output``: ``holder`` (its run id) on ``host``
    (pid ``pid``), until ``expires`` (ISO 8601, UTC) unless it renews; this run waited ``waited_s``."""

    def __init__(
        self,
        message: str,
        *,
        output: str = "",
        holder: str = "",
        host: str | None = None,
        pid: int | None = None,
        expires: str = "",
        waited_s: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.output, self.holder, self.host, self.pid = output, holder, host, pid
        self.expires, self.waited_s = expires, waited_s


class LeaseLostError(LeaseError):
    """Run ``owner`` no longer holds the lease on ``output`` (``reason``), so it commits nothing."""

    def __init__(self, message: str, *, output: str = "", owner: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.output, self.owner, self.reason = output, owner, reason


class PackageIntegrityError(ConfigError):
    """A model package's ``file`` is missing or not the bytes its package names: ``expected`` is
    the sha256 ``model.json`` (or the job's pin) gives, ``actual`` the file's (None: missing)."""

    def __init__(self, message: str, *, file: str = "", expected: str | None = None, actual: str | None = None) -> None:
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual


class UnreadableInputError(StorageError):
    """A file of the input could not be read (:meth:`~braintumor_ray.core.Location.read_limited`):
    ``path`` as the listing gave it, ``cause`` why (:func:`~braintumor_ray.core.unreadable_reason`:
    vanished, no longer a file, changed since it was listed, permission denied...). The message
    is the cause alone, which never quotes the path: it is the file's error row's reason, under
    any path mode; the filesystem's own error is chained."""

    def __init__(self, message: str, *, path: str = "", cause: str = "") -> None:
        super().__init__(message)
        self.path, self.cause = path, cause
