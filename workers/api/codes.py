"""RecognizeCarNumber error codes and the one function that classifies them.

The table follows ``shared/reference/recognize-car-number.md``. Codes are compared case-sensitively
first and then case-insensitively, because the service spells some both ways
(``IllegalImageUrl`` / ``illegalImageUrl``).
"""

from __future__ import annotations

from workers.errors import (
    ApiError,
    BadImageError,
    FatalApiError,
    RetryableApiError,
    Verdict,
)

__all__ = ["BAD_INPUT_CODES", "FATAL_CODES", "RETRYABLE_CODES", "api_error", "classify"]

RETRYABLE_CODES = frozenset(
    {
        "Throttling.User",
        "Throttling",
        "Throttling.Api",
        "InternalError",
        "ServiceUnavailable",
        "algorithmError",
        "AlgorithmTimeout",
        "ServiceTimeout",
        "imageTimeOut",
    }
)

BAD_INPUT_CODES = frozenset(
    {
        "IllegalImageUrl",
        "illegalImageUrl",
        "unmatchedImageType",
        "exceededImageUrlLength",
        "imageUrlOrBodyEmpty",
        "unsupportedEncodeImageUrl",
        "notSafeImageUrl",
        "MissingImageUrl",
        "exceededImageContent",
        "unsupportedImageFormat",
        "illegalImageSize",
    }
)

FATAL_CODES = frozenset(
    {
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "illegalSignature",
        "SignatureNonceUsed",
        "InvalidTimeStamp.Expired",
        "InvalidAccessKeyId.NotFound",
        "InvalidAccessKeyId.Inactive",
        "invalidStsToken",
        # Alibaba Cloud's common gateway codes for STS tokens. An expired token is renewed and
        # called again by the client first (workers/api/client.py); it stops the fleet only when
        # the credential source has nothing newer.
        "InvalidSecurityToken.Expired",
        "InvalidSecurityToken.Malformed",
        "InvalidSecurityToken.MismatchWithAccessKey",
        "MissingSecurityToken",
        "MissingAccessKeyId",
        "Forbidden.RAM",
        "noPermission",
        "ocrServiceNotOpen",
        "OcrServiceExpired",
        # The gateway refuses the action or version: every call would fail the same way.
        "InvalidAction.NotFound",
        "InvalidVersion",
    }
)

_BY_LOWER: dict[str, Verdict] = {
    **{c.lower(): Verdict.RETRY for c in RETRYABLE_CODES},
    **{c.lower(): Verdict.BAD_INPUT for c in BAD_INPUT_CODES},
    **{c.lower(): Verdict.FATAL for c in FATAL_CODES},
}

# Families the gateway extends over time (``Throttling.*``, ``InvalidAccessKeyId.*``, ...).
_PREFIXES: tuple[tuple[str, Verdict], ...] = (
    ("throttling", Verdict.RETRY),
    ("invalidaccesskeyid", Verdict.FATAL),
    ("invalidsecuritytoken", Verdict.FATAL),
    ("forbidden", Verdict.FATAL),
    ("invalidtimestamp", Verdict.FATAL),
    ("signature", Verdict.FATAL),
)

_CLASSES: dict[Verdict, type[ApiError]] = {
    Verdict.RETRY: RetryableApiError,
    Verdict.BAD_INPUT: BadImageError,
    Verdict.FATAL: FatalApiError,
}


def classify(code: str, status: int) -> Verdict:
    """Retry, bad input, or fatal, for an error answer with this ``Code`` and HTTP status.

    Unknown codes fall back on the status: 5xx and 429 retry; 401/403 are fatal (the account
    cannot call); any other 4xx is taken as a problem with this one image; anything else (an
    error code inside an HTTP 200, say) is retried.
    """
    verdict = _BY_LOWER.get(code.lower())
    if verdict is not None:
        return verdict
    for prefix, prefix_verdict in _PREFIXES:
        if code.lower().startswith(prefix):
            return prefix_verdict
    if status >= 500 or status == 429:
        return Verdict.RETRY
    if status in (401, 403):
        return Verdict.FATAL
    if 400 <= status < 500:
        return Verdict.BAD_INPUT
    return Verdict.RETRY


def api_error(
    status: int,
    code: str,
    message: str = "",
    request_id: str | None = None,
    retry_after_s: float | None = None,
) -> ApiError:
    """The typed exception for an error answer, of the class :func:`classify` chooses."""
    cls = _CLASSES[classify(code, status)]
    return cls(status, code, message, request_id, retry_after_s)
