"""Image intake: the ``Url`` xor body rule, the URL fetch, and the image checks.

Rules (product page and ``shared/reference``): exactly one of ``Url`` and a body
(``imageUrlOrBodyEmpty``); a URL of at most 2048 UTF-8 bytes (``exceededImageUrlLength``), plain
http(s) (``illegalImageUrl``); the image itself checked by :func:`workers.imagecheck.check_image`
and refused with the code the real service uses (:data:`workers.imagecheck.API_EQUIVALENT`).

URL fetching is deliberately narrow: only hosts in ``allowed_hosts`` (loopback by default; any
other host is ``notSafeImageUrl``, as a server must not be a proxy into its own network), no
redirects, at most 10 MiB (``exceededImageContent``), a whole-download deadline (``imageTimeOut``).
Any other download failure (refused connection, non-200 status) is ``illegalImageUrl``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from posixpath import basename
from urllib.parse import unquote, urlsplit

import httpx

from ocrserver.codes import reject
from ocrserver.recognizers.base import ImageInput
from workers.errors import ApiError, ImageRejected
from workers.imagecheck import API_EQUIVALENT, MAX_BYTES, check_image, check_url

__all__ = ["LOOPBACK_HOSTS", "api_refusal", "fetch_url", "load_image"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def api_refusal(exc: ImageRejected) -> ApiError:
    """The service's answer for a local image refusal (``local.*`` code -> status and Code)."""
    status, code = API_EQUIVALENT.get(exc.code, (400, "illegalImageUrl"))
    return reject(code, exc.message, status=status)


async def fetch_url(
    http: httpx.AsyncClient, url: str, allowed_hosts: frozenset[str], timeout_s: float
) -> bytes:
    """The bytes at ``url``; raises the service's :class:`ApiError` for every refusal."""
    try:
        check_url(url)
    except ImageRejected as exc:
        raise api_refusal(exc) from None
    try:
        host = (urlsplit(url).hostname or "").lower()
    except ValueError:
        host = ""
    if not host:
        raise reject("illegalImageUrl")
    if host not in allowed_hosts:
        raise reject("notSafeImageUrl")
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("GET", url, follow_redirects=False) as resp:
                if resp.status_code != 200:
                    raise reject("illegalImageUrl", f"Download answered HTTP {resp.status_code}.")
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > MAX_BYTES:
                    raise reject("exceededImageContent")
                chunks: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    size += len(chunk)
                    if size > MAX_BYTES:
                        raise reject("exceededImageContent")
                    chunks.append(chunk)
                return b"".join(chunks)
    except TimeoutError:
        raise reject("imageTimeOut") from None
    except httpx.TimeoutException:
        raise reject("imageTimeOut") from None
    except httpx.HTTPError as exc:
        raise reject("illegalImageUrl", f"Download failed ({type(exc).__name__}).") from None


async def load_image(
    params: Mapping[str, str],
    body: bytes,
    http: httpx.AsyncClient,
    allowed_hosts: frozenset[str] = LOOPBACK_HOSTS,
    url_timeout_s: float = 5.0,
) -> ImageInput:
    """The checked image of one call, from its ``Url`` parameter or its body."""
    url = params.get("Url")
    if (url is None or url == "") == (not body):
        raise reject("imageUrlOrBodyEmpty")
    name = None
    if url:
        if len(url.encode("utf-8")) > 2048:
            raise reject("exceededImageUrlLength")
        data = await fetch_url(http, url, allowed_hosts, url_timeout_s)
        name = unquote(basename(urlsplit(url).path)) or None
    else:
        data = body
    try:
        info = check_image(data)
    except ImageRejected as exc:
        raise api_refusal(exc) from None
    return ImageInput(
        data=data,
        width=info.width,
        height=info.height,
        sha256=hashlib.sha256(data).hexdigest(),
        url=url or None,
        name=name,
    )
