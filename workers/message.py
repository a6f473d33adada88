"""The work-unit format that travels from producers to workers through the broker.

An :class:`ImageRef` names one image by its *canonical source*: a URI with no credentials and no
signature query string (``file:///abs/path.jpg``, ``tar:///abs/day.tar.gz#cam1/0001.jpg``,
``s3://bucket/key``, ``oss://bucket/key``, ``https://host/path.jpg``). Workers sign or read it at
call time, so no secret is ever enqueued. ``image_id`` is derived from that URI alone, so the same
image gets the same id in every run.

A :class:`Chunk` is one Celery message: a few hundred refs of one run. ``chunk_id`` is assigned by
the producer from the chunk's position in the source stream, so re-running a producer yields the
same ids. This module imports nothing of ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "FORMAT_VERSION",
    "Chunk",
    "ImageRef",
    "image_id_for",
    "redact_url",
]

FORMAT_VERSION = 1

# Query parameters that carry signatures or credentials in S3, OSS and generic presigned URLs.
_SECRET_PARAMS = frozenset(
    p.lower()
    for p in (
        "Signature",
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Algorithm",
        "AWSAccessKeyId",
        "OSSAccessKeyId",
        "Expires",
        "security-token",
        "x-oss-signature",
        "x-oss-credential",
        "x-oss-date",
        "x-oss-expires",
        "x-oss-signature-version",
        "x-oss-security-token",
        "x-oss-additional-headers",
        "token",
        "sig",
        "access_token",
    )
)


def redact_url(url: str) -> str:
    """``url`` without user info and without signature or credential query parameters.

    Other query parameters are kept (they may select the image). Non-URL strings are returned as
    they are.
    """
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    query = urlencode(
        [
            (k, v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in _SECRET_PARAMS
        ]
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def has_secret_params(url: str) -> bool:
    """True when ``url`` carries a signature/credential query parameter or user info."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        return True
    return any(
        k.lower() in _SECRET_PARAMS for k, _ in parse_qsl(parts.query, keep_blank_values=True)
    )


def image_id_for(source: str) -> str:
    """Stable id of an image: 20 hex digits of SHA-256 over its redacted canonical source."""
    return hashlib.sha256(redact_url(source).encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image to recognise. ``meta`` is pass-through metadata (camera id, capture time...)."""

    source: str
    image_id: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image_id:
            object.__setattr__(self, "image_id", image_id_for(self.source))

    @property
    def scheme(self) -> str:
        return urlsplit(self.source).scheme

    def to_wire(self) -> list[Any]:
        # A list, not a dict: a chunk of 500 refs stays small on the broker.
        return (
            [self.image_id, self.source, self.meta] if self.meta else [self.image_id, self.source]
        )

    @classmethod
    def from_wire(cls, data: list[Any]) -> ImageRef:
        meta = data[2] if len(data) > 2 else {}
        return cls(source=data[1], image_id=data[0], meta=dict(meta))


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
