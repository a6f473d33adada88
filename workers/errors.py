"""The one exception tree, split by what the caller does next.

::

    CarnumberError                 base: the CLI catches it once and prints its message
    ├── ConfigError                a setting is missing or malformed: fix it, run again
    │   └── StorageCredentialsError  our own storage credentials were refused (expired token,
    │                              unknown key, a whole bucket denied): stop the fleet, images
    │                              stay pending until ``carnumber resume``
    ├── InputError                 a source, manifest row or URI is unusable: named, skipped
    │   └── AccessDenied           the store denied one object: that image's row, unless the
    │                              whole bucket is denied (then StorageCredentialsError)
    ├── ImageRejected              a local pre-check refused an image: terminal row, no call made
    ├── ApiError                   RecognizeCarNumber answered with an error code
    │   ├── RetryableApiError      throttling, 5xx, imageTimeOut: back off and try again
    │   ├── BadImageError          the service refused this image: terminal row with the code
    │   └── FatalApiError          credentials, signature, permission, billing: stop the fleet
    ├── TransportError             timeout, reset: no answer, retry
    │   ├── UnreadableAnswer       a 2xx whose body is not the documented envelope: answered and
    │   │                          billed; retried once, then the image fails with the start of
    │   │                          the answer kept (local.unreadableAnswer)
    │   └── ObjectChanged          an object was overwritten between the reads of one check
    │                              (If-Match failed): check it again
    ├── SlotMissed                 a request could not leave by its rate-limit slot's deadline:
    │                              nothing was sent; book a new slot
    └── Paused                     the fleet may not call now; the image stays pending
        ├── FleetStopped           a fatal error stopped the fleet (carries the code)
        ├── CircuitOpen            most recent calls failed: the service looks down
        ├── QuotaExhausted         the call quota for this window is spent
        ├── RedisUnavailable       the shared state cannot be reached: hold calls and wait for
        │                          it (a restart, a partition); never parked for it alone
        └── ShuttingDown           this worker node is shutting down (SIGTERM, a rolling
                                   restart): what it has not called yet is handed back

Foreign exceptions (httpx, botocore, oss2) are translated where they enter; none leak upward.
Messages never contain secrets or signed query strings. This module imports nothing of ours.
"""

from __future__ import annotations

import enum

__all__ = [
    "AccessDenied",
    "ApiError",
    "BadImageError",
    "CarnumberError",
    "CircuitOpen",
    "ConfigError",
    "FatalApiError",
    "FleetStopped",
    "ImageRejected",
    "InputError",
    "ObjectChanged",
    "Paused",
    "QuotaExhausted",
    "RedisUnavailable",
    "RetryableApiError",
    "ShuttingDown",
    "SlotMissed",
    "StorageCredentialsError",
    "TransportError",
    "UnreadableAnswer",
    "Verdict",
]


class Verdict(enum.StrEnum):
    """What to do after a failed attempt."""

    RETRY = "retry"
    BAD_INPUT = "bad_input"
    FATAL = "fatal"


class CarnumberError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(CarnumberError):
    """A setting is missing or breaks a rule; the message names the variable and the rule."""


class StorageCredentialsError(ConfigError):
    """The object store refused *our* credentials: an expired or revoked token, a key it does not
    know, a signature it rejects, a clock too far off, or access denied to a whole bucket. Every
    image of that store would fail alike, so the fleet stops with ``code`` (images stay pending)
    until an operator fixes the credentials and resumes the run."""

    code = "local.storageCredentials"


class InputError(CarnumberError):
    """An input (source URI, manifest line, path) is unusable; the message names it and the rule."""


class AccessDenied(InputError):
    """The object store answered 403 AccessDenied for one object. Alone it may concern that object
    (its ACL, a prefix policy) or our credentials (a policy revoked): the resolver tells them apart
    by whether other objects of the bucket were readable."""


class ImageRejected(CarnumberError):
    """A local check refused an image before any call was spent on it.

    ``code`` is a local error code (``local.<rule>``) recorded in the output row.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ApiError(CarnumberError):
    """An error answer from RecognizeCarNumber (or a compatible server)."""

    verdict: Verdict = Verdict.RETRY

    def __init__(
        self,
        status: int,
        code: str,
        message: str = "",
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" if message else f"HTTP {status} {code}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s


class RetryableApiError(ApiError):
    verdict = Verdict.RETRY


class BadImageError(ApiError):
    verdict = Verdict.BAD_INPUT


class FatalApiError(ApiError):
    verdict = Verdict.FATAL


class TransportError(CarnumberError):
    """No usable answer: a timeout, a connection error, or (:class:`UnreadableAnswer`) a body that
    is not the documented JSON.

    ``code`` is a stable local name (``local.timeout``, ``local.connection``).
    """

    verdict = Verdict.RETRY

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class UnreadableAnswer(TransportError):
    """A 2xx answer whose body is not the documented envelope: not JSON, an HTML page, no ``Data``,
    ``Data`` not JSON, fields of the wrong type.

    Unlike a lost connection, the call was answered and billed, and the same picture is most
    likely answered the same way again: the retry policy calls once more, then fails the image.
    ``raw`` is the start of the body as text, bounded and with secrets scrubbed by the parser
    (:func:`workers.api.response.unreadable`); ``size`` the body's length in bytes; ``status``
    and ``request_id`` the answer's, when known.
    """

    def __init__(
        self,
        message: str,
        raw: str = "",
        size: int = 0,
        status: int = 200,
        request_id: str | None = None,
    ) -> None:
        super().__init__("local.unreadableAnswer", message)
        self.raw = raw
        self.size = size
        self.status = status
        self.request_id = request_id


class ObjectChanged(TransportError):
    """An object was overwritten between two reads of one check (its ETag no longer matched:
    HTTP 412 to an If-Match read): the check starts again on the new version."""

    def __init__(self, message: str) -> None:
        super().__init__("local.objectChanged", message)


class SlotMissed(CarnumberError):
    """The request would have started onto the wire ``late_s`` seconds after its deadline (its
    rate-limit slot plus what the pacing guard allows); it was not sent."""

    def __init__(self, late_s: float) -> None:
        super().__init__(f"request held up {late_s * 1000:.1f} ms past its rate-limit slot's deadline")
        self.late_s = late_s


class Paused(CarnumberError):
    """The fleet may not make calls now; the image is left pending, not failed."""

    state = "paused"


class FleetStopped(Paused):
    """A fatal error (``code``) stopped every worker until an operator resumes the run."""

    state = "stopped"

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(
            f"fleet stopped by {code}: {message}" if message else f"fleet stopped by {code}"
        )
        self.code = code


class CircuitOpen(Paused):
    state = "circuit_open"


class QuotaExhausted(Paused):
    """The call quota is spent. When known: ``limit``, ``window`` (``day``/``total``) and
    ``resets_at_s`` (Unix seconds when the window resets; ``None`` = never)."""

    state = "quota_exhausted"
    limit: int | None = None
    window: str | None = None
    resets_at_s: int | None = None


class RedisUnavailable(Paused):
    """Redis (limiter, quota, stop flag, journal) cannot be reached. No call goes out without
    it; the pipeline waits for it to come back (``CARNUMBER_REDIS_OUTAGE_S`` at most) instead of
    parking, so a Redis restart never needs an operator."""

    state = "redis_unavailable"


class ShuttingDown(Paused):
    """This worker node is shutting down (SIGTERM, a rolling restart, an unrecoverable error):
    calls in flight finish, images not called yet are handed back to the queue at once."""

    state = "shutdown"

