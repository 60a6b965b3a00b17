"""Exceptions that jobs turn into one clear message instead of a traceback."""


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
