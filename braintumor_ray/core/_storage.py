"""Local paths and ``s3://`` URIs behind one small interface.

s3fs does the S3 work (credentials and endpoint from the usual ``AWS_*`` environment
variables, ``AWS_ENDPOINT_URL`` included); Ray Data gets the same filesystem wrapped for
pyarrow, so the driver and the workers see the same objects.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import stat
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import fsspec.asyn
import pyarrow.fs as pafs

from ._errors import ConfigError, NoSpaceError, StorageError, UnreadableInputError

_CRED_HINT = (
    "Check the URI, the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
    "or an instance role) and, for an S3-compatible store, --s3-endpoint-url or AWS_ENDPOINT_URL."
)


# The reason given for a link whose target lies outside the folder being read.
LINK_OUTSIDE = "refused: links outside --input"
# An S3 ETag as listings give it (quotes stripped): an MD5, or MD5-parts for a multipart upload.
# A version of another shape (a store without ETags falls back to the mtime) is not held to.
_ETAG = re.compile(r"[0-9a-fA-F]{32}(-[0-9]+)?")
# Control characters (C0 and DEL) in a name: an S3 listing's XML cannot carry most of them and
# normalises CR to LF (AWS's own docs), so such a key cannot be read back by the name listed; on
# disk they break every line-based log and tool that shows the name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
BAD_NAME = (
    "refused: its name is not valid UTF-8 or holds control characters (shown here with those bytes "
    "escaped as \\xNN): not read; rename the file to a UTF-8 name without control characters (e.g. "
    "`convmv -f latin1 -t utf-8`), and the next run scores it"
)


def escaped_name(path: str) -> str | None:
    """``path`` with the bytes that are not UTF-8 (a Latin-1 name on an SMB or NFS share: Python
    lists them as surrogates, and any UTF-8 encoding of the name raised) and the control
    characters written as ``\\xNN``; None when the name is fine. The same bytes give the same
    escaped name on every run, so the file's error row is found again, not written twice."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raw = path.encode("utf-8", "surrogateescape")
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", raw.decode("utf-8", "backslashreplace"))
    if _CONTROL.search(path):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)
    return None


# How many folders deep a listing descends below the input. A PACS export is
# patient/study/series/file (3 folders); 64 leaves room for any archive a person made, and stops
# a generated chain (1,100 levels crashed the recursive walk) long before PATH_MAX (4,096 bytes).
MAX_FOLDER_DEPTH = 64
MAX_FOLDER_DEPTH_LIMIT = 1000


def check_folder_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_FOLDER_DEPTH_LIMIT:
        raise ConfigError(
            f"max_folder_depth={depth!r} is out of range: use a whole number of folders, 1..{MAX_FOLDER_DEPTH_LIMIT}"
        )


def too_deep_version(limit: int) -> str:
    """The listed version of a folder refused for its depth: the same while the limit is (a refused
    folder has no bytes to version, and with none its error row was written again by every run)."""
    return f"too-deep;max_folder_depth={limit}"


def too_deep_reason(level: int, limit: int) -> str:
    return (
        f"refused: a folder {level} levels below the input, deeper than max_folder_depth={limit}: its files "
        "are not read (move them up, or raise max_folder_depth)"
    )


class ChangedSinceListed(OSError):
    """The file or object at a listed path is no longer the one listed: replaced by a link,
    another file or new content between the listing and the read. Its row is an error whose
    reason starts ``unreadable``, so that the next run reads it again."""


@dataclass(frozen=True)
class Listing:
    """A folder's files: path -> (size, version), and the entries refused as files, path ->
    reason (links leaving the folder, dangling links, FIFOs and devices, folders that cannot be
    listed). A refused entry has a (size, version) too (the link's own), so that it can have a
    row like any file; directory links are neither: they are not files, and are not followed."""

    files: dict[str, tuple[int, str]]
    refused: dict[str, str]


def _local_file(path: str, root: str, follow_links_outside: bool) -> tuple[tuple[int, str], str | None] | None:
    """One listed entry that is not a folder: ((size, version), why it is refused or None), or
    None when it is not a file after all (gone, a folder now, a link to a folder)."""
    try:
        st = own = os.lstat(path)
    except FileNotFoundError:
        return None  # gone while listing
    except OSError as e:
        return (0, ""), f"unreadable: {type(e).__name__}"
    if stat.S_ISDIR(own.st_mode):
        return None  # a file swapped for a folder while listing: not a file
    if stat.S_ISLNK(own.st_mode):
        target = os.path.realpath(path)
        try:
            st = os.stat(path)
        except OSError:
            return (own.st_size, str(own.st_mtime)), "refused: a dangling link (its target does not exist)"
        if stat.S_ISDIR(st.st_mode):
            return None  # a directory link
        if not follow_links_outside and os.path.commonpath([root, target]) != root:
            return (own.st_size, str(own.st_mtime)), (
                f"{LINK_OUTSIDE} (this link points to a file outside the input "
                "folder; set guard.follow_links_outside_input to read it)"
            )
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        return (0, str(st.st_mtime)), f"refused: not a regular file ({kind})"
    return (st.st_size, local_version(st)), None


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

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        return Location(uri=self.uri_of(path), path=path, fs=self.fs, is_s3=self.is_s3)

    def uri_of(self, path: str) -> str:
        """The user-facing URI of a path inside this location's filesystem."""
        return f"s3://{path}" if self.is_s3 else path

    def sibling(self, suffix: str) -> Location:
        """The location beside this one named as it is plus ``suffix`` (``OUTPUT`` ->
        ``OUTPUT_series``, ``OUTPUT._staging``, ``OUTPUT._lease.json``), a trailing slash of this
        one dropped first: what a job writes next to its output, outside any glob over it."""
        if not suffix or "/" in suffix:
            raise ValueError(f"sibling suffix {suffix!r} must be a non-empty name part without '/'")
        path = self.path.rstrip("/") + suffix
        return Location(uri=self.uri.rstrip("/") + suffix, path=path, fs=self.fs, is_s3=self.is_s3)

    def exists(self) -> bool:
        return _guard(self, "check", self.fs.exists, self.path)

    def read_bytes(self) -> bytes:
        return _guard(self, "read", self.fs.cat_file, self.path)

    def make_folder(self) -> None:
        """This location as a folder, made on disk with its parents (S3 has no folders: nothing)."""
        if not self.is_s3:
            _guard(self, "write", os.makedirs, self.path, exist_ok=True)

    def write_bytes(self, data: bytes, *, parents: bool = True) -> None:
        """``parents=False``: on disk, a folder that is gone stays gone (the write fails): how a
        worker that outlived its run is kept from bringing back the staging it wrote into."""
        if not self.is_s3 and parents:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with _guard(self, "write", self.fs.open, self.path, "wb") as f:
            f.write(data)

    def write_atomic(self, data: bytes, *, parents: bool = True) -> None:
        """Write this file so that a reader (or the next run) finds the old content or the new,
        whole: on disk a temporary file beside it, fsynced, renamed over it; on S3 one PUT
        (an object appears whole). A full disk is a :class:`StorageError` of one line, and
        leaves the old file and no temporary one. ``parents``: as for :meth:`write_bytes`."""
        if self.is_s3:
            return self.write_bytes(data)
        folder = os.path.dirname(self.path) or "."
        tmp = os.path.join(folder, f".{os.path.basename(self.path)}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            if parents:
                os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with _quiet():
                os.unlink(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpaceError(self.uri) from e
            raise StorageError(
                f"cannot write {self.uri}: {type(e).__name__}: {e}. Check the path and its permissions."
            ) from e

    def remove(self) -> None:
        """Delete this folder or file and everything under it."""
        if self.exists():
            _guard(self, "delete", self.fs.rm, self.path, recursive=True)

    def files(self) -> list[str]:
        """Every file under this folder, as paths in ``fs``, sorted."""
        return sorted(self.file_sizes())

    def file_sizes(self, *, missing_ok: bool = False) -> dict[str, int]:
        """Every file under this folder, as paths in ``fs``, with its size in bytes: one listing
        (none, with ``missing_ok``, when the folder does not exist)."""
        if not self.exists():
            if missing_ok:
                return {}
            raise StorageError(f"{self.uri} does not exist. {_CRED_HINT if self.is_s3 else ''}".strip())
        found = _guard(self, "list", self.fs.find, self.path, withdirs=False, detail=True)
        return {p: int(info.get("size") or 0) for p, info in sorted(found.items())}

    def files_with_versions(self) -> dict[str, tuple[int, str]]:
        """Every readable file under this folder: path -> (size, version). The version changes
        when the content is rewritten: the ETag on S3, on disk the modification time, inode and
        change time (:func:`local_version`). What
        :meth:`listing` refuses is left out."""
        listed = self.listing()
        return {p: v for p, v in listed.files.items() if p not in listed.refused}

    def listing(self, *, follow_links_outside: bool = False, max_depth: int = MAX_FOLDER_DEPTH) -> Listing:
        """Every file under this folder with its (size, version), and what is refused as a file.

        On disk (``os.lstat``, ``os.path.realpath``): a link to a file is read through, as its
        target's size and modification time, when the target lies inside this folder (or
        ``follow_links_outside``); a link leaving the folder, a dangling link, a FIFO, socket or
        device (reading one can block forever) and a folder that cannot be listed are refused;
        links to directories are not files and are not followed. S3 has no links.

        The walk is a loop over a stack, not a recursion (``os.walk`` recursed: a chain of 1,100
        folders raised RecursionError and failed the whole run); a folder more than
        ``max_depth`` levels below this one is refused, as one entry naming it, unread.
        """
        check_folder_depth(max_depth)
        if not self.exists():
            raise StorageError(f"{self.uri} does not exist. {_CRED_HINT if self.is_s3 else ''}".strip())
        listed = self._s3_listing(max_depth) if self.is_s3 else self._local_listing(follow_links_outside, max_depth)
        return _refuse_bad_names(listed)

    def _local_listing(self, follow_links_outside: bool, max_depth: int) -> Listing:
        root = os.path.realpath(self.path)
        files: dict[str, tuple[int, str]] = {}
        refused: dict[str, str] = {}
        stack = [(self.path, 0)]
        while stack:
            folder, depth = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as e:
                where = e.filename or folder
                # The folder's own version (a chmod changes it): recorded once, tried again only when
                # it changes, not an error row and a Ray start on every run as with no version.
                try:
                    version = local_version(os.stat(where))
                except OSError:
                    version = "unlistable"
                files[where], refused[where] = (
                    (0, version),
                    (f"refused: a folder that cannot be listed ({type(e).__name__}), its files are not read"),
                )
                continue
            for entry in entries:
                path = entry.path
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)  # directory links are never descended
                except OSError:
                    is_dir = False
                if is_dir:
                    if depth + 1 > max_depth:
                        files[path], refused[path] = (
                            (0, too_deep_version(max_depth)),
                            too_deep_reason(depth + 1, max_depth),
                        )
                    else:
                        stack.append((path, depth + 1))
                    continue
                found = _local_file(path, root, follow_links_outside)
                if found is not None:
                    files[path] = found[0]
                    if found[1]:
                        refused[path] = found[1]
        return Listing(dict(sorted(files.items())), refused)

    def _s3_listing(self, max_depth: int) -> Listing:
        info = _guard(self, "list", self.fs.find, self.path, withdirs=False, detail=True)
        out: dict[str, tuple[int, str]] = {}
        refused: dict[str, str] = {}
        base = self.path.rstrip("/") + "/"
        for path, d in info.items():
            parts = path[len(base) :].split("/") if path.startswith(base) else [path]
            if len(parts) - 1 > max_depth:  # keys are flat: the cap is for the files' sake, as on disk
                folder = base + "/".join(parts[: max_depth + 1])
                out[folder], refused[folder] = (
                    (0, too_deep_version(max_depth)),
                    too_deep_reason(max_depth + 1, max_depth),
                )
                continue
            version = d.get("ETag") or d.get("etag") or d.get("mtime") or d.get("LastModified") or ""
            out[path] = (int(d.get("size") or 0), str(version).strip('"'))
        return Listing(dict(sorted(out.items())), refused)

    def read_limited(
        self, path: str, limit: int, *, version: str | None = None, follow_links_outside: bool = False
    ) -> bytes:
        """One file under this location, at most ``limit`` + 1 bytes of it (more than ``limit``
        says the file is larger: the caller refuses it). A file that cannot be read raises
        :class:`UnreadableInputError` (its ``path``, and the ``cause`` its error row gives), the
        filesystem's error (FileNotFoundError when it vanished, IsADirectoryError...) chained; on
        disk a file that is no longer a regular one (a FIFO now) is refused without blocking.

        ``version``: what the listing recorded. The file read must be that one, else the cause is
        :class:`ChangedSinceListed`: on disk the opened file's own ``fstat`` (inode, mtime and
        change time, :func:`local_version`), so that a file swapped for a link or another file
        after the listing is never read under the listed name; on S3 the object's ETag, sent as
        ``If-Match`` and compared with the GET's own. Links: the file is opened ``O_NOFOLLOW``;
        one that is a link (the listing reads links inside the folder through) is opened at its
        resolved target, which must lie inside this folder unless ``follow_links_outside``.
        """
        try:
            if self.is_s3:
                return self._read_s3(path, limit, version)
            return self._read_local(path, limit, version, follow_links_outside)
        except Exception as e:
            cause = unreadable_reason(e)
            raise UnreadableInputError(cause, path=path, cause=cause) from e

    def _read_local(self, path: str, limit: int, version: str | None, follow_links_outside: bool) -> bytes:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags | nofollow)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            target = os.path.realpath(path)
            root = os.path.realpath(self.path)
            if not follow_links_outside and os.path.commonpath([root, target]) != root:
                raise ChangedSinceListed(
                    f"{LINK_OUTSIDE} (a link to a file outside the input folder when it was read)"
                ) from None
            fd = os.open(target, flags | nofollow)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(21, "Is a directory", path)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"not a regular file any more ({stat.filemode(st.st_mode)})")
            if version and ";" in version and local_version(st) != version:
                raise ChangedSinceListed("its inode, modification or change time differ from the listing's")
            with open(fd, "rb", closefd=False) as f:
                want = min(st.st_size, limit) + 1
                data = f.read(want)
                if len(data) == want and want <= limit:  # grown since: read on, up to the limit
                    data += f.read(limit + 1 - want)
                return data
        finally:
            os.close(fd)

    def _read_s3(self, path: str, limit: int, version: str | None) -> bytes:
        etag = version if version and _ETAG.fullmatch(version) else None
        if etag is None:  # a store whose listing gave no ETag: nothing to hold the read to
            return self.fs.cat_file(path, start=0, end=limit + 1)  # one ranged GET
        bucket, key, _ = self.fs.split_path(path)
        fs = self.fs

        async def get() -> tuple[bytes, str]:
            resp = await fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{limit}", IfMatch=f'"{etag}"'
            )
            try:
                return await resp["Body"].read(), str(resp.get("ETag") or "").strip('"')
            finally:
                resp["Body"].close()

        try:
            data, got = fsspec.asyn.sync(fs.loop, get)
        except OSError as e:
            if e.errno == errno.EINVAL and "recondition" in str(e.__cause__ or e):  # 412: If-Match failed
                raise ChangedSinceListed("its ETag differs from the listing's") from None
            raise
        if got and got != etag:  # a store that ignores If-Match
            raise ChangedSinceListed("its ETag differs from the listing's")
        return data

    def move_to(self, other: Location) -> None:
        """Move one file. On disk a rename (atomic); on S3 a copy then a delete, so a reader
        sees either no object or the whole one."""
        if not self.is_s3:
            os.makedirs(os.path.dirname(other.path) or ".", exist_ok=True)
            os.replace(self.path, other.path)
            return
        _guard(self, "copy", self.fs.copy, self.path, other.path)
        _guard(self, "delete", self.fs.rm, self.path)

    def is_empty(self) -> bool:
        # Immediate children, not files to a fixed depth: a folder whose files all sit deeper (a
        # PACS export's patient/study/series/file) once counted as empty, and was written into.
        return not self.exists() or not _guard(self, "list", self.fs.ls, self.path, detail=False)


def _refuse_bad_names(listed: Listing) -> Listing:
    """Each entry whose name :func:`escaped_name` escapes becomes a refused entry under the escaped
    name (never read: nothing downstream holds the raw name); an entry already refused keeps its
    own reason."""
    if not any(escaped_name(p) for p in listed.files):
        return listed
    files: dict[str, tuple[int, str]] = {}
    refused: dict[str, str] = {}
    for path, version in listed.files.items():
        shown = escaped_name(path)
        files[shown or path] = version
        if path in listed.refused:
            refused[shown or path] = listed.refused[path]
        elif shown is not None:
            refused[shown] = BAD_NAME
    return Listing(dict(sorted(files.items())), refused)


class _quiet:
    """``with _quiet():`` ignores OSError (cleaning up after a failed write)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, *_: object) -> bool:
        return kind is not None and issubclass(kind, OSError)


def local_version(st: os.stat_result) -> str:
    """A local file's version: ``mtime;inode;ctime_ns``. The mtime alone misses a rewrite that
    keeps it (``cp -p``, ``rsync -a``, tar, a coarse-mtime mount); the change time cannot be set
    back by a user, and a replacement by rename (rsync, tar) is a new inode. A chmod also
    changes the ctime: the file is then read and hashed again, and dropped when its bytes are
    the same."""
    return f"{st.st_mtime};{st.st_ino};{st.st_ctime_ns}"


def same_version(prior: str | None, now: str | None) -> bool:
    """Whether a file listed with version ``now`` is the one a row recorded as ``prior``. No
    version (a store that gives none) never matches: the file is read and hashed. A row written
    before :func:`local_version` holds the mtime alone and is compared by it, as it was then."""
    if not prior or not now:
        return False
    if ";" not in prior and ";" in now:
        return prior == now.split(";", 1)[0]
    return prior == now


def is_no_space(e: BaseException | None) -> bool:
    """Whether ``e`` or an exception it was raised from (a Ray task's wrapped error included)
    is storage that is full."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, NoSpaceError) or isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "[Errno 28]" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def unreadable_reason(e: BaseException) -> str:
    """Why a listed file could not be read (:meth:`Location.read_limited`), in words that never
    quote its path: the reason on the file's error row."""
    if isinstance(e, FileNotFoundError):
        return "vanished: listed, then gone before it was read (moved or deleted while the job ran)"
    if isinstance(e, IsADirectoryError):
        return "unreadable: no longer a file (a folder now)"
    if isinstance(e, ChangedSinceListed):
        return f"unreadable: changed since it was listed ({e.args[0]}): not read; the next run reads it again"
    if isinstance(e, PermissionError):
        return "unreadable: permission denied"
    if isinstance(e, OSError):
        detail = e.strerror or ("" if e.filename else str(e))
        return f"unreadable: {type(e).__name__}" + (f": {detail}" if detail else "")
    return f"unreadable: {type(e).__name__}: {str(e)[:300]}"  # an object store's own errors


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
        raise StorageError(
            f"cannot {verb} {loc.uri}: it does not exist ({e}). {_CRED_HINT if loc.is_s3 else ''}".strip()
        ) from e
    except Exception as e:  # botocore/aiohttp raise many unrelated types
        name = type(e).__name__
        hint = _CRED_HINT if loc.is_s3 else "Check the path and its permissions."
        if "Credential" in name:
            hint = "No AWS credentials were found. " + _CRED_HINT
        raise StorageError(f"cannot {verb} {loc.uri}: {name}: {e}. {hint}") from e


# --- input and output must not overlap ----------------------------------------------------------

_S3_SCHEMES = ("s3://", "s3a://", "s3n://")


def canonical(x: Location | str) -> tuple[str, tuple[str, ...]]:
    """The one form of the place a URI names, as (filesystem, path components): what the lease
    and :func:`check_disjoint` compare, so that two spellings of one folder are one place.

    Local: ``file://`` and ``~`` expanded, made absolute, every link resolved by
    ``os.path.realpath`` (which also resolves the nearest existing parent of a path that does not
    exist yet). S3: the bucket and the key as written (``s3a://``/``s3n://`` read as ``s3://``,
    slashes collapsed, trailing ones dropped); an S3 key may hold ``..`` as plain characters.
    """
    uri = (x.uri if isinstance(x, Location) else str(x)).strip()
    low = uri.lower()
    for scheme in _S3_SCHEMES:
        if low.startswith(scheme):
            return "s3", tuple(p for p in uri[len(scheme) :].split("/") if p)
    path = uri[len("file://") :] if low.startswith("file://") else uri
    real = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
    return "file", tuple(p for p in real.split(os.sep) if p)


def canonical_location(loc: Location) -> Location:
    """``loc`` under its :func:`canonical` form (its real path; bucket and key), same filesystem."""
    kind, parts = canonical(loc)
    path = "/".join(parts) if kind == "s3" else os.sep + os.sep.join(parts)
    return Location(uri=loc.uri_of(path), path=path, fs=loc.fs, is_s3=loc.is_s3)


def _forms(x: Location | str) -> list[tuple[str, tuple[str, ...]]]:
    """The places a URI can name, for :func:`check_disjoint`: its :func:`canonical` form and, on
    S3, the key with ``..`` resolved too (what a person means): a refusal needs only one of them
    to overlap."""
    kind, parts = canonical(x)
    if kind == "s3":
        resolved = tuple(p for p in posixpath.normpath("/" + "/".join(parts)).split("/") if p)
        return [("s3", resolved), ("s3", parts)]  # the message names the first that overlaps
    return [(kind, parts)]


def _overlap(a: Location | str, b: Location | str) -> str | None:
    """How ``b`` relates to ``a`` when they overlap ("is", "lies inside", "contains"), else None."""
    for fa, pa_ in _forms(a):
        for fb, pb in _forms(b):
            if fa != fb:
                continue
            if pa_ == pb:
                return "is"
            if pb[: len(pa_)] == pa_:  # components, not characters: /a/pre is not in /a/prefix
                return "lies inside"
            if pa_[: len(pb)] == pb:
                return "contains"
    return None


def check_disjoint(
    input: Location | str,
    output: Location | str,
    *,
    siblings: Sequence[str] = (),
    input_name: str = "input",
    output_name: str = "output",
) -> None:
    """Refuse an output that is, contains or lies inside the input (a ConfigError naming both).

    ``siblings``: suffixes of the folders a job writes beside the output (``OUTPUT_series``,
    ``OUTPUT._staging``); they must not overlap the input either. Pure: nothing is listed,
    read or written, so jobs call it before they touch storage (and before ``--overwrite``
    deletes anything). See :func:`_forms` for what is normalised.
    """
    in_uri = input.uri if isinstance(input, Location) else str(input).strip()
    out_uri = output.uri if isinstance(output, Location) else str(output).strip()
    candidates = [(out_uri, "")] + [(out_uri.rstrip("/") + s, s) for s in siblings]
    for uri, suffix in candidates:
        how = _overlap(in_uri, uri)
        if how is None:
            continue
        what = (
            f"{output_name} {out_uri}"
            if not suffix
            else (f"the folder {uri} that the job writes beside {output_name} {out_uri}")
        )
        relation = "is the same folder as" if how == "is" else how
        raise ConfigError(
            f"{what} {relation} the {input_name} {in_uri} (after resolving links, s3a://, '..' and trailing "
            f"slashes): the job would read what it writes, and replacing the {output_name} could delete the "
            f"{input_name}. Choose another {output_name}, outside the {input_name} folder (e.g. beside it)."
        )
