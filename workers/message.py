"""The work-unit format that travels from producers to workers through the broker.

An :class:`ImageRef` names one image by its *canonical source*: a URI with no credentials and no
signature query string (``file:///abs/path.jpg``, ``tar:///abs/day.tar.gz#cam1/0001.jpg``,
``s3://bucket/key``, ``oss://bucket/key``, ``https://host/path.jpg``). Workers sign or read it at
call time, so no secret is ever enqueued. ``image_id`` is derived from that URI alone (for an
``http(s)`` URL: from the URL without its signature, :func:`redact_url`), so the same image gets the
same id in every run.

An ``http(s)`` source keeps only the query parameters on an allow-list (:func:`canonical_url`: none
by default). When that drops anything, the URL to fetch is *sealed*: the producer keeps it out of
the message (``secret_url``, never on the wire) in the sealed-URL store, and the worker reads it
back (``workers/storage/sealed.py``). A ref the producer itself refused (a manifest line that does
not parse, an archive member that is a link...) travels with ``refused = (code, message)``: the
worker writes that one row and reads nothing.

A :class:`Chunk` is one Celery message: a few hundred refs of one run. ``chunk_id`` is assigned by
the producer from the chunk's position in the source stream, so re-running a producer yields the
same ids. This module imports nothing of ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit

__all__ = [
    "FORMAT_VERSION",
    "Chunk",
    "ImageRef",
    "canonical_url",
    "has_secret_params",
    "image_id_for",
    "kept_params",
    "redact_url",
    "signature_expiry",
    "signature_param_names",
]

FORMAT_VERSION = 1

# Query parameters that sign a URL or carry a credential (or the expiry that a signature covers),
# named by every major cloud and CDN. Matched case-insensitively; ``*`` ends a prefix.
_SIGNATURE_PARAMS = frozenset(
    p.lower()
    for p in (
        # AWS SigV2 and SigV4, and the S3-compatible stores that copy them (MinIO, Ceph, OBS, BOS)
        "Signature", "AWSAccessKeyId", "Expires", "X-Amz-*", "AccessKeyId", "KSSAccessKeyId",
        # Alibaba Cloud OSS (V1, V4) and CDN URL authentication type A
        "OSSAccessKeyId", "security-token", "x-oss-*", "auth_key",
        # Google Cloud Storage (V2, V4)
        "GoogleAccessId", "X-Goog-*",
        # Amazon CloudFront signed URLs (canned and custom policy)
        "Policy", "Key-Pair-Id",
        # Azure SAS: the signature (the rest of the set is dropped with it, below)
        "sig",
        # Tencent COS and CDN (type D), Tencent live
        "q-sign-algorithm", "q-ak", "q-sign-time", "q-key-time", "q-header-list",
        "q-url-param-list", "q-signature", "x-cos-*", "sign", "txSecret", "txTime",
        # Qiniu (download token), Wangsu/ChinaNetCenter, Akamai
        "token", "wsSecret", "wsTime", "wsABSTime", "hdnts", "hdnea", "hdntl", "__token__",
        # generic bearer credentials
        "access_token", "accesstoken", "id_token", "jwt", "api_key", "apikey", "secret",
        "password", "passwd", "credential", "credentials", "authorization", "auth",
    )
)
# Parameters that belong to a signature only beside its marker: the rest of an Azure SAS, Qiniu's
# expiry, Tencent CDN type D's timestamp. Alone they may be ordinary parameters.
_SIGNATURE_FAMILIES: dict[str, frozenset[str]] = {
    "sig": frozenset(
        {
            "sv", "ss", "srt", "sp", "se", "st", "spr", "sr", "si", "sip", "skoid", "sktid", "skt",
            "ske", "sks", "skv", "saoid", "suoid", "scid", "sdd", "ses", "rscc", "rscd", "rsce",
            "rscl", "rsct",
        }
    ),
    "token": frozenset({"e"}),
    "sign": frozenset({"t"}),
}


def _is_signature_name(name: str) -> bool:
    lower = name.lower()
    if lower in _SIGNATURE_PARAMS:
        return True
    return any(p.endswith("*") and lower.startswith(p[:-1]) for p in _SIGNATURE_PARAMS)


def signature_param_names(names: Sequence[str]) -> set[str]:
    """Which of a URL's query parameter ``names`` sign it or carry a credential (lowercased):
    the names of :data:`_SIGNATURE_PARAMS`, and each family's members when its marker is there."""
    lowered = {n.lower() for n in names}
    found = {n for n in lowered if _is_signature_name(n)}
    for marker, family in _SIGNATURE_FAMILIES.items():
        if marker in lowered:
            found |= lowered & family
    return found


def _query_segments(query: str) -> list[tuple[str, str]]:
    """(decoded name, raw segment) for each ``&``-separated part of a raw query string."""
    out = []
    for segment in query.split("&"):
        if segment:
            out.append((unquote_plus(segment.split("=", 1)[0]), segment))
    return out


def _url_parts(url: str, http_only: bool) -> tuple[SplitResult, str] | None:
    """The split URL and its netloc without user info, for URLs with a host (``http(s)`` only
    when ``http_only``); None for anything else (``file:///…``, ``tar:///…``, plain text)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced "[" in the host
        return None
    if not parts.netloc or (http_only and parts.scheme.lower() not in ("http", "https")):
        return None
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    return parts, f"{host}:{port}" if port else host


def redact_url(url: str) -> str:
    """``url`` without user info, fragment, and signature or credential query parameters
    (:func:`signature_param_names`); the other parameters are kept as written (they may select
    the image). The image id is taken over this form, so re-signing a URL keeps its id.
    Strings without a host (``file:///…``, plain text) are returned as they are."""
    split = _url_parts(url, http_only=False)
    if split is None:
        # A URL that does not parse loses its whole query: it cannot be told apart.
        return url.split("?", 1)[0] if "://" in url else url
    parts, netloc = split
    segments = _query_segments(parts.query)
    secret = signature_param_names([name for name, _ in segments])
    query = "&".join(raw for name, raw in segments if name.lower() not in secret)
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, query, ""))


def canonical_url(url: str, keep: frozenset[str] = frozenset()) -> str:
    """The source an ``http(s)`` URL is known by in messages, records and output: no user info,
    no fragment, and only the query parameters named in ``keep`` (lowercase names; none by
    default: ``CARNUMBER_KEEP_QUERY_PARAMS``), as written. An allow-list, so a signature
    parameter of a kind nobody listed cannot get through. Other strings are returned as they are;
    an ``http(s)`` URL that does not parse raises ``ValueError``.
    """
    split = _url_parts(url, http_only=True)
    if split is None:
        if url.lower().startswith(("http://", "https://")):
            raise ValueError("an http(s) URL that does not parse")  # never passed on as it is
        return url
    parts, netloc = split
    query = "&".join(raw for name, raw in _query_segments(parts.query) if name.lower() in keep)
    return urlunsplit((parts.scheme.lower(), netloc, parts.path, query, ""))


def has_secret_params(url: str) -> bool:
    """True when ``url`` carries a signature/credential query parameter or user info."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True  # cannot tell: treat it as signed
    if parts.username or parts.password:
        return True
    return bool(signature_param_names([name for name, _ in _query_segments(parts.query)]))


def kept_params(names: str | None) -> frozenset[str]:
    """The allow-list from ``CARNUMBER_KEEP_QUERY_PARAMS`` (comma-separated), lowercased.
    Raises ``ValueError`` naming a parameter that signs URLs or carries a credential: such a
    parameter is never kept."""
    kept = frozenset(n.strip().lower() for n in (names or "").split(",") if n.strip())
    family = frozenset().union(*_SIGNATURE_FAMILIES.values())
    refused = sorted(n for n in kept if _is_signature_name(n) or n in family)
    if refused:
        raise ValueError(f"{', '.join(refused)}: signature or credential parameters are never kept")
    return kept


def signature_expiry(url: str) -> float | None:
    """When a signed URL stops working (Unix seconds), from the parameters that say so: AWS SigV4
    (``X-Amz-Date`` + ``X-Amz-Expires``), OSS V4 (``x-oss-date`` + ``x-oss-expires``), Google V4
    (``X-Goog-Date`` + ``X-Goog-Expires``), ``Expires`` in Unix seconds (AWS SigV2, OSS V1, Google
    V2, CloudFront canned), Azure SAS ``se``, Qiniu ``e``. None when the URL says nothing."""
    params: dict[str, str] = {}
    for name, raw in _query_segments(urlsplit(url).query):
        params.setdefault(name.lower(), unquote_plus(raw.split("=", 1)[1]) if "=" in raw else "")
    for date_name, ttl_name in (
        ("x-amz-date", "x-amz-expires"),
        ("x-oss-date", "x-oss-expires"),
        ("x-goog-date", "x-goog-expires"),
    ):
        if date_name in params and params.get(ttl_name, "").isdigit():
            try:
                start = datetime.strptime(params[date_name], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            except ValueError:
                return None
            return start.timestamp() + int(params[ttl_name])
    if params.get("expires", "").isdigit():
        return float(params["expires"])
    if "sig" in params and params.get("se"):
        try:
            end = datetime.fromisoformat(params["se"].replace("Z", "+00:00"))
        except ValueError:
            return None
        return (end if end.tzinfo else end.replace(tzinfo=UTC)).timestamp()
    if "token" in params and params.get("e", "").isdigit():
        return float(params["e"])
    return None


def image_id_for(source: str) -> str:
    """Stable id of an image: 20 hex digits of SHA-256 over its redacted canonical source (a URL
    without its signature, so a re-signed URL keeps its id). Never raises: a source that is not
    valid Unicode is hashed by the bytes it stands for."""
    text = redact_url(source).encode("utf-8", "surrogateescape")
    return hashlib.sha256(text).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image to recognise. ``meta`` is pass-through metadata (camera id, capture time...).

    ``sealed``: the URL to fetch is not ``source`` but the one kept in the sealed-URL store under
    ``image_id`` (``secret_url`` on the producer side; never on the wire, never in a repr).
    ``refused``: ``(local code, message)`` when the producer refused the item: its one row.
    """

    source: str
    image_id: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    sealed: bool = False
    refused: tuple[str, str] | None = None
    secret_url: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.image_id:
            object.__setattr__(self, "image_id", image_id_for(self.source))
        if self.secret_url is not None and not self.sealed:
            object.__setattr__(self, "sealed", True)

    @property
    def scheme(self) -> str:
        return urlsplit(self.source).scheme

    def to_wire(self) -> list[Any]:
        # A list, not a dict: a chunk of 500 refs stays small on the broker. ``secret_url``
        # never goes on the wire.
        extra: dict[str, Any] = {}
        if self.sealed:
            extra["sealed"] = 1
        if self.refused is not None:
            extra["refused"] = list(self.refused)
        if extra:
            return [self.image_id, self.source, self.meta, extra]
        return (
            [self.image_id, self.source, self.meta] if self.meta else [self.image_id, self.source]
        )

    @classmethod
    def from_wire(cls, data: list[Any]) -> ImageRef:
        meta = data[2] if len(data) > 2 else {}
        extra = data[3] if len(data) > 3 and isinstance(data[3], dict) else {}
        refused = extra.get("refused")
        return cls(
            source=data[1],
            image_id=data[0],
            meta=dict(meta),
            sealed=bool(extra.get("sealed")),
            refused=(str(refused[0]), str(refused[1])) if refused else None,
        )


@dataclass(frozen=True, slots=True)
class Chunk:
    """A Celery message's worth of images from one run.

    ``positions``: each image's place in the chunk as the producer first published it (None: in
    order, ``0..n-1``). A remainder of a chunk (parked, handed back, republished by ``verify``)
    keeps its images' first positions, so the run's books (``workers/books/outcomes.py``) know each
    image by ``(chunk_id, position)`` however often and in whatever pieces it travels.
    """

    run_id: str
    chunk_id: str
    images: tuple[ImageRef, ...]
    positions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.positions is not None and len(self.positions) != len(self.images):
            raise ValueError(
                f"chunk {self.chunk_id}: {len(self.positions)} positions for {len(self.images)} images"
            )

    def position_of(self) -> tuple[int, ...]:
        """Every image's position, in order."""
        return self.positions if self.positions is not None else tuple(range(len(self.images)))

    def subset(self, keep: Callable[[int, ImageRef], bool]) -> Chunk:
        """The images (with their positions) for which ``keep(position, ref)`` is true."""
        pairs = [(p, r) for p, r in zip(self.position_of(), self.images, strict=True) if keep(p, r)]
        positions = tuple(p for p, _ in pairs)
        in_order = positions == tuple(range(len(pairs)))
        return Chunk(self.run_id, self.chunk_id, tuple(r for _, r in pairs), None if in_order else positions)

    @property
    def part_name(self) -> str:
        """Deterministic output part name: the chunk id plus a digest of exactly which images it
        holds, so a redelivered message overwrites its own part while a later remainder of the
        same chunk (fewer images) writes beside it."""
        digest = hashlib.sha256("\n".join(r.image_id for r in self.images).encode()).hexdigest()
        return f"part-{self.chunk_id}-{digest[:10]}"

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": FORMAT_VERSION,
            "run": self.run_id,
            "chunk": self.chunk_id,
            "images": [r.to_wire() for r in self.images],
        }
        if self.positions is not None:
            wire["pos"] = list(self.positions)
        return wire

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Chunk:
        version = data.get("v")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"chunk message format v{version}: this worker reads v{FORMAT_VERSION}"
            )
        positions = data.get("pos")
        return cls(
            run_id=data["run"],
            chunk_id=data["chunk"],
            images=tuple(ImageRef.from_wire(r) for r in data["images"]),
            positions=tuple(int(p) for p in positions) if positions is not None else None,
        )
