"""How outputs name input files and DICOM UIDs: as they are, relative to the input, or as keyed hashes.

PACS exports often name folders after the patient (``DOE^JOHN_12345/...``), and every output of
the ingest and of scoring names the files it read. :class:`Identifiers` is the one mapping each
output applies to a file's URI and to DICOM UIDs:

- path mode ``full``: the URI as listed (your own archive, outputs that stay with it);
- ``relative``: the path below the input root (outputs leave the machine; the folder and file
  names below the root still show);
- ``hashed``: ``hmac:`` + 32 hex digits of HMAC-SHA256 of the full URI under a secret key read
  from :data:`PATH_KEY_ENV`. The same URI gives the same token in every run and on every machine
  holding the key (so reruns skip what is done, and the ingest's and scoring's outputs join), and
  nothing of the name, not even its extension, is in the token.
- UID mode ``hashed``: a DICOM UID becomes ``2.25.<decimal of 128 bits of HMAC-SHA256>``, itself a
  valid UID (the 2.25 root is for UUID-derived UIDs), so equal UIDs still group a series.

Pure: no storage, no Ray. The key never appears in a repr, a log line or an output; only
:attr:`Identifiers.key_id`, a keyed hash of a constant, says which key was used.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args, overload

from ._errors import ConfigError

PathMode = Literal["full", "relative", "hashed"]
UidMode = Literal["full", "hashed"]
PATH_KEY_ENV = "BRAINTUMOR_PATH_KEY"
# 32 characters of `openssl rand -hex 32` are 128 bits: a short, typed key could be guessed by
# hashing likely paths (patient names under a known root) until a token matches.
MIN_KEY_CHARS = 32
PATH_TOKEN_PREFIX = "hmac:"
# 128 bits of the HMAC: no collision in any archive (2^64 files for even odds).
_TOKEN_HEX = 32
_REDACTED = "[redacted]"
# How exports join the parts of a name in a folder name: DICOM's person-name separators (^ =),
# underscores, dashes, dots and spaces (DOE^JOHN_12345, Doe-John.1941).
_NAME_SEPARATORS = re.compile(r"[\^=_\-.\s]+")


@dataclass(frozen=True)
class Identifiers:
    """The mapping an output applies to input file URIs (:meth:`path`), DICOM UIDs (:meth:`uid`)
    and the messages that may quote a file's path (:meth:`scrub`). ``root``: the input's URI."""

    path_mode: PathMode = "full"
    uid_mode: UidMode = "full"
    root: str = ""
    key: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        check_modes(self.path_mode, self.uid_mode)
        if self.hashes and len(self.key) < MIN_KEY_CHARS:
            raise ConfigError(_key_message(f"a key of at least {MIN_KEY_CHARS} characters is needed"))
        object.__setattr__(self, "root", self.root.rstrip("/"))

    @classmethod
    def from_env(
        cls, path_mode: str = "full", uid_mode: str = "full", *, root: str = "", env: Mapping[str, str] | None = None
    ) -> Identifiers:
        """The mapping for these modes; the key is read from :data:`PATH_KEY_ENV` only when a mode hashes."""
        check_modes(path_mode, uid_mode)
        key = b""
        if "hashed" in (path_mode, uid_mode):
            value = (os.environ if env is None else env).get(PATH_KEY_ENV, "").strip()
            if not value:
                raise ConfigError(_key_message(f"{PATH_KEY_ENV} is not set"))
            if len(value) < MIN_KEY_CHARS:
                raise ConfigError(
                    _key_message(f"{PATH_KEY_ENV} has {len(value)} characters, fewer than {MIN_KEY_CHARS}")
                )
            key = value.encode()
        return cls(path_mode, uid_mode, root, key)  # type: ignore[arg-type]

    @property
    def hashes(self) -> bool:
        return "hashed" in (self.path_mode, self.uid_mode)

    @property
    def is_identity(self) -> bool:
        return self.path_mode == "full" and self.uid_mode == "full"

    @property
    def key_id(self) -> str | None:
        """Which key hashed an output (16 hex digits), None when nothing is hashed: outputs with
        equal key ids have comparable tokens. It reveals nothing the tokens do not."""
        return self._mac(b"key-id\x00", b"")[:16] if self.hashes else None

    def describe(self) -> dict[str, str | None]:
        """What an output records about its names (never the key)."""
        return {"path_mode": self.path_mode, "uid_mode": self.uid_mode, "key_id": self.key_id}

    def path(self, uri: str) -> str:
        """A file's URI as the outputs show it."""
        if self.path_mode == "full":
            return uri
        if self.path_mode == "relative":
            return self._relative(uri)
        return PATH_TOKEN_PREFIX + self._mac(b"path\x00", uri.encode())[:_TOKEN_HEX]

    def uid(self, value: str | None) -> str | None:
        """A DICOM UID as the outputs show it (None stays None)."""
        if value is None or self.uid_mode == "full":
            return value
        return "2.25." + str(int(self._mac(b"uid\x00", value.encode())[:_TOKEN_HEX], 16))

    @overload
    def scrub(self, message: str, uri: str) -> str: ...
    @overload
    def scrub(self, message: None, uri: str) -> None: ...
    def scrub(self, message: str | None, uri: str) -> str | None:
        """A message about the file at ``uri`` with its path shown as :meth:`path` shows it; in
        hashed mode also every folder and file name below the root, and their parts (split at
        ``^ = _ - .`` and spaces), in case a decoder quoted one alone."""
        if not message or self.path_mode == "full":
            return message
        shown = self.path(uri)
        bare = uri.split("://", 1)[1] if "://" in uri else None  # s3://b/k as the filesystem spells it
        for raw in (uri, bare):
            if raw:
                message = message.replace(raw, shown)
        if self.path_mode == "hashed":
            parts = {p for p in self._relative(uri).split("/") if len(p) >= 3}
            parts |= {q for p in list(parts) for q in _NAME_SEPARATORS.split(p) if len(q) >= 3}
            if parts:
                words = "|".join(re.escape(p) for p in sorted(parts, key=len, reverse=True))
                # Whole words only: a folder "dcm" must not cut "dcmread" in half.
                message = re.sub(f"(?<![A-Za-z0-9])(?:{words})(?![A-Za-z0-9])", _REDACTED, message)
        return message

    def _relative(self, uri: str) -> str:
        if self.root and uri.startswith(self.root + "/"):
            return uri[len(self.root) + 1 :]
        # Not below the root (never for a listed file): its name alone, never the folders above.
        return uri.rstrip("/").rsplit("/", 1)[-1]

    def _mac(self, domain: bytes, data: bytes) -> str:
        # A domain prefix per kind: a path and a UID with the same text get different tokens.
        return hmac.new(self.key, domain + data, hashlib.sha256).hexdigest()


def check_modes(path_mode: str, uid_mode: str) -> None:
    if path_mode not in get_args(PathMode):
        raise ConfigError(f"path_mode={path_mode!r} is unknown: use one of {', '.join(get_args(PathMode))}")
    if uid_mode not in get_args(UidMode):
        raise ConfigError(f"uid_mode={uid_mode!r} is unknown: use one of {', '.join(get_args(UidMode))}")


def _key_message(cause: str) -> str:
    return (
        f"hashed path or UID mode needs a secret key: {cause}. Set it in the job's environment, e.g. "
        f"`export {PATH_KEY_ENV}=$(openssl rand -hex 32)` once, then keep it secret and keep the same value for "
        "every run and machine whose outputs must match (a new key names every file anew)"
    )
