"""The RecognizeCarNumber client: one request builder, one response reader, two thin transports.

:func:`build_request` and :func:`read_response` hold all the logic and are pure.
:class:`Client` (sync) and :class:`AsyncClient` (async) each add only the one line that sends,
plus the translation of httpx's exceptions, done once in :func:`_translate`. Both take their
``httpx`` client as an argument, so tests and benchmarks hand in their own transport or pool.

Each attempt gets a fresh ``x-acs-date`` and nonce, and credentials asked of the credential
provider (``workers/credentials.py``) at that moment, so a rotating STS token is picked up the
moment it is refreshed. An answer ``InvalidSecurityToken.Expired`` (the token ran out between
signing and the service's check) renews the provider: when that yields a new token the attempt
counts as a transient failure (``local.tokenExpired``, retried with backoff); when it cannot, the
service's code stands and stops the fleet. Any other fatal answer (a revoked token, an unknown
key) stops the fleet too, and the provider drops those credentials, so that the calls after
``carnumber resume`` are signed with fresh ones. Exceptions and logs never carry the secret, a token or
a signed URL's query string: URLs in messages pass through :func:`redact_url`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from workers.api.codes import api_error
from workers.api.response import Recognition, parse_envelope, unreadable
from workers.api.signing import canonical_query, sha256_hex, sign
from workers.config import Credentials, Settings
from workers.credentials import Provider, as_provider
from workers.errors import ApiError, FatalApiError, ImageRejected, SlotMissed, TransportError
from workers.message import redact_url

__all__ = [
    "ACTION",
    "VERSION",
    "AsyncClient",
    "Client",
    "Image",
    "PreparedRequest",
    "build_request",
    "http_timeout",
    "read_response",
    "warm_up",
]

# httpx logs every request URL at INFO; with ``Url`` images that URL embeds the image's own
# (possibly presigned) address. Our own logs name images by id and redacted source instead.
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

ACTION = "RecognizeCarNumber"
VERSION = "2021-07-07"
MAX_URL_BYTES = 2048
MAX_BODY_BYTES = 10 * 1024 * 1024
USER_AGENT = "carnumber/0.1 (+https://github.com/; ACS3)"


@dataclass(frozen=True, slots=True)
class Image:
    """Exactly one of ``url`` (the service fetches it) or ``body`` (raw image bytes).
    ``content_key``: what identifies the picture itself (``workers/content.py``), when known."""

    url: str | None = None
    body: bytes | None = None
    content_key: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if (self.url is None) == (self.body is None):
            raise ValueError("Image needs exactly one of url or body")
        if self.url is not None and len(self.url.encode("utf-8")) > MAX_URL_BYTES:
            raise ImageRejected(
                "local.urlTooLong",
                f"URL is {len(self.url.encode('utf-8'))} bytes; the API allows at most {MAX_URL_BYTES}",
            )
        if self.body is not None and len(self.body) > MAX_BODY_BYTES:
            raise ImageRejected(
                "local.imageTooLarge",
                f"image is {len(self.body)} bytes; the API allows at most {MAX_BODY_BYTES}",
            )


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    method: str
    url: str
    headers: dict[str, str]
    content: bytes


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_request(
    endpoint: str,
    credentials: Credentials,
    image: Image,
    *,
    date: str | None = None,
    nonce: str | None = None,
) -> PreparedRequest:
    """A signed ``POST /`` for one image. ``date``/``nonce`` default to now and a fresh UUID."""
    parts = urlsplit(endpoint)
    params = {"Url": image.url} if image.url is not None else {}
    body = image.body or b""
    headers = {
        "host": parts.netloc,
        "x-acs-action": ACTION,
        "x-acs-version": VERSION,
        "x-acs-date": date or _utc_now(),
        "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
        "x-acs-content-sha256": sha256_hex(body),
        "accept": "application/json",
        "user-agent": USER_AGENT,
    }
    if image.body is not None:
        headers["content-type"] = "application/octet-stream"
    if credentials.security_token:
        headers["x-acs-accesskey-id"] = credentials.access_key_id
        headers["x-acs-security-token"] = credentials.security_token
    headers["Authorization"] = sign(
        "POST", params, headers, credentials.access_key_id, credentials.access_key_secret
    )
    query = canonical_query(params)
    base = f"{parts.scheme}://{parts.netloc}/"
    return PreparedRequest("POST", f"{base}?{query}" if query else base, headers, body)


def read_response(status: int, headers: httpx.Headers | dict[str, str], body: bytes) -> Recognition:
    """The parsed result of a 2xx answer; otherwise raise the classified :class:`ApiError`
    (:class:`UnreadableAnswer` for a 2xx that is not the documented envelope)."""
    doc: Any = None
    try:
        doc = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        doc = None
    code, message, request_id = _error_fields(doc)
    if status < 300 and (code is None or code in ("200", "OK", "Success")):
        # Not the envelope: UnreadableAnswer, keeping the start of the body as received.
        rid = headers.get("x-acs-request-id")
        if doc is None:
            raise unreadable(f"HTTP {status} body is not JSON", body, status=status, request_id=rid)
        return parse_envelope(doc, raw=body, request_id=rid)
    retry_after_s = _retry_after_s(headers)
    if code is None:
        # A gateway page, or JSON without a Code: classify by status alone.
        code = f"HTTP.{status}"
        message = message or (body[:200].decode("utf-8", "replace") if doc is None else "")
    raise api_error(status, code, message or "", request_id, retry_after_s)


def _error_fields(doc: Any) -> tuple[str | None, str | None, str | None]:
    if not isinstance(doc, dict):
        return None, None, None
    code = doc.get("Code", doc.get("code"))
    message = doc.get("Message", doc.get("message"))
    request_id = doc.get("RequestId", doc.get("requestId"))
    return (
        None if code is None else str(code),
        None if message is None else str(message),
        None if request_id is None else str(request_id),
    )


def _retry_after_s(headers: httpx.Headers | dict[str, str]) -> float | None:
    raw = headers.get("x-acs-retry-after")
    try:
        return max(0.0, float(raw) / 1000.0) if raw is not None else None
    except ValueError:
        return None


def _translate(exc: httpx.HTTPError, endpoint: str) -> TransportError:
    """The one place where httpx's exceptions become ours."""
    where = redact_url(endpoint)
    if isinstance(exc, httpx.TimeoutException):
        return TransportError("local.timeout", f"{type(exc).__name__} talking to {where}")
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        return TransportError("local.connection", f"{type(exc).__name__} talking to {where}")
    return TransportError("local.transport", f"{type(exc).__name__} talking to {where}")


def http_timeout(settings: Settings) -> httpx.Timeout:
    return httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.read_timeout_s,
        write=settings.read_timeout_s,
        pool=None,  # waiting for a pooled connection is bounded by our own concurrency limit
    )


# The gateway's answer to a token past its expiry (Alibaba Cloud's common error codes).
TOKEN_EXPIRED = "InvalidSecurityToken.Expired"


class _Base:
    """``credentials``: a fixed :class:`Credentials` or a provider asked at each signing."""

    def __init__(self, endpoint: str, credentials: Credentials | Provider) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.credentials = as_provider(credentials)

    def forget_credentials(self) -> None:
        """The fleet stopped: the next signing (after ``carnumber resume``) fetches fresh ones."""
        self.credentials.forget()

    def _prepare(self, image: Image, used: Credentials | None = None) -> PreparedRequest:
        """The signed request, with ``used`` or the provider's current credentials."""
        return build_request(self.endpoint, used or self.credentials.current(), image)

    def _read(self, resp: httpx.Response, used: Credentials) -> Recognition:
        try:
            return read_response(resp.status_code, resp.headers, resp.content)
        except ApiError as exc:
            if exc.code == TOKEN_EXPIRED and self.credentials.renew(used):
                raise TransportError(
                    "local.tokenExpired",
                    "the STS token expired before the service checked it; renewed, call again",
                ) from None
            if isinstance(exc, FatalApiError):
                # It stops the fleet; after `carnumber resume` sign with fresh credentials.
                self.credentials.discard(used)
            raise


class Client(_Base):
    """Synchronous client over an ``httpx.Client`` you own (pooling, proxies, transport)."""

    def __init__(self, endpoint: str, credentials: Credentials | Provider, http: httpx.Client) -> None:
        super().__init__(endpoint, credentials)
        self.http = http

    def recognize(self, image: Image) -> Recognition:
        """One attempt. Raises :class:`ApiError` subclasses or :class:`TransportError`."""
        used = self.credentials.current()
        req = self._prepare(image, used)
        try:
            resp = self.http.request(req.method, req.url, headers=req.headers, content=req.content)
        except httpx.HTTPError as exc:
            raise _translate(exc, self.endpoint) from None
        return self._read(resp, used)


class AsyncClient(_Base):
    """Asynchronous client over an ``httpx.AsyncClient`` you own."""

    def __init__(
        self, endpoint: str, credentials: Credentials | Provider, http: httpx.AsyncClient
    ) -> None:
        super().__init__(endpoint, credentials)
        self.http = http

    async def recognize(self, image: Image, *, send_by: float = math.inf) -> Recognition:
        """One attempt. Raises :class:`ApiError` subclasses or :class:`TransportError`.

        ``send_by`` (``time.monotonic()`` seconds): the request's first byte must go out by then,
        checked by the HTTP connection right before it writes (after signing, connection pooling
        and any stall of this process); past it nothing is sent and :class:`SlotMissed` is
        raised. The rate limiter's slot sets it (``workers.ratelimit.Slot``)."""
        used = await self.credentials.acurrent()
        req = self._prepare(image, used)
        extensions = {} if math.isinf(send_by) else {"trace": _deadline(send_by)}
        try:
            resp = await self.http.request(
                req.method, req.url, headers=req.headers, content=req.content,
                extensions=extensions,
            )
        except httpx.HTTPError as exc:
            raise _translate(exc, self.endpoint) from None
        if resp.status_code >= 300 and b"InvalidSecurityToken.Expired" in resp.content:
            # renew() may fetch over the network: not on the event loop.
            return await asyncio.to_thread(self._read, resp, used)
        return self._read(resp, used)


def _deadline(send_by: float) -> Callable[[str, Any], Awaitable[None]]:
    """An httpcore ``trace`` hook that refuses to start writing a request after ``send_by``
    (httpcore leaves the connection idle and reusable when a hook raises before the write)."""

    async def hook(event: str, info: Any) -> None:
        if event.endswith(".send_request_headers.started"):
            late_s = time.monotonic() - send_by
            if late_s > 0:
                raise SlotMissed(late_s)

    return hook


def warm_up() -> None:
    """Load now what httpx's async path loads lazily, so a process's first call leaves on time.

    Measured (httpx 0.28, httpcore 1.0, anyio 4): the first ``httpx.AsyncClient()`` imports
    httpcore and its backends (~100 ms), and the first request imports anyio's asyncio backend
    (~20 ms idle, ~100 ms on a busy host) *after* the rate limiter's slot, which delivers that
    call late. Opening and closing a client inside ``anyio.run`` loads both; no connection is made.
    Called once per worker before the pool forks (``worker_init``), so pool processes inherit it.
    """
    import anyio

    async def _open_and_close() -> None:
        async with httpx.AsyncClient():
            pass

    anyio.run(_open_and_close)
