"""Listing sources: local folders, tar/zip archives, S3 and OSS prefixes.

Each yields :class:`~workers.message.ImageRef` lazily, in a deterministic order, so a re-run of
the same command yields the same sequence (chunk ids depend on position):

* **folders**: depth-first, entries of each directory sorted by name (byte order of the raw
  name). Memory: the names of one directory per level being walked. Directory symlinks are not
  followed (loops); a file symlink whose target is outside the folder is listed *refused*
  (``local.link``: one row, never read), and so is a subfolder that cannot be read
  (``local.input``).
* **archives**: the archive's own member order (a listing sorted by name would need every name
  in memory; the archive order is fixed and is the order workers read fastest). Tar is read as
  a stream (compressed or not); zip from its central directory. A member with an image name
  that is a link, device or directory, or a second member of a name already listed, is listed
  refused (``local.archive``); an archive damaged after its first member ends its listing with
  one refused item for the archive itself, naming the member after which it broke. Names already
  listed are remembered on disk (:class:`~producers.sources.seen.DigestSet`): memory stays flat.
* **object stores**: the store's listing order (UTF-8 byte order of keys), 1000 keys a page.

Names that are not UTF-8 (GBK names from Windows tools) are listed like any other: their URIs
carry the raw bytes as ``%XX`` (see :mod:`workers.storage.uris`), so ids are stable and workers
open the same file or member.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from datetime import datetime

from producers.sources.filters import Filter, inside
from producers.sources.seen import DigestSet
from workers.errors import InputError
from workers.message import ImageRef
from workers.storage.archives import close_zip, compression_of, open_zip, tar_kind
from workers.storage.objects import ObjectInfo, ObjectStore
from workers.storage.uris import archive_uri, file_uri, object_uri

__all__ = [
    "ARCHIVE_SUFFIXES",
    "archive_kind",
    "iter_archive",
    "iter_folder",
    "iter_listed_objects",
    "iter_objects",
]

ARCHIVE_SUFFIXES = {
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".tar.bz2": "tar",
    ".tbz2": "tar",
    ".tar.xz": "tar",
    ".txz": "tar",
    ".zip": "zip",
}


def archive_kind(path: str) -> str | None:
    """``tar``, ``zip`` or None, from the file name."""
    lower = path.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    return None


def iter_folder(root: str, flt: Filter) -> Iterator[ImageRef]:
    root = os.path.abspath(root)
    yield from _walk(root, root, "", flt)


def _walk(root: str, directory: str, rel: str, flt: Filter) -> Iterator[ImageRef]:
    try:
        with os.scandir(directory) as it:
            entries = sorted(
                ((e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it),
                key=lambda t: t[0].encode("utf-8", "surrogateescape"),
            )
    except OSError as exc:
        if directory == root:
            raise InputError(f"folder {directory!r} unreadable ({type(exc).__name__})") from None
        # One row for what could not be listed, instead of losing the rest of the folder.
        why = f"subfolder unreadable ({type(exc).__name__}); its images were not listed"
        yield ImageRef(file_uri(directory), refused=("local.input", why))
        return
    for name, is_dir, is_link in entries:
        path = os.path.join(directory, name)
        relative = f"{rel}{name}"
        if is_dir:
            yield from _walk(root, path, relative + "/", flt)
            continue
        if not flt.name_ok(relative):
            continue
        if is_link and not inside(root, path):
            why = "a symbolic link to a file outside the folder; not read"
            yield ImageRef(file_uri(path), refused=("local.link", why))
            continue
        modified = None
        if flt.has_time:
            try:
                st = os.stat(path)
            except OSError:
                continue  # vanished or dangling: nothing to send
            if not stat.S_ISREG(st.st_mode):
                continue
            modified = Filter.from_timestamp(st.st_mtime)
        if flt.time_ok(relative, modified):
            yield ImageRef(file_uri(path))


def iter_archive(path: str, flt: Filter) -> Iterator[ImageRef]:
    """Members of a tar or zip archive. Raises :class:`InputError` when the archive cannot be
    opened or its first entry read; damage after that ends the listing with one refused item."""
    path = os.path.abspath(path)
    kind = archive_kind(path)
    listed = 0
    try:
        with DigestSet() as seen:
            members = _zip_members(path, flt, seen) if kind == "zip" else _tar_members(path, flt, seen)
            for ref in members:
                listed += 1
                yield ref
    except Exception as exc:  # STREAM_ERRORS, and what else hostile bytes make tarfile raise
        if listed == 0:
            raise InputError(f"archive {path!r} unreadable ({type(exc).__name__}: {exc})") from None
        why = f"the archive is damaged after entry {listed} ({type(exc).__name__}); the rest is not listed"
        yield ImageRef(file_uri(path), refused=("local.archive", why))


def _occurrence(kind: str, path: str, name: str, seen: DigestSet) -> ImageRef | None:
    """None for the first entry of ``name``; a refused ref (with an id of its own) for a later one."""
    if seen.add(name.encode("utf-8", "surrogateescape")):
        return None
    n = 2
    while not seen.add(f"{n}#".encode() + name.encode("utf-8", "surrogateescape")):
        n += 1
    why = f"a second entry named {name!r}; only the first is read"
    return ImageRef(archive_uri(kind, path, name, occurrence=n), refused=("local.archive", why))


def _tar_members(path: str, flt: Filter, seen: DigestSet) -> Iterator[ImageRef]:
    with open(path, "rb") as fh:
        head = fh.read(6)
    # Uncompressed: seek over member data. Compressed: a stream; every byte is decompressed.
    mode = "r|*" if compression_of(head) else "r:"
    with tarfile.open(path, mode=mode) as tf:
        for info in tf:
            tf.members.clear()  # a stream listing keeps no history
            if info.isdir() or not flt.name_ok(info.name):
                continue
            if flt.has_time and not flt.time_ok(info.name, _tar_time(info)):
                continue
            again = _occurrence("tar", path, info.name, seen)
            if again is not None:
                yield again
            elif not info.isreg() or info.issparse():
                why = f"member {info.name!r} is {tar_kind(info)}, not a regular file"
                yield ImageRef(archive_uri("tar", path, info.name), refused=("local.archive", why))
            else:
                yield ImageRef(archive_uri("tar", path, info.name))


def _zip_members(path: str, flt: Filter, seen: DigestSet) -> Iterator[ImageRef]:
    zf = open_zip(path)
    try:
        for info in zf.infolist():
            if info.is_dir() or not flt.name_ok(info.filename):
                continue
            modified = _zip_time(info) if flt.has_time else None  # naive local
            if flt.time_ok(info.filename, modified):
                again = _occurrence("zip", path, info.filename, seen)
                yield again or ImageRef(archive_uri("zip", path, info.filename))
    finally:
        close_zip(zf)


def _tar_time(info: tarfile.TarInfo) -> datetime | None:
    try:
        return Filter.from_timestamp(info.mtime)
    except (ValueError, OverflowError, OSError):  # a hostile or garbled mtime
        return None


def _zip_time(info: zipfile.ZipInfo) -> datetime | None:
    try:
        return datetime(*info.date_time)
    except ValueError:  # a zero or impossible DOS date
        return None


def iter_objects(store: ObjectStore, bucket: str, prefix: str, flt: Filter) -> Iterator[ImageRef]:
    for ref, _ in iter_listed_objects(store, bucket, prefix, flt):
        yield ref


def iter_listed_objects(
    store: ObjectStore, bucket: str, prefix: str, flt: Filter
) -> Iterator[tuple[ImageRef, ObjectInfo]]:
    """:func:`iter_objects` with what the listing said of each object (size, ETag), for callers
    that check objects without reading them (``carnumber plan``)."""
    base = prefix if prefix.endswith("/") or not prefix else prefix.rsplit("/", 1)[0] + "/"
    for obj in store.iter_objects(bucket, prefix):
        relative = obj.key[len(base) :] if obj.key.startswith(base) else obj.key
        if flt.name_ok(relative) and flt.time_ok(obj.key, obj.modified):
            yield ImageRef(object_uri(store.scheme, bucket, obj.key)), obj
