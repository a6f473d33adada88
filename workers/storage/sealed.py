"""The sealed-URL store: where an ``http(s)`` image's URL as listed waits for the worker.

A manifest may list signed links (an OSS or S3 presigned URL, a CDN ``auth_key``, an Azure SAS,
a Google ``X-Goog-Signature``...). The message, the ``_enqueued/`` record and the output carry only
the canonical source (:func:`workers.message.canonical_url`: no query parameter but those on
``CARNUMBER_KEEP_QUERY_PARAMS``), so the URL to fetch travels apart, *sealed*: the producer writes
it here before it publishes the chunk (``SET {prefix}:sealed:{image_id} url EX ttl``), and the
worker reads it back with one ``MGET`` per chunk. Redis is the one place it lives: not the broker
message, not Flower, not a log line, not a Parquet file.

Limits (ops/design/sources.md): anyone who can read Redis (or its RDB/AOF files) can read these
URLs until they expire (``ttl_s``, the journal's lifetime, 7 days by default) — the same Redis
that holds the run's answers; and a link that expired before its call is refused locally
(``local.urlExpired``), never sent.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from workers.errors import RedisUnavailable
from workers.keys import Keys
from workers.message import ImageRef

__all__ = ["SealedUrls"]


class SealedUrls:
    """Sealed URLs under one key prefix, kept ``ttl_s`` seconds."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_s = ttl_s

    def put(self, refs: Sequence[ImageRef]) -> int:
        """Keep the URL of every ref that carries one (``secret_url``); returns how many. Raises
        ``redis.RedisError``: publishing the chunk without them would lose its images."""
        sealed = [r for r in refs if r.secret_url is not None]
        if sealed:
            pipe = self.client.pipeline(transaction=False)
            for ref in sealed:
                pipe.set(self.keys.sealed_url(ref.image_id), ref.secret_url, ex=self.ttl_s)
            pipe.execute()
        return len(sealed)

    def get_many(self, image_ids: Sequence[str]) -> dict[str, str]:
        """The sealed URLs known for ``image_ids``. Raises :class:`RedisUnavailable`."""
        if not image_ids:
            return {}
        try:
            values = self.client.mget([self.keys.sealed_url(i) for i in image_ids])
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis unreachable reading sealed URLs ({type(exc).__name__})") from None
        return {
            i: v.decode("utf-8") if isinstance(v, bytes) else str(v)
            for i, v in zip(image_ids, values, strict=True)
            if v is not None
        }
