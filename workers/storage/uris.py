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
the URI splits (a ``?`` in an S3 key would become a query). A name that is not UTF-8 (a GBK file
name written by a Windows tool, a tar member from an old camera) reaches Python as a string with
surrogate escapes (``os.listdir``, ``tarfile``); each such raw byte is written as its ``%XX``, so the
URI is valid UTF-8 (it goes into JSON, Redis and Parquet) and the same bytes always give the same
URI and image id. Reading decodes every ``%XX`` and turns bytes that are not UTF-8 back into the
same surrogate escapes, so the worker opens exactly the file or member the producer listed.
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
    "decode_part",
    "encode_part",
    "file_uri",
    "manifest_line_uri",
    "object_uri",
    "parse_uri",
]

ACCEPTED_FORMS = (
    "file:///abs/path.jpg, tar:///abs/x.tar[.gz]#member, zip:///abs/x.zip#member, "
    "s3://bucket/key, oss://bucket/key, http(s)://host/path"
)

_ESCAPE = frozenset("%?#") | frozenset(chr(c) for c in (*range(0x20), 0x7F))


def _escaped(ch: str) -> str:
    if "\udc80" <= ch <= "\udcff":  # a raw byte that was not UTF-8 (surrogateescape)
        return f"%{ord(ch) - 0xDC00:02X}"
    if "\ud800" <= ch <= "\udfff":
        # A lone surrogate from elsewhere (a JSON escape): no file can carry it; written as
        # UTF-8 would, so the URI stays valid and stable (reading it names no existing file).
        return "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(f"%{b:02X}" for b in ch.encode("utf-8"))


def encode_part(text: str) -> str:
    """``text`` with only ``% ? #``, control characters and surrogate escapes percent-encoded
    (as UTF-8; a surrogate escape as the raw byte it stands for). Never raises."""
    if text.isascii() and not any(ch in _ESCAPE for ch in text):
        return text
    return "".join(_escaped(ch) if ch in _ESCAPE or "\ud800" <= ch <= "\udfff" else ch for ch in text)


def decode_part(text: str) -> str:
    """The inverse of :func:`encode_part`: ``%XX`` decoded; bytes that are not UTF-8 come back as
    the surrogate escapes ``os`` and ``tarfile`` use for them."""
    return unquote(text, errors="surrogateescape")


def file_uri(path: str) -> str:
    """``file://`` URI of an absolute local path (not resolved here; callers resolve first)."""
    if not path.startswith("/"):
        raise InputError(f"{path!r}: a file URI needs an absolute path")
    return "file://" + encode_part(path)


def archive_uri(kind: str, archive_path: str, member: str, occurrence: int = 1) -> str:
    """``tar://`` or ``zip://`` URI of ``member`` inside the archive at absolute ``archive_path``.
    A later ``occurrence`` of a name the archive holds more than once gets ``#N`` after it (an
    escaped member never contains a bare ``#``), so each entry has an id of its own."""
    if kind not in ("tar", "zip"):
        raise ValueError(f"archive kind must be tar or zip, not {kind!r}")
    if not archive_path.startswith("/"):
        raise InputError(f"{archive_path!r}: an archive URI needs an absolute path")
    uri = f"{kind}://{encode_part(archive_path)}#{encode_part(member)}"
    return uri if occurrence == 1 else f"{uri}#{occurrence}"


def manifest_line_uri(manifest_path: str, line: int) -> str:
    """``manifest:///abs/m.csv#17``: the source of a manifest line that names no usable image
    (it does not parse, names nothing): the producer refuses it, with this source as its id."""
    return f"manifest://{encode_part(manifest_path)}#{line}"


def object_uri(scheme: str, bucket: str, key: str) -> str:
    """``s3://bucket/key`` or ``oss://bucket/key``."""
    return f"{scheme}://{bucket}/{encode_part(key)}"


@dataclass(frozen=True, slots=True)
class Location:
    """A parsed source URI. ``kind`` is file, tar, zip, s3, oss, http or manifest (a refused
    manifest line: ``path`` the manifest, ``member`` the line number).

    ``path``: local file or archive path; ``member``: archive member; ``bucket``/``key``: object
    stores; ``url``: http(s) URLs as given.
    """

    kind: str
    path: str = ""
    member: str = ""
    bucket: str = ""
    key: str = ""
    url: str = ""
    occurrence: int = 1  # archives: which entry of that name (a name may occur twice)


def parse_uri(uri: str) -> Location:
    """Parse a canonical source URI; :class:`InputError` naming it and the accepted forms."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise InputError(f"{_short(uri)}: not a source URI; accepted: {ACCEPTED_FORMS}")
    if scheme in ("http", "https"):
        return Location("http", url=uri)
    if scheme == "file":
        path = decode_part(_strip_localhost(rest))
        if not path.startswith("/"):
            raise InputError(f"{_short(uri)}: file URIs need an absolute path (file:///abs/...)")
        return Location("file", path=path)
    if scheme in ("tar", "zip"):
        archive, hash_, member = rest.partition("#")
        path = decode_part(_strip_localhost(archive))
        member, _, nth = member.partition("#")
        if not hash_ or not member or not path.startswith("/") or (nth and not nth.isdigit()):
            raise InputError(f"{_short(uri)}: archive URIs look like {scheme}:///abs/archive#member/name.jpg")
        return Location(scheme, path=path, member=decode_part(member), occurrence=int(nth or 1))
    if scheme == "manifest":
        path, _, line = rest.partition("#")
        if not line.isdigit():
            raise InputError(f"{_short(uri)}: manifest line URIs look like manifest:///abs/m.csv#17")
        return Location("manifest", path=decode_part(path), member=line)
    if scheme in ("s3", "oss"):
        bucket, _, key = rest.partition("/")
        if not bucket or not key:
            raise InputError(f"{_short(uri)}: object URIs look like {scheme}://bucket/key")
        return Location(scheme, bucket=bucket, key=decode_part(key))
    raise InputError(f"{_short(uri)}: unknown scheme {scheme!r}; accepted: {ACCEPTED_FORMS}")


def _strip_localhost(rest: str) -> str:
    return rest[len("localhost") :] if rest.startswith("localhost/") else rest


def _short(uri: str) -> str:
    # Never echo a query string (it may be a signature) and keep messages bounded.
    head = uri.split("?", 1)[0]
    return repr(head if len(head) <= 200 else head[:200] + "...")
