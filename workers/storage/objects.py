"""What the S3 and OSS stores have in common: the object listing row and the store protocol.

:class:`ObjectStore` is the seam: the resolver (worker side) and the object-store sources
(producer side) take any store; :mod:`workers.storage.s3` and :mod:`workers.storage.oss` are the
two implementations, each translating its library's exceptions into ours in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from workers.config import Settings

__all__ = ["ObjectInfo", "ObjectStore", "RangeRead", "no_version", "refused_credentials", "store_for"]

# What pyarrow's S3 filesystem (the output store) says when the store refuses our credentials or
# access: "AWS Error ACCESS_DENIED during PutObject operation", or the store's own error code.
_REFUSED = (
    "ACCESS_DENIED",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "RequestTimeTooSkewed",
    "InvalidSecurityToken",
    "SecurityTokenExpired",
)


def refused_credentials(exc: BaseException) -> bool:
    """True when an output-store error (pyarrow raises ``OSError``) says the store refused our
    credentials or denied us the bucket: every part write would fail alike."""
    return isinstance(exc, OSError) and any(marker in str(exc) for marker in _REFUSED)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: ``key``, ``size`` in bytes, ``modified`` (UTC), and the ``etag`` the
    listing gives (quotes removed; None when it gives none)."""

    key: str
    size: int
    modified: datetime
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class RangeRead:
    """Bytes ``offset .. offset + len(data)`` of an object of ``size`` bytes (the whole object's
    size, from ``Content-Range``), with what the store says of it: ``content_type`` and
    ``etag`` (quotes removed; a multipart upload's ETag is not an MD5 of the bytes)."""

    data: bytes
    offset: int
    size: int
    content_type: str | None = None
    etag: str | None = None
    version_id: str | None = None  # the object version read, on a versioned bucket


def no_version(version_id: str | None) -> str | None:
    """A version id worth binding a URL to: None for none, and for the ``null`` version of an
    object written before versioning was enabled."""
    return version_id if version_id and version_id != "null" else None


class ObjectStore(Protocol):
    scheme: str

    def head(self, bucket: str, key: str) -> int:
        """Size in bytes; :class:`InputError` when the object or bucket is missing."""
        ...

    def get(self, bucket: str, key: str, max_bytes: int, *, if_match: str | None = None) -> bytes:
        """The object's bytes; :class:`ImageRejected` (``local.imageTooLarge``) when it is
        larger than ``max_bytes`` (checked before reading). With ``if_match`` (an ETag):
        :class:`ObjectChanged` when the object no longer has it."""
        ...

    def get_range(
        self, bucket: str, key: str, offset: int, length: int, *, if_match: str | None = None
    ) -> RangeRead:
        """At most ``length`` bytes from ``offset`` (fewer at the object's end; none for an empty
        object or an offset at or past its end) and the object's size. :class:`InputError` when
        the object or bucket is missing, :class:`TransportError` when the store is unreachable,
        :class:`ObjectChanged` when ``if_match`` is given and the ETag differs."""
        ...

    def etag(self, bucket: str, key: str) -> str | None:
        """The object's current ETag (a HEAD request); None when it is gone."""
        ...

    def presign(self, bucket: str, key: str, ttl_s: int, *, version_id: str | None = None) -> str:
        """A GET URL valid for ``ttl_s`` seconds, of ``version_id`` when given. A secret: never
        log or store it. Local: no request is made."""
        ...

    def iter_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        """Every object under ``prefix``, in the store's (lexicographic) order, page by page."""
        ...


def store_for(scheme: str, settings: Settings) -> ObjectStore:
    """The store for ``s3`` or ``oss``, importing its library only now."""
    if scheme == "s3":
        from workers.storage.s3 import S3Store

        return S3Store(settings)
    if scheme == "oss":
        from workers.storage.oss import OssStore

        return OssStore(settings)
    raise ValueError(f"no object store for scheme {scheme!r}")
