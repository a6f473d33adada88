"""Content keys: an answer depends on the picture, not on where it lives.

Two files with the same bytes get the same answer from the service, so the answer journal
(``workers/books/journal.py``) is keyed by a *content key* wherever one is cheap and sound, and the
first image of a run to be called answers every copy (each copy still gets its own rows, with
``answered_by`` naming the image whose call answered it):

* ``sha256:<hex>`` of the bytes, whenever a worker reads them anyway (local files, tar and zip
  members, objects in ``bytes`` mode, objects read whole by the Url-mode checks);
* ``etag:<etag>:<size>`` for an object passed to the API by URL, from the store's own metadata
  (the ranged reads of the Url-mode checks return it). A single-part upload's ETag is the MD5 of
  its bytes; a multipart upload's depends on the part sizes, and an SSE-KMS object's is not a
  digest of the bytes at all: copies stored those ways get different keys and are called once
  each. Different pictures never share a key (the size is part of it);
* none for an ``http(s)://`` URL: the worker never sees the bytes, so the image is keyed by its
  image id (its source) and only deduplicated with itself.

A key must name the bytes the service was sent, or a later copy of the old picture would get a new
picture's answer: reads after the first carry If-Match on the first's ETag, and an object passed by
URL is read by version or confirmed unchanged before its answer is kept under ``etag:`` (see
``workers/storage/signed.py``).

The key goes into the output rows (``content_key``). This module imports nothing of ours.
"""

from __future__ import annotations

import hashlib

__all__ = ["of_bytes", "of_object"]


def of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def of_object(etag: str | None, size: int | None) -> str | None:
    """The key of a stored object from its ETag and size; None when the store gave no ETag."""
    if not etag or size is None:
        return None
    tag = etag.strip().strip('"')
    return f"etag:{tag}:{size}"
