"""Canonical source URIs: how an image's location is written, and read back.

One spelling per location, so one image gets one ``image_id`` in every run::

    file:///abs/path/img.jpg
    tar:///abs/day.tar.gz#cam1/0001.jpg        (also .tar, .tgz, .tar.bz2, .tar.xz)
    zip:///abs/day.zip#cam1/0001.jpg
    s3://bucket/key
    oss://bucket/key
    http(s)://host/path?query                   (kept as given; never with signature params)

Paths, members and keys are written as they are (unicode and spaces stay readable), except that
``%``, ``?``, ``#`` and control characters are percent-encoded: those would otherwise change how
the URI splits (a ``?`` in an S3 key would become a query). Reading decodes every ``%XX``.
This module is pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

from workers.errors import InputError

__all__ = [
    "ACCEPTED_FORMS",
    "Location",
    "archive_uri",
    "encode_part",
    "file_uri",
    "object_uri",
    "parse_uri",
]

ACCEPTED_FORMS = (
    "file:///abs/path.jpg, tar:///abs/x.tar[.gz]#member, zip:///abs/x.zip#member, "
    "s3://bucket/key, oss://bucket/key, http(s)://host/path"
)

_ESCAPE = frozenset("%?#") | frozenset(chr(c) for c in (*range(0x20), 0x7F))


def encode_part(text: str) -> str:
    """``text`` with only ``% ? #`` and control characters percent-encoded (as UTF-8)."""
    if not any(ch in _ESCAPE for ch in text):
        return text
    return "".join("".join(f"%{b:02X}" for b in ch.encode("utf-8")) if ch in _ESCAPE else ch for ch in text)


def file_uri(path: str) -> str:
    """``file://`` URI of an absolute local path (not resolved here; callers resolve first)."""
    if not path.startswith("/"):
        raise InputError(f"{path!r}: a file URI needs an absolute path")
    return "file://" + encode_part(path)


def archive_uri(kind: str, archive_path: str, member: str) -> str:
    """``tar://`` or ``zip://`` URI of ``member`` inside the archive at absolute ``archive_path``."""
    if kind not in ("tar", "zip"):
        raise ValueError(f"archive kind must be tar or zip, not {kind!r}")
    if not archive_path.startswith("/"):
        raise InputError(f"{archive_path!r}: an archive URI needs an absolute path")
    return f"{kind}://{encode_part(archive_path)}#{encode_part(member)}"


def object_uri(scheme: str, bucket: str, key: str) -> str:
    """``s3://bucket/key`` or ``oss://bucket/key``."""
    return f"{scheme}://{bucket}/{encode_part(key)}"


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed source URI. ``kind`` is file, tar, zip, s3, oss or http.

    ``path``: local file or archive path; ``member``: archive member; ``bucket``/``key``: object
    stores; ``url``: http(s) URLs as given.
    """

    kind: str
    path: str = ""
    member: str = ""
    bucket: str = ""
    key: str = ""
    url: str = ""


def parse_uri(uri: str) -> Location:
    """Parse a canonical source URI; :class:`InputError` naming it and the accepted forms."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise InputError(f"{_short(uri)}: not a source URI; accepted: {ACCEPTED_FORMS}")
    if scheme in ("http", "https"):
        return Location("http", url=uri)
    if scheme == "file":
        path = unquote(_strip_localhost(rest))
        if not path.startswith("/"):
            raise InputError(f"{_short(uri)}: file URIs need an absolute path (file:///abs/...)")
        return Location("file", path=path)
    if scheme in ("tar", "zip"):
        archive, hash_, member = rest.partition("#")
        path = unquote(_strip_localhost(archive))
        if not hash_ or not member or not path.startswith("/"):
            raise InputError(f"{_short(uri)}: archive URIs look like {scheme}:///abs/archive#member/name.jpg")
        return Location(scheme, path=path, member=unquote(member))
    if scheme in ("s3", "oss"):
        bucket, _, key = rest.partition("/")
        if not bucket or not key:
            raise InputError(f"{_short(uri)}: object URIs look like {scheme}://bucket/key")
        return Location(scheme, bucket=bucket, key=unquote(key))
    raise InputError(f"{_short(uri)}: unknown scheme {scheme!r}; accepted: {ACCEPTED_FORMS}")


def _strip_localhost(rest: str) -> str:
    return rest[len("localhost") :] if rest.startswith("localhost/") else rest


def _short(uri: str) -> str:
    # Never echo a query string (it may be a signature) and keep messages bounded.
    head = uri.split("?", 1)[0]
    return repr(head if len(head) <= 200 else head[:200] + "...")
