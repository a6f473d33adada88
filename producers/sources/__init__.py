"""Sources (producer side): one URI or path in, a stream of :class:`~workers.message.ImageRef` out.

:func:`open_source` picks the source by its form:

===================================================  ====================================
``/folder`` (or ``file:///folder``)                  recursive listing, sorted
``/x.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,      members, archive order
``.tar.xz``, ``.zip``
``s3://bucket/prefix``, ``oss://bucket/prefix``      paginated listing, key order
``/m.txt``/``.lst``, ``.csv``, ``.jsonl``,           manifest entries, file order
``.parquet``
===================================================  ====================================

Problems with the source itself (missing path, unknown form, unreadable header, no
credentials) raise :class:`InputError`/:class:`ConfigError` when :func:`open_source` is called,
before anything is enqueued. A bad manifest line is reported to ``on_skip`` and skipped.
Details: :mod:`producers.sources.filters`, :mod:`.listing`, :mod:`.manifests`, and
ops/design/sources.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from datetime import datetime

from producers.sources.filters import Filter
from producers.sources.listing import archive_kind, iter_archive, iter_folder, iter_objects
from producers.sources.manifests import MANIFEST_SUFFIXES, iter_manifest
from workers.config import Settings
from workers.errors import InputError
from workers.message import ImageRef
from workers.storage.objects import ObjectStore, store_for

__all__ = ["ACCEPTED_SOURCES", "Filter", "object_prefix", "open_source"]

log = logging.getLogger(__name__)

ACCEPTED_SOURCES = (
    "a folder, a .tar/.tar.gz/.tgz/.tar.bz2/.tar.xz/.zip archive, s3://bucket/prefix, "
    "oss://bucket/prefix, or a manifest (.txt, .lst, .csv, .jsonl, .parquet)"
)


def _log_skip(err: InputError) -> None:
    log.warning("skipped: %s", err)


def open_source(
    uri: str,
    settings: Settings,
    *,
    glob: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    on_skip: Callable[[InputError], None] | None = None,
    store: ObjectStore | None = None,
) -> Iterator[ImageRef]:
    """A lazy, deterministic stream of refs from ``uri``.

    ``glob``/``since``/``until`` filter listed images (see :mod:`producers.sources.filters`);
    manifests are filtered by ``since``/``until`` only (by a date in each path). ``store``
    overrides the S3/OSS store built from ``settings`` (tests, custom clients).
    Raises :class:`InputError` naming ``uri`` and the accepted forms when it is none of them.
    """
    flt = Filter(glob, since, until)
    skip = on_skip or _log_skip
    if (prefix_of := object_prefix(uri)) is not None:
        scheme, bucket, prefix = prefix_of
        chosen = store or store_for(scheme, settings)
        return _primed(iter_objects(chosen, bucket, prefix, flt))
    scheme, sep, _ = uri.partition("://")
    if sep and scheme.lower() == "file":
        from workers.storage.uris import parse_uri

        uri = parse_uri(uri).path
    elif sep:
        raise InputError(f"{uri.split('?', 1)[0]!r} is not a source; accepted: {ACCEPTED_SOURCES}")
    path = os.path.abspath(os.path.expanduser(uri))
    if os.path.isdir(path):
        return _primed(iter_folder(path, flt))
    if not os.path.exists(path):
        raise InputError(f"{uri!r}: no such file or folder")
    if archive_kind(path):
        return _primed(iter_archive(path, flt))
    if path.lower().endswith(MANIFEST_SUFFIXES):
        return _primed(iter_manifest(path, settings, flt, skip))
    raise InputError(f"{uri!r} is not a source; accepted: {ACCEPTED_SOURCES}")


def object_prefix(uri: str) -> tuple[str, str, str] | None:
    """``(scheme, bucket, prefix)`` of an ``s3://`` or ``oss://`` source; None for any other
    source. Raises :class:`InputError` when it names no bucket."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() not in ("s3", "oss"):
        return None
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise InputError(f"{uri!r}: name a bucket ({scheme}://bucket/prefix)")
    return scheme.lower(), bucket, prefix


def _primed(refs: Iterator[ImageRef]) -> Iterator[ImageRef]:
    """Run a generator up to its first ref now, so a missing bucket, a file that is not an
    archive or a manifest without a url/path column raises at open time."""
    sentinel = object()
    first = next(refs, sentinel)

    def rest() -> Iterator[ImageRef]:
        if first is not sentinel:
            yield first  # type: ignore[misc]
        yield from refs

    return rest()
