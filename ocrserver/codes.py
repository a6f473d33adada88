"""The error answers the local server gives: HTTP status and message per ``Code``.

Statuses follow ``shared/reference/recognize-car-number.md`` and Alibaba Cloud's public gateway
error tables (``InvalidAccessKeyId.NotFound`` 404; ``InvalidAction.NotFound`` 404 "Specified api is
not found, please check your url and method."; the signature and timestamp codes 400;
``Throttling.User`` 400). Inside the server an error answer travels as the project's own
:class:`~workers.errors.ApiError`, built by :func:`reject`; the app turns it into the wire body
with :func:`error_body`. Messages never echo a secret, a signature or a signed URL.
"""

from __future__ import annotations

import json

from workers.errors import ApiError

__all__ = ["ERRORS", "error_body", "recommend_url", "reject"]

# Code -> (HTTP status, default message)
ERRORS: dict[str, tuple[int, str]] = {
    # gateway: routing
    "InvalidAction.NotFound": (404, "Specified api is not found, please check your url and method."),
    "InvalidVersion": (400, "Specified parameter Version is not valid."),
    # gateway: authentication
    "MissingAccessKeyId": (400, "AccessKeyId is mandatory for this action."),
    "IncompleteSignature": (400, "The request signature does not conform to Aliyun standards."),
    "InvalidAccessKeyId.NotFound": (404, "Specified access key is not found."),
    "SignatureDoesNotMatch": (400, "Specified signature does not match our calculation."),
    "SignatureNonceUsed": (400, "Specified signature nonce was used already."),
    "InvalidTimeStamp.Expired": (400, "Specified time stamp or date value is expired."),
    "InvalidTimeStamp.Format": (400, "Specified time stamp or date value is not well formatted."),
    "invalidStsToken": (400, "The security token you provided is invalid."),
    # gateway: temporary (STS) credentials, Alibaba Cloud's common error codes
    "MissingSecurityToken": (400, "SecurityToken is mandatory for this action."),
    "InvalidSecurityToken.Malformed": (400, "Specified SecurityToken is malformed."),
    "InvalidSecurityToken.MismatchWithAccessKey": (
        400, "Specified SecurityToken mismatch with the AccessKey.",
    ),
    "InvalidSecurityToken.Expired": (400, "Specified SecurityToken is expired."),
    # gateway: flow control
    "Throttling.User": (400, "Request was denied due to user flow control."),
    # service: image intake
    "imageUrlOrBodyEmpty": (400, "Exactly one of Url and body must be given."),
    "exceededImageUrlLength": (400, "The image URL is longer than 2048 bytes."),
    "IllegalImageUrl": (400, "The image URL is not a valid, downloadable http(s) URL."),
    "illegalImageUrl": (400, "The image URL is not a valid, downloadable http(s) URL."),
    "notSafeImageUrl": (400, "The image URL points to a host the service may not fetch from."),
    "imageTimeOut": (400, "Downloading the image from the URL timed out."),
    "exceededImageContent": (413, "The image is larger than 10 MB."),
    "unsupportedImageFormat": (415, "The image format is not supported (PNG, JPG, BMP, GIF, TIFF, WebP)."),
    "illegalImageSize": (416, "Image sides must be > 15 and < 8192 px, long/short side < 50."),
    # service: failures
    "InternalError": (500, "The request processing has failed due to some unknown error."),
    "ServiceUnavailable": (503, "The request has failed due to a temporary failure of the server."),
    "ServiceTimeout": (504, "The request processing has timed out."),
}


def reject(code: str, detail: str | None = None, status: int | None = None) -> ApiError:
    """The :class:`ApiError` for ``code``, with the table's status and message (``detail``
    appended when given). Unknown codes answer 400 unless ``status`` says otherwise."""
    default_status, message = ERRORS.get(code, (400, code))
    if detail:
        message = f"{message} ({detail.rstrip('.')})"
    return ApiError(status or default_status, code, message)


def recommend_url(code: str, request_id: str) -> str:
    return f"https://api.aliyun.com/troubleshoot?q={code}&product=ocr-api&requestId={request_id}"


def error_body(error: ApiError, request_id: str, host_id: str) -> bytes:
    """The gateway's JSON error body: ``RequestId``, ``HostId``, ``Code``, ``Message``, ``Recommend``."""
    return json.dumps(
        {
            "RequestId": request_id,
            "HostId": host_id,
            "Code": error.code,
            "Message": error.message,
            "Recommend": recommend_url(error.code, request_id),
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
