"""An object passed to the API by URL: signed at each attempt, bound to the version that was checked.

The resolver checks an ``s3://``/``oss://`` object once (ranged reads, ``precheck_object``) and
hands the pipeline a :class:`SignedObject` instead of a URL. The pipeline asks it for an
:class:`~workers.api.client.Image` right before each call (:meth:`SignedObject.image`): a URL
signed then (local and cheap: no request), valid for that attempt only (``ttl_s``), so a wait in
the limiter's queue, an open circuit or a Redis outage never hands the service an expired link.

What the service fetches must be what was checked, or the answer would be kept under the wrong
content key (and copies of the old picture would get the new picture's plates):

* on a versioned bucket (the reads returned a version id), the URL names that version: the
  service reads exactly the checked bytes, or nothing;
* otherwise, after an answer the pipeline asks :meth:`SignedObject.unchanged` (one HEAD): the
  object still has the checked ETag, or the answer is not kept under that key, the object is
  checked again (:meth:`SignedObject.recheck`) and called again. An overwrite and a second one
  back to the same bytes inside one call would pass unseen; that is the residual window.

A signed URL longer than the API's 2048 bytes (long STS tokens) is replaced by the object's
bytes, read with If-Match on the checked ETag (so the content key still holds). Signed URLs live
only in the returned ``Image``: never logged, stored or put in a message.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.api.client import Image
from workers.config import Settings
from workers.errors import CarnumberError
from workers.imagecheck import MAX_BYTES, MAX_URL_BYTES
from workers.storage.objects import ObjectStore

__all__ = ["CLOCK_SKEW_S", "SignedObject", "attempt_ttl_s"]

# Allowance for the signer's clock against the store's (and the service's fetch starting a
# little after the request): NTP keeps real hosts well inside it.
CLOCK_SKEW_S = 60


def attempt_ttl_s(settings: Settings) -> int:
    """Lifetime of a URL signed for one attempt: the call's own timeouts plus the clock allowance,
    at most ``CARNUMBER_SIGNED_URL_TTL_S``."""
    attempt = math.ceil(settings.connect_timeout_s + settings.read_timeout_s) + CLOCK_SKEW_S
    return max(1, min(settings.signed_url_ttl_s, attempt))


@dataclass(eq=False)
class SignedObject:
    """One checked object, to be signed at each attempt. ``content_key``: the key its answer is
    kept under (``etag:ETAG:SIZE``). ``recheck``: the resolver's checks again, on the object as
    it is now."""

    store: ObjectStore
    bucket: str
    key: str
    etag: str | None
    version_id: str | None
    ttl_s: int
    content_key: str | None
    recheck: Callable[[], Image | SignedObject | CarnumberError] = field(repr=False)
    _body: Image | None = field(default=None, init=False, repr=False)

    @property
    def bound(self) -> bool:
        """True when the URL names the checked version (nothing to confirm after a call)."""
        return self.version_id is not None

    def signed_image(self) -> Image | None:
        """The image for one attempt: a URL signed now, valid ``ttl_s`` seconds. Local (no
        request: 167 µs median for S3, ``ops/bench/url_checks.py``), so it runs right before the
        call. None when the URL is longer than the API allows: then :meth:`bytes_image`."""
        url = self.store.presign(self.bucket, self.key, self.ttl_s, version_id=self.version_id)
        if len(url.encode("utf-8")) > MAX_URL_BYTES:
            return None
        return Image(url=url, content_key=self.content_key)

    def bytes_image(self) -> Image:
        """The object's bytes, read with If-Match on the checked ETag (so they are what the
        content key names). A request: run it off the event loop. Raises what the store raises
        (:class:`~workers.errors.ObjectChanged` when it was overwritten)."""
        if self._body is None:  # read once: every attempt sends the same checked bytes
            data = self.store.get(self.bucket, self.key, MAX_BYTES, if_match=self.etag)
            self._body = Image(body=data, content_key=self.content_key)
        return self._body

    def unchanged(self) -> bool:
        """Whether what the service fetched was the checked object: always for a version-bound
        URL; otherwise one HEAD comparing the ETag. Raises what the store raises."""
        if self.bound or self.etag is None:
            return True
        return self.store.etag(self.bucket, self.key) == self.etag
