"""The one retry policy: what a task does after one call for one image went wrong.

Pure: no I/O, no clock, no Redis. The pipeline makes a call, and on an error asks
:meth:`RetryPolicy.decide` for a :class:`Decision`:

``retry``  sleep ``delay_s``, pass the gate again, call again (a fresh date and nonce).
``fail``   write a terminal ``failed`` row with ``code`` / ``message``; ``retryable`` says whether a
           later run might succeed (attempts ran out on a transient error) or not (bad input);
           :attr:`Decision.journal` whether the failure is the picture's paid answer for this run
           (bad input, an answer still unreadable after its retry), which copies reuse.
``stop``   make no further call for this image; it stays pending. When :attr:`Decision.stops_fleet`
           (a fatal code: credentials, signature, billing) the caller also stops the fleet with
           :meth:`workers.fleet.FleetControl.stop`; every other worker halts within seconds.

The classification of API codes is :func:`workers.api.codes.classify`, not repeated here. The
backoff is "full jitter" (AWS architecture blog, 2015): a uniform draw below an exponential ceiling,
so retries of many workers spread out instead of arriving in waves. See ``ops/design/retries.md``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from workers.api.codes import classify
from workers.errors import (
    ApiError,
    ConfigError,
    FleetStopped,
    ImageRejected,
    InputError,
    Paused,
    TransportError,
    UnreadableAnswer,
    Verdict,
)
from workers.message import redact_url

if TYPE_CHECKING:
    from workers.config import Settings

__all__ = [
    "IMAGE_TIMEOUT_ATTEMPTS",
    "THROTTLED_WAIT_S",
    "UNREADABLE_ATTEMPTS",
    "Action",
    "Decision",
    "RetryPolicy",
    "backoff",
    "safe_message",
    "service_ok",
]

Action = Literal["retry", "fail", "stop"]

# A throttled call is not sent again at once (the service's own advice): after a second its
# window has moved on. The shared rate's reaction is the limiter's (``workers/ratelimit/adapt.py``).
THROTTLED_WAIT_S = 1.0

# ``imageTimeOut``: the service could not fetch our URL in time. A slow origin rarely recovers
# within seconds, so it gets a few calls only, however many ``max_attempts`` allows.
IMAGE_TIMEOUT_ATTEMPTS = 3
# An answer we cannot read (``UnreadableAnswer``) was billed, and the same picture is most likely
# answered the same way again: one more call tells a glitch from a rule, and no more is spent.
UNREADABLE_ATTEMPTS = 2

_MESSAGE_MAX_CHARS = 300
_URL = re.compile(r"https?://[^\s\"'<>]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def backoff(
    attempt: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed call number ``attempt`` (counted from 1), with full jitter.

    A uniform draw from ``[0, min(cap_s, base_s * 2 ** (attempt - 1))]``. Raises ``ValueError`` for
    ``attempt < 1`` or a negative ``base_s`` / ``cap_s``.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if base_s < 0 or cap_s < 0:
        raise ValueError(f"base_s and cap_s must be >= 0, got {base_s}, {cap_s}")
    # 2 ** 64 times any sane base is past any cap; clamping keeps the float finite.
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, 64))
    return (rng or random).uniform(0.0, ceiling)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after one failed call. ``delay_s`` is in seconds (0 unless ``retry``).

    ``code`` is the service's error code or a local one (``local.timeout``, ``local.internal``);
    ``message`` is short and free of secrets and signed query strings. ``journal`` (with ``fail``):
    the failure is what the service answered for this picture, billed, and a new call in this run
    would answer the same: the caller journals it so copies of the picture do not pay again.
    """

    action: Action
    delay_s: float
    retryable: bool
    code: str
    message: str
    journal: bool = False

    @property
    def stops_fleet(self) -> bool:
        """True when every worker must stop (a fatal code), not only this image's loop."""
        return self.action == "stop" and not self.retryable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff parameters (seconds) and the number of calls one image may cost.

    ``max_attempts`` counts calls, the first included: 6 means one call and at most five retries.
    ``image_timeout_attempts`` and ``unreadable_attempts`` cap the calls of an image whose latest
    call ended in ``imageTimeOut`` / an unreadable answer, counted like ``max_attempts``.
    """

    base_s: float = 0.5
    cap_s: float = 30.0
    max_attempts: int = 6
    image_timeout_attempts: int = IMAGE_TIMEOUT_ATTEMPTS
    unreadable_attempts: int = UNREADABLE_ATTEMPTS
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s <= 0:
            raise ValueError(f"base_s and cap_s must be > 0, got {self.base_s}, {self.cap_s}")
        if min(self.max_attempts, self.image_timeout_attempts, self.unreadable_attempts) < 1:
            raise ValueError(
                "max_attempts, image_timeout_attempts and unreadable_attempts must be >= 1, got "
                f"{self.max_attempts}, {self.image_timeout_attempts}, {self.unreadable_attempts}"
            )

    @classmethod
    def from_settings(cls, settings: Settings, *, rng: random.Random | None = None) -> RetryPolicy:
        """The policy from ``retry_base_s``, ``retry_cap_s`` and ``max_attempts``."""
        return cls(
            base_s=settings.retry_base_s,
            cap_s=settings.retry_cap_s,
            max_attempts=settings.max_attempts,
            rng=rng,
        )

    def decide(self, attempt: int, error: BaseException, unreadable: int | None = None) -> Decision:
        """The next step after call number ``attempt`` (from 1) for one image raised ``error``;
        ``unreadable``: how many of the image's calls gave an unreadable answer, this one
        included (None: count every call as one, as before a caller counts them).

        Never raises for any ``error``; raises ``ValueError`` only for ``attempt < 1``.
        """
        if attempt < 1:
            raise ValueError(f"attempt counts from 1, got {attempt}")
        if isinstance(error, ApiError):
            return self._api(attempt, error)
        if isinstance(error, UnreadableAnswer):
            return self._unreadable(attempt, error, attempt if unreadable is None else unreadable)
        if isinstance(error, TransportError):
            return self._transient(attempt, error.code, error.message, None, self.max_attempts)
        if isinstance(error, ImageRejected):
            return Decision("fail", 0.0, False, error.code, safe_message(error.message))
        if isinstance(error, InputError):
            return Decision("fail", 0.0, False, "local.input", safe_message(str(error)))
        if isinstance(error, ConfigError):
            # This worker cannot call at all; failing every image would bury the run in rows.
            return Decision("stop", 0.0, False, "local.config", safe_message(str(error)))
        if isinstance(error, Paused):
            # Not a failure of the image: the gate said "not now". It stays pending.
            code = error.code if isinstance(error, FleetStopped) else f"local.{error.state}"
            return Decision("stop", 0.0, True, code, safe_message(str(error)))
        if not isinstance(error, Exception):
            # CancelledError, KeyboardInterrupt: the worker is going away; the image stays pending.
            return Decision("stop", 0.0, True, "local.interrupted", type(error).__name__)
        return Decision(
            "fail", 0.0, False, "local.internal", safe_message(f"{type(error).__name__}: {error}")
        )

    def _api(self, attempt: int, error: ApiError) -> Decision:
        message = safe_message(error.message or str(error))
        verdict = classify(error.code, error.status)
        if verdict is Verdict.FATAL:
            return Decision("stop", 0.0, False, error.code, message)
        if verdict is Verdict.BAD_INPUT:
            return Decision("fail", 0.0, False, error.code, message, journal=True)
        limit = self.max_attempts
        if error.code.lower() == "imagetimeout":
            limit = min(limit, self.image_timeout_attempts)
        return self._transient(attempt, error.code, message, error.retry_after_s, limit)

    def _unreadable(self, attempt: int, error: UnreadableAnswer, unreadable: int) -> Decision:
        """Call once more; then fail, retryable by a later run (the parser or the service may be
        fixed by then), with the start of the answer in the message, and journalled."""
        if unreadable < self.unreadable_attempts and attempt < self.max_attempts:
            return self._transient(attempt, error.code, error.message, None, self.max_attempts)
        answer = "an empty answer"
        if error.size:
            answer = f"the answer, {error.size} bytes: {_printable(error.raw)}"
        message = safe_message(f"{error.message} (gave up after {attempt} calls); {answer}")
        return Decision("fail", 0.0, True, error.code, message, journal=True)

    def _transient(
        self, attempt: int, code: str, message: str, retry_after_s: float | None, limit: int
    ) -> Decision:
        message = safe_message(message)
        if attempt >= limit:
            return Decision("fail", 0.0, True, code, f"{message} (gave up after {attempt} calls)")
        if retry_after_s is not None:
            delay = min(max(0.0, retry_after_s), self.cap_s)
        else:
            delay = backoff(attempt, base_s=self.base_s, cap_s=self.cap_s, rng=self.rng)
            if code.lower().startswith("throttling"):
                delay += THROTTLED_WAIT_S
        return Decision("retry", delay, True, code, message)


def service_ok(error: BaseException | None) -> bool | None:
    """What a call's outcome says about the service, for :meth:`CircuitBreaker.record`.

    ``True``: the service answered (a result, a bad-input refusal, or throttling, which the rate
    limiter handles); ``False``: it looks down (5xx, service timeouts, no usable answer: an
    unreadable answer too, so that when every answer is unreadable, as after an API change, the
    breaker stops paying for them);
    ``None``: nothing to record (fatal codes stop the fleet anyway; local errors made no call).
    """
    if error is None:
        return True
    if isinstance(error, TransportError):
        return False
    if isinstance(error, ApiError):
        verdict = classify(error.code, error.status)
        if verdict is Verdict.FATAL:
            return None
        code = error.code.lower()
        # Throttling is the rate limiter's business; imageTimeOut is our image origin being slow.
        return (
            verdict is Verdict.BAD_INPUT or code.startswith("throttling") or code == "imagetimeout"
        )
    return None


def _printable(text: str) -> str:
    """``text`` on one line: control characters (line breaks included) as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def safe_message(text: str) -> str:
    """``text`` with every URL's signature and credential parameters removed, at most 300 chars."""
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    if len(text) > _MESSAGE_MAX_CHARS:
        text = text[: _MESSAGE_MAX_CHARS - 3] + "..."
    return text
