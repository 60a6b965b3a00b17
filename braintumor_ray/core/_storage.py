"""Local paths and ``s3://`` URIs behind one small interface.

s3fs does the S3 work (credentials and endpoint from the usual ``AWS_*`` environment
variables, ``AWS_ENDPOINT_URL`` included); Ray Data gets the same filesystem wrapped for
pyarrow, so the driver and the workers see the same objects.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.fs as pafs

from ._errors import StorageError

_CRED_HINT = (
    "Check the URI, the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
    "or an instance role) and, for an S3-compatible store, --s3-endpoint-url or AWS_ENDPOINT_URL."
)


@dataclass(frozen=True)
class Location:
    """A folder or file on local disk or S3: ``fs`` plus a path in ``fs``'s own terms."""

    uri: str
    path: str
    fs: fsspec.AbstractFileSystem = field(repr=False, compare=False)
    is_s3: bool = False

    @property
    def pyarrow_fs(self) -> pafs.FileSystem:
        if self.is_s3:
            return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))
        return pafs.LocalFileSystem()

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        return Location(uri=self.uri_of(path), path=path, fs=self.fs, is_s3=self.is_s3)

    def uri_of(self, path: str) -> str:
        """The user-facing URI of a path inside this location's filesystem."""
        return f"s3://{path}" if self.is_s3 else path

    def exists(self) -> bool:
        return _guard(self, "check", self.fs.exists, self.path)

    def read_bytes(self) -> bytes:
        return _guard(self, "read", self.fs.cat_file, self.path)

    def write_bytes(self, data: bytes) -> None:
        if not self.is_s3:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with _guard(self, "write", self.fs.open, self.path, "wb") as f:
            f.write(data)

    def remove(self) -> None:
        """Delete this folder or file and everything under it."""
        if self.exists():
            _guard(self, "delete", self.fs.rm, self.path, recursive=True)

    def files(self) -> list[str]:
        """Every file under this folder, as paths in ``fs``, sorted."""
        if not self.exists():
            raise StorageError(f"{self.uri} does not exist. {_CRED_HINT if self.is_s3 else ''}".strip())
        return sorted(_guard(self, "list", self.fs.find, self.path, withdirs=False))

    def files_with_versions(self) -> dict[str, tuple[int, str]]:
        """Every file under this folder: path -> (size, version). The version changes when the
        content is rewritten: the ETag on S3, the modification time on disk."""
        if not self.exists():
            raise StorageError(f"{self.uri} does not exist. {_CRED_HINT if self.is_s3 else ''}".strip())
        info = _guard(self, "list", self.fs.find, self.path, withdirs=False, detail=True)
        out = {}
        for path, d in info.items():
            version = d.get("ETag") or d.get("etag") or d.get("mtime") or d.get("LastModified") or ""
            out[path] = (int(d.get("size") or 0), str(version).strip('"'))
        return dict(sorted(out.items()))

    def move_to(self, other: "Location") -> None:
        """Move one file. On disk a rename (atomic); on S3 a copy then a delete, so a reader
        sees either no object or the whole one."""
        if not self.is_s3:
            os.makedirs(os.path.dirname(other.path) or ".", exist_ok=True)
            os.replace(self.path, other.path)
            return
        _guard(self, "copy", self.fs.copy, self.path, other.path)
        _guard(self, "delete", self.fs.rm, self.path)

    def is_empty(self) -> bool:
        return not self.exists() or not _guard(self, "list", self.fs.find, self.path, maxdepth=2)


def s3_filesystem(endpoint_url: str | None = None) -> fsspec.AbstractFileSystem:
    # Listings are not cached: Ray workers write through their own instances, and a cached
    # listing in the driver would miss their files.
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    return fsspec.filesystem("s3", **kwargs)


def resolve(uri: str, *, s3_endpoint_url: str | None = None) -> Location:
    """Turn a user's URI (local path, ``file://`` or ``s3://bucket/prefix``) into a Location."""
    if not uri or not uri.strip():
        raise StorageError("empty URI: give a local path or s3://bucket/prefix")
    uri = uri.strip()
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        path = uri.split("://", 1)[1].rstrip("/")
        if not path or path.startswith("/"):
            raise StorageError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        fs = s3_filesystem(s3_endpoint_url)
        return Location(uri=f"s3://{path}", path=path, fs=fs, is_s3=True)
    if "://" in uri and not uri.startswith("file://"):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path or s3://")
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return Location(uri=path, path=path, fs=fsspec.filesystem("file"), is_s3=False)


def _guard(loc: Location, verb: str, fn, *args, **kwargs):
    """Run one storage call; turn the many S3/OS failures into one StorageError."""
    try:
        return fn(*args, **kwargs)
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"cannot {verb} {loc.uri}: it does not exist ({e}). {_CRED_HINT if loc.is_s3 else ''}".strip()) from e
    except Exception as e:  # botocore/aiohttp raise many unrelated types
        name = type(e).__name__
        hint = _CRED_HINT if loc.is_s3 else "Check the path and its permissions."
        if "Credential" in name:
            hint = "No AWS credentials were found. " + _CRED_HINT
        raise StorageError(f"cannot {verb} {loc.uri}: {name}: {e}. {hint}") from e
