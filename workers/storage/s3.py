"""S3 (and S3-compatible) objects through boto3: HEAD, GET, presigned GET URLs, listings.

boto3 is imported when the first ``s3://`` URI is used (``pip install 'carnumber[s3]'``).
Credentials, region and ``AWS_ENDPOINT_URL`` come from boto3's own chain (environment,
profile, instance role); ``settings.s3_endpoint_url`` (``CARNUMBER_S3_ENDPOINT_URL``) wins
when set. botocore's exceptions become ours in :func:`_translate`, the one place they enter:
missing object/bucket → :class:`InputError`; 403 AccessDenied → :class:`AccessDenied` (the
resolver decides whether it concerns the object or our credentials); credentials the store
refuses (expired token, unknown key, bad signature, clock skew) → :class:`StorageCredentialsError`
(the fleet stops); a failed If-Match → :class:`ObjectChanged`; network trouble, timeouts, 5xx and
throttling → :class:`TransportError`; no credentials/region → :class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from workers.config import Settings
from workers.errors import (
    AccessDenied,
    CarnumberError,
    ConfigError,
    ImageRejected,
    InputError,
    ObjectChanged,
    StorageCredentialsError,
    TransportError,
)
from workers.storage.objects import ObjectInfo, RangeRead
from workers.storage.optional import require

__all__ = ["S3Store"]

_MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
_DENIED = {"AccessDenied", "403", "Forbidden"}
# The store refuses our credentials themselves: every request with them fails alike.
_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidToken",
    "InvalidClientTokenId",
    "AccountProblem",
    "AllAccessDisabled",
    "RequestTimeTooSkewed",
    "InvalidSecurity",
}


class S3Store:
    """One boto3 S3 client (thread-safe), built from settings, or the ``client`` you pass.

    ``attempts``: botocore's own tries per request (standard retry mode, for throttling and
    connection resets); ``page_size``: keys per listing request (S3 caps it at 1000).
    """

    scheme = "s3"

    def __init__(
        self, settings: Settings, client: Any = None, *, attempts: int = 3, page_size: int = 1000
    ) -> None:
        self.page_size = page_size
        if client is None:
            boto3 = require("boto3")
            botocore_config = require("botocore.config")
            config = botocore_config.Config(
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                retries={"mode": "standard", "max_attempts": attempts},
                max_pool_connections=max(10, settings.concurrency),
                signature_version="s3v4",
            )
            try:
                client = boto3.session.Session().client(
                    "s3", endpoint_url=settings.s3_endpoint_url or None, config=config
                )
            except Exception as exc:
                raise _translate(exc, "s3://") from None
        self.client = client

    def head(self, bucket: str, key: str) -> int:
        try:
            meta = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _translate(exc, _where(bucket, key)) from None
        return int(meta["ContentLength"])

    def get(self, bucket: str, key: str, max_bytes: int, *, if_match: str | None = None) -> bytes:
        where = _where(bucket, key)
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key, **_condition(if_match))
            size = int(resp["ContentLength"])
            body = resp["Body"]
            if size > max_bytes:
                body.close()
                raise ImageRejected(
                    "local.imageTooLarge",
                    f"object is {size} bytes; the API allows at most {max_bytes}",
                )
            data: bytes = body.read()
            body.close()
        except CarnumberError:
            raise
        except Exception as exc:
            raise _translate(exc, where) from None
        if len(data) != size:
            raise TransportError("local.connection", f"{where}: got {len(data)} of {size} bytes")
        return data

    def get_range(
        self, bucket: str, key: str, offset: int, length: int, *, if_match: str | None = None
    ) -> RangeRead:
        where = _where(bucket, key)
        if offset < 0 or length < 1:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        try:
            resp = self.client.get_object(
                Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}", **_condition(if_match)
            )
            body = resp["Body"]
            content_range = resp.get("ContentRange")
            if content_range:
                data: bytes = body.read(length)
                size = _total_size(content_range, offset + len(data))
            else:  # a store that ignored the Range header sent the whole object
                size = int(resp["ContentLength"])
                data = body.read(offset + length)[offset:]
            body.close()
        except Exception as exc:
            empty = _unsatisfiable(exc)
            if empty is not None:
                return RangeRead(b"", offset, empty)  # an empty object, or offset past the end
            raise _translate(exc, where) from None
        etag = str(resp.get("ETag") or "").strip('"') or None
        version = resp.get("VersionId") or None
        return RangeRead(data, offset, size, resp.get("ContentType") or None, etag, version)

    def etag(self, bucket: str, key: str) -> str | None:
        try:
            meta = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            err = _translate(exc, _where(bucket, key))
            if isinstance(err, InputError) and not isinstance(err, AccessDenied):
                return None  # gone
            raise err from None
        return str(meta.get("ETag") or "").strip('"') or None

    def presign(self, bucket: str, key: str, ttl_s: int, *, version_id: str | None = None) -> str:
        params = {"Bucket": bucket, "Key": key}
        if version_id:
            params["VersionId"] = version_id  # signed: the URL reads that version or nothing
        try:
            url: str = self.client.generate_presigned_url("get_object", Params=params, ExpiresIn=ttl_s)
        except Exception as exc:
            raise _translate(exc, _where(bucket, key)) from None
        return url

    def iter_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        where = f"s3://{bucket}/{prefix}"
        try:
            pages = paginator.paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    if obj["Key"].endswith("/"):
                        continue  # a "folder" marker, not an object
                    etag = str(obj.get("ETag") or "").strip('"') or None
                    yield ObjectInfo(obj["Key"], int(obj["Size"]), obj["LastModified"], etag)
        except Exception as exc:
            raise _translate(exc, where) from None


def _where(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def _condition(if_match: str | None) -> dict[str, str]:
    return {"IfMatch": f'"{if_match}"'} if if_match else {}


def _total_size(content_range: str | None, fallback: int) -> int:
    """The object's size from ``Content-Range: bytes a-b/size`` (``fallback`` without one: the
    store sent the whole object)."""
    if content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        if total.isdigit():
            return int(total)
    return fallback


def _unsatisfiable(exc: BaseException) -> int | None:
    """For a 416 (InvalidRange) answer, the object's size (``ActualObjectSize``, else 0); None
    for every other error."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    err = response.get("Error", {})
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if err.get("Code") != "InvalidRange" and status != 416:
        return None
    actual = str(err.get("ActualObjectSize", "0"))
    return int(actual) if actual.isdigit() else 0


def _translate(exc: BaseException, where: str) -> CarnumberError:
    """The one place botocore's exceptions become ours. Messages carry no URL query strings."""
    exceptions = require("botocore.exceptions")
    if isinstance(exc, exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _MISSING or status == 404:
            return InputError(f"{where}: not found ({code or status})")
        if code in _CREDENTIALS:
            return StorageCredentialsError(f"{where}: S3 refused our credentials ({code})")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectChanged(f"{where}: the object changed while it was being read")
        if code in _DENIED or status == 403:
            return AccessDenied(f"{where}: access denied ({code or status})")
        if status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout"):
            return TransportError("local.storage", f"{where}: S3 answered {status} {code}")
        return InputError(f"{where}: S3 refused the request ({status} {code})")
    if isinstance(exc, exceptions.NoCredentialsError | exceptions.PartialCredentialsError):
        return ConfigError(
            f"{where}: no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, exceptions.NoRegionError):
        return ConfigError(f"{where}: no S3 region (set AWS_DEFAULT_REGION)")
    if isinstance(exc, exceptions.ParamValidationError):
        return InputError(f"{where}: not a valid S3 bucket or key")
    if isinstance(exc, exceptions.ConnectTimeoutError | exceptions.ReadTimeoutError):
        return TransportError("local.timeout", f"{where}: {type(exc).__name__}")
    if isinstance(exc, exceptions.BotoCoreError | OSError):
        return TransportError("local.connection", f"{where}: {type(exc).__name__}")
    if isinstance(exc, CarnumberError):
        return exc
    return TransportError("local.storage", f"{where}: {type(exc).__name__}")
