"""Alibaba Cloud OSS objects through oss2: HEAD, GET, signed GET URLs, listings.

oss2 is imported when the first ``oss://`` URI is used (``pip install 'carnumber[oss]'``).
Endpoint: ``settings.oss_endpoint`` (``CARNUMBER_OSS_ENDPOINT``), e.g.
``oss-cn-hangzhou.aliyuncs.com`` or the internal ``oss-cn-hangzhou-internal.aliyuncs.com``
(``https://`` is added when no scheme is given). Credentials: ``OSS_ACCESS_KEY_ID`` /
``OSS_ACCESS_KEY_SECRET`` (+ ``OSS_SESSION_TOKEN`` for STS), else the same credential chain as the
API's (``workers/credentials.py``: a fixed key, a profile, an ECS or OIDC role, a credentials
URI), asked at each request through oss2's ``ProviderAuth``, so rotating tokens are picked up.
A signed URL carries the token it was signed with: it works until the earlier of its own expiry
and the token's (refreshed with at least ``min(15 min, half its lifetime)`` left).

Reads (HEAD, GET, listings) use the configured endpoint, internal ones included. Signed URLs are
fetched by the OCR service, which is not inside your VPC, so they are signed for the *public*
counterpart of an internal endpoint (``-internal`` removed). oss2's exceptions become ours in
:func:`_translate`: missing object/bucket → :class:`InputError`; 403 AccessDenied →
:class:`AccessDenied`; credentials OSS refuses (unknown key, bad signature, expired or invalid STS
token, clock skew) → :class:`StorageCredentialsError`; a failed If-Match →
:class:`ObjectChanged`; network trouble and 5xx → :class:`TransportError`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from workers.config import Credentials, Settings
from workers.credentials import Provider, StaticProvider, provider_from_settings
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

__all__ = ["OssStore", "public_endpoint"]


# OSS refuses our credentials themselves: every request with them fails alike.
_CREDENTIALS = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidSecurityToken",
        "SecurityTokenExpired",
        "RequestTimeTooSkewed",
        "AccessKeyDisabled",
        "UserDisable",
    }
)


def public_endpoint(endpoint: str) -> str:
    """The Internet endpoint of an internal one: ``oss-cn-x-internal.aliyuncs.com`` →
    ``oss-cn-x.aliyuncs.com``; other endpoints unchanged."""
    return endpoint.replace("-internal.aliyuncs.com", ".aliyuncs.com")


class OssStore:
    """oss2 buckets over one shared HTTP session (thread-safe for our use).

    ``page_size``: keys per ListObjectsV2 request (OSS caps it at 1000).
    """

    scheme = "oss"

    def __init__(self, settings: Settings, *, page_size: int = 1000) -> None:
        self.page_size = page_size
        self.oss2: Any = require("oss2")
        if not settings.oss_endpoint:
            raise ConfigError(
                "oss:// sources need CARNUMBER_OSS_ENDPOINT "
                "(e.g. oss-cn-hangzhou.aliyuncs.com or oss-cn-hangzhou-internal.aliyuncs.com)"
            )
        endpoint = settings.oss_endpoint
        if "://" not in endpoint:
            endpoint = "https://" + endpoint
        self.endpoint = endpoint.rstrip("/")
        self.sign_endpoint = public_endpoint(self.endpoint)
        self.auth = self.oss2.ProviderAuth(_OssCredentials(self.oss2, _provider(settings)))
        self.connect_timeout_s = settings.connect_timeout_s
        self.session = self.oss2.Session()
        self._buckets: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _bucket(self, name: str, endpoint: str | None = None) -> Any:
        endpoint = endpoint or self.endpoint
        with self._lock:
            bucket = self._buckets.get((endpoint, name))
            if bucket is None:
                try:
                    bucket = self.oss2.Bucket(
                        self.auth,
                        endpoint,
                        name,
                        session=self.session,
                        connect_timeout=self.connect_timeout_s,
                    )
                except Exception as exc:  # oss2 validates bucket names eagerly
                    raise _translate(self.oss2, exc, f"oss://{name}") from None
                self._buckets[(endpoint, name)] = bucket
            return bucket

    def head(self, bucket: str, key: str) -> int:
        b = self._bucket(bucket)
        try:
            return int(b.head_object(key).content_length)
        except Exception as exc:
            raise _translate(self.oss2, exc, _where(bucket, key)) from None

    def get(self, bucket: str, key: str, max_bytes: int, *, if_match: str | None = None) -> bytes:
        b = self._bucket(bucket)
        where = _where(bucket, key)
        try:
            result = b.get_object(key, headers=_condition(if_match))
            size = int(result.content_length)
            if size > max_bytes:
                result.resp.response.close()
                raise ImageRejected(
                    "local.imageTooLarge",
                    f"object is {size} bytes; the API allows at most {max_bytes}",
                )
            data: bytes = result.read()
        except CarnumberError:
            raise
        except Exception as exc:
            raise _translate(self.oss2, exc, where) from None
        if len(data) != size:
            raise TransportError("local.connection", f"{where}: got {len(data)} of {size} bytes")
        return data

    def get_range(
        self, bucket: str, key: str, offset: int, length: int, *, if_match: str | None = None
    ) -> RangeRead:
        if offset < 0 or length < 1:
            raise ValueError(f"bad range: offset {offset}, length {length}")
        b = self._bucket(bucket)
        try:
            # OSS answers an invalid range (offset past the end, an empty object) with the whole
            # object and 200 unless asked for the standard behaviour: then 416, nothing sent.
            result = b.get_object(
                key,
                byte_range=(offset, offset + length - 1),
                headers={"x-oss-range-behavior": "standard", **_condition(if_match)},
            )
            headers = result.headers
            content_range = headers.get("Content-Range") or ""
            if "/" in content_range:
                data: bytes = result.read(length)
                total = content_range.rsplit("/", 1)[1].strip()
                size = int(total) if total.isdigit() else offset + len(data)
            else:  # the whole object came back
                size = int(result.content_length)
                data = result.read(offset + length)[offset:]
            result.resp.response.close()
        except Exception as exc:
            if getattr(exc, "status", None) == 416:
                return RangeRead(b"", offset, _size_of_416(exc))
            raise _translate(self.oss2, exc, _where(bucket, key)) from None
        etag = (headers.get("ETag") or "").strip('"') or None
        version = headers.get("x-oss-version-id") or None
        return RangeRead(data, offset, size, headers.get("Content-Type") or None, etag, version)

    def etag(self, bucket: str, key: str) -> str | None:
        b = self._bucket(bucket)
        try:
            meta = b.head_object(key)
        except Exception as exc:
            err = _translate(self.oss2, exc, _where(bucket, key))
            if isinstance(err, InputError) and not isinstance(err, AccessDenied):
                return None  # gone
            raise err from None
        return str(meta.etag or "").strip('"') or None

    def presign(self, bucket: str, key: str, ttl_s: int, *, version_id: str | None = None) -> str:
        b = self._bucket(bucket, self.sign_endpoint)
        params = {"versionId": version_id} if version_id else None
        try:
            url: str = b.sign_url("GET", key, ttl_s, slash_safe=True, params=params)
        except Exception as exc:
            raise _translate(self.oss2, exc, _where(bucket, key)) from None
        return url

    def iter_objects(self, bucket: str, prefix: str) -> Iterator[ObjectInfo]:
        b = self._bucket(bucket)
        try:
            for obj in self.oss2.ObjectIteratorV2(b, prefix=prefix, max_keys=self.page_size):
                if obj.key.endswith("/") or obj.is_prefix():
                    continue
                modified = datetime.fromtimestamp(int(obj.last_modified), UTC)
                etag = str(obj.etag or "").strip('"') or None
                yield ObjectInfo(obj.key, int(obj.size), modified, etag)
        except Exception as exc:
            raise _translate(self.oss2, exc, f"oss://{bucket}/{prefix}") from None


def _provider(settings: Settings) -> Provider:
    """``OSS_ACCESS_KEY_ID`` / ``_SECRET`` (+ ``OSS_SESSION_TOKEN``) when set, else the chain."""
    if settings.oss_access_key_id or settings.oss_access_key_secret:
        if not settings.oss_access_key_id or not settings.oss_access_key_secret:
            raise ConfigError("oss:// sources: set both OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET")
        return StaticProvider(Credentials(
            settings.oss_access_key_id, settings.oss_access_key_secret,
            settings.oss_security_token or None,
        ), "oss")  # fmt: skip
    try:
        return provider_from_settings(settings)
    except ConfigError as exc:
        raise ConfigError(f"oss:// sources need credentials: OSS_ACCESS_KEY_ID and "
                          f"OSS_ACCESS_KEY_SECRET, or {exc}") from None


class _OssCredentials:
    """oss2's ``CredentialsProvider`` over ours: oss2 asks at each request and signed URL."""

    def __init__(self, oss2: Any, provider: Provider) -> None:
        self._oss2 = oss2
        self._provider = provider

    def get_credentials(self) -> Any:
        c = self._provider.current()
        return self._oss2.credentials.Credentials(
            c.access_key_id, c.access_key_secret, c.security_token or ""
        )


def _where(bucket: str, key: str) -> str:
    return f"oss://{bucket}/{key}"


def _condition(if_match: str | None) -> dict[str, str]:
    return {"If-Match": f'"{if_match}"'} if if_match else {}


def _size_of_416(exc: BaseException) -> int:
    """The object's size from a 416 answer's ``Content-Range: bytes */size`` (0 without one)."""
    headers = getattr(exc, "headers", None) or {}
    total = str(headers.get("Content-Range", "")).rsplit("/", 1)[-1].strip()
    return int(total) if total.isdigit() else 0


def _translate(oss2: Any, exc: BaseException, where: str) -> CarnumberError:
    """The one place oss2's exceptions become ours. Messages carry no signed URLs."""
    errors = oss2.exceptions
    if isinstance(exc, CarnumberError):
        return exc
    if isinstance(exc, errors.NotFound):
        return InputError(f"{where}: not found ({exc.code or exc.status})")
    if isinstance(exc, errors.RequestError):
        return TransportError("local.connection", f"{where}: OSS unreachable")
    if isinstance(exc, errors.ServerError):
        status, code = exc.status, exc.code
        if code in _CREDENTIALS:
            return StorageCredentialsError(f"{where}: OSS refused our credentials ({code})")
        if status == 412:
            return ObjectChanged(f"{where}: the object changed while it was being read")
        if status == 403:
            return AccessDenied(f"{where}: access denied ({code or status})")
        if status >= 500 or status == 429:
            return TransportError("local.storage", f"{where}: OSS answered {status} {code}")
        return InputError(f"{where}: OSS refused the request ({status} {code})")
    if isinstance(exc, errors.ClientError | ValueError):
        return InputError(f"{where}: not a valid OSS bucket or key")
    if isinstance(exc, errors.OssError | OSError):
        return TransportError("local.connection", f"{where}: {type(exc).__name__}")
    return TransportError("local.storage", f"{where}: {type(exc).__name__}")
