"""Listing sources: local folders, tar/zip archives, S3 and OSS prefixes.

Each yields :class:`~workers.message.ImageRef` lazily, in a deterministic order, so a re-run of
the same command yields the same sequence (chunk ids depend on position):

* **folders**: depth-first, entries of each directory sorted by name (byte order of the UTF-8
  name). Memory: the names of one directory per level being walked. Directory symlinks are not
  followed (loops); a file symlink is listed only when its target is inside the folder.
* **archives**: the archive's own member order (a listing sorted by name would need every name
  in memory; the archive order is fixed and is the order workers read fastest). Tar is read as
  a stream (compressed or not); zip from its central directory.
* **object stores**: the store's listing order (UTF-8 byte order of keys), 1000 keys a page.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from datetime import datetime

from producers.sources.filters import Filter, inside
from workers.errors import InputError
from workers.message import ImageRef
from workers.storage.archives import compression_of
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
        raise InputError(f"folder {directory!r} unreadable ({type(exc).__name__})") from None
    for name, is_dir, is_link in entries:
        path = os.path.join(directory, name)
        relative = f"{rel}{name}"
        if is_dir:
            yield from _walk(root, path, relative + "/", flt)
            continue
        if not flt.name_ok(relative):
            continue
        if is_link and not inside(root, path):
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
    path = os.path.abspath(path)
    kind = archive_kind(path)
    try:
        if kind == "zip":
            yield from _zip_members(path, flt)
        else:
            yield from _tar_members(path, flt)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InputError(f"archive {path!r} unreadable ({type(exc).__name__}: {exc})") from None


def _tar_members(path: str, flt: Filter) -> Iterator[ImageRef]:
    with open(path, "rb") as fh:
        head = fh.read(6)
    # Uncompressed: seek over member data. Compressed: a stream; every byte is decompressed.
    mode = "r|*" if compression_of(head) else "r:"
    with tarfile.open(path, mode=mode) as tf:
        for info in tf:
            tf.members.clear()  # a stream listing keeps no history
            if not info.isreg() or not flt.name_ok(info.name):
                continue
            if flt.time_ok(info.name, Filter.from_timestamp(info.mtime)):
                yield ImageRef(archive_uri("tar", path, info.name))


def _zip_members(path: str, flt: Filter) -> Iterator[ImageRef]:
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir() or not flt.name_ok(info.filename):
                continue
            modified = datetime(*info.date_time) if flt.has_time else None  # naive local
            if flt.time_ok(info.filename, modified):
                yield ImageRef(archive_uri("zip", path, info.filename))


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
