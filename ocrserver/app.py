"""The raw ASGI app: a RecognizeCarNumber look-alike, plus three admin routes.

Per API call (``POST /`` or ``GET /``), in the real service's order:

1. read the body (a hard cap of 3 x 10 MiB; beyond it ``exceededImageContent`` at once);
2. the gateway: signature, timestamp, nonce (:class:`~ocrserver.auth.Verifier`) and the QPS
   limit per account (``Throttling.User``, answered at once; each key is its own account unless
   ``accounts`` groups keys; ``throttle_random`` refuses a share of calls within the limit too,
   uncounted, as a real gateway's own windows and clocks do now and then). A call is counted
   when it arrives, as a gateway counts it, not after the service's processing time: a count
   taken after a sleep of ``latency_ms`` would add this server's own wake-up lateness to every
   call's time (up to ~10 ms on a loaded machine);
3. added latency (``latency_ms``, the service's processing time) for calls the gateway let in;
4. the image: ``Url`` xor body, fetched and checked (:mod:`ocrserver.intake`);
5. injected faults (:mod:`ocrserver.faults`), only for calls that got this far;
6. recognition and the success envelope (:mod:`ocrserver.envelope`).

Every refusal is an :class:`~workers.errors.ApiError` rendered by :func:`ocrserver.codes.error_body`.
``GET /__carnumber/stats``, ``GET /__carnumber/pictures`` and ``POST /__carnumber/reset`` are
not part of the real API, nor are the server's own STS routes (:mod:`ocrserver.sts`, loopback
clients only): ``GET /__carnumber/sts/credentials`` (a credentials URI) and
``POST /__carnumber/sts/revoke``.
No framework: the whole request path is a few dict look-ups, one HMAC and one JSON dump.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import random
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl

import httpx

from ocrserver.auth import Verifier
from ocrserver.batcher import MicroBatcher
from ocrserver.codes import error_body, reject
from ocrserver.config import ServerConfig
from ocrserver.envelope import success_body
from ocrserver.faults import EXCLUSIVE_KINDS, FaultPlan, malformed_body
from ocrserver.intake import api_refusal, load_image
from ocrserver.ratelimit import SecondWindowLimiter
from ocrserver.recognizers import get_recognizer
from ocrserver.recognizers.base import DetectedPlate, ImageInput, Recognizer
from ocrserver.stats import Stats
from ocrserver.sts import StsIssuer
from workers.errors import ApiError, ImageRejected
from workers.imagecheck import MAX_BYTES

__all__ = ["OcrApp", "build_app"]

log = logging.getLogger("ocrserver")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HARD_BODY_CAP = 3 * MAX_BYTES
DEFAULT_HOST_ID = "ocr-api.cn-hangzhou.aliyuncs.com"
_JSON = b"application/json;charset=utf-8"


class OcrApp:
    """The ASGI callable. One instance per server; all state lives on its one event loop."""

    def __init__(
        self,
        config: ServerConfig,
        recognizer: Recognizer | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self.sts = StsIssuer(config.access_keys())
        self.verifier = Verifier(config.access_keys(), clock=clock, sts=self.sts)
        self.limiter = SecondWindowLimiter(int(config.qps))
        self.account_of = config.account_of()
        self.faults = FaultPlan(config.faults, config.seed)
        self._gateway_rng = random.Random(config.seed)  # throttle_random's draws
        self.stats = Stats()
        self.recognizer = recognizer or get_recognizer(
            config.recognizer, truth_path=config.truth_path, model_dir=config.model_dir
        )
        self._inline = bool(getattr(self.recognizer, "inline", False))
        self._batcher = (
            MicroBatcher(self.recognizer, config.max_batch, config.max_wait_ms)
            if getattr(self.recognizer, "batching", False)
            else None
        )
        self._http: httpx.AsyncClient | None = None

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path.startswith("/__carnumber/"):
                await self._admin(scope, receive, send)
            else:
                await self._api(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.http_client()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def http_client(self) -> httpx.AsyncClient:
        """The client for ``Url`` images (created on first use; never reads proxy settings)."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                trust_env=False, timeout=self.config.url_timeout_s, follow_redirects=False
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        if self._batcher is not None:
            await self._batcher.aclose()
        self.recognizer.close()

    # -- admin routes -------------------------------------------------------------------------

    async def _admin(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _read_body(receive, 1 << 20)
        route = (scope["method"], scope["path"])
        if route == ("GET", "/__carnumber/stats"):
            doc = {**self.stats.to_json(), "sts_issued": self.sts.issued}
            await _respond(send, 200, json.dumps(doc).encode())
        elif route == ("GET", "/__carnumber/pictures"):
            await _respond(send, 200, json.dumps(self.stats.pictures_json()).encode())
        elif route == ("POST", "/__carnumber/reset"):
            self.stats.reset()
            self.faults.reseed()
            self._gateway_rng = random.Random(self.config.seed)
            await _respond(send, 200, b'{"reset":true}')
        elif scope["path"].startswith("/__carnumber/sts/"):
            status, doc = self._sts(scope)
            await _respond(send, status, json.dumps(doc).encode())
        else:
            await _respond(send, 404, b'{"Code":"NotFound","Message":"unknown admin route"}')

    def _sts(self, scope: Scope) -> tuple[int, dict[str, Any]]:
        """The server's own STS (``ocrserver/sts.py``): issue or revoke, for loopback clients."""
        client = (scope.get("client") or ("",))[0]
        if not is_loopback(client):
            return 403, {"Code": "Forbidden", "Message": "the local STS answers loopback clients only"}
        query = dict(parse_qsl(scope["query_string"].decode("utf-8", "replace")))
        route = (scope["method"], scope["path"])
        key = query.get("key") or next(iter(self.config.access_keys()))
        try:
            if route == ("GET", "/__carnumber/sts/credentials"):
                return 200, self.sts.issue(
                    key, int(query.get("duration_s", "3600")), self.clock(),
                    int(query.get("extra_s", "0")),
                )
            if route == ("POST", "/__carnumber/sts/revoke"):
                self.sts.revoke(key, self.clock())
                return 200, {"Code": "Success", "revoked": key}
        except ValueError as exc:
            return 400, {"Code": "InvalidParameter", "Message": str(exc)}
        return 404, {"Code": "NotFound", "Message": "unknown admin route"}

    # -- the API ------------------------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = str(uuid.uuid4()).upper()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host_id = headers.get("host", DEFAULT_HOST_ID).rsplit(":", 1)[0] or DEFAULT_HOST_ID
        self.stats.request()
        body, complete = await _read_body(receive, HARD_BODY_CAP)
        if body is None:  # the client went away mid-body: nobody to answer
            self.stats.answer("(disconnected)")
            return
        try:
            if not complete:
                raise reject("exceededImageContent")
            if scope["path"] != "/" or scope["method"] not in ("POST", "GET"):
                raise reject("InvalidAction.NotFound")
            params = dict(
                parse_qsl(scope["query_string"].decode("utf-8", "replace"), keep_blank_values=True)
            )
            key = self.verifier.verify(scope["method"], params, headers, body)
            now = self.clock()
            account = self.account_of.get(key.owner, key.owner)
            if self._refused_at_random() or not self.limiter.try_acquire(account, now):
                self.stats.throttled += 1
                extra = {}
                if self.config.throttle_retry_after:
                    extra["x-acs-retry-after"] = str(self.limiter.retry_after_ms(now))
                await self._error(send, reject("Throttling.User"), request_id, host_id, extra)
                return
            self.stats.accepted(key.owner, now)
            if self.config.latency_ms:
                await asyncio.sleep(self.config.latency_ms / 1000.0)
            image = await load_image(
                params, body, self.http_client(), self.config.allowed_url_hosts,
                self.config.url_timeout_s,
            )
            self.stats.picture(image.sha256, now)
            injection = self.faults.draw()
            if injection.slow_ms:
                self.stats.fault("slow")
                await asyncio.sleep(injection.slow_ms / 1000.0)
            if injection.kind is not None:
                self.stats.fault(injection.kind)
                await self._inject(
                    injection.kind, image, receive, send, request_id, host_id, _target(scope)
                )
                return
            plates = await self._recognize(image)
        except ApiError as exc:
            await self._error(send, exc, request_id, host_id, complete=complete)
            return
        except ImageRejected as exc:  # a recognizer that cannot decode what passed the checks
            await self._error(send, api_refusal(exc), request_id, host_id)
            return
        except Exception:
            log.exception("internal error (request %s)", request_id)
            await self._error(send, reject("InternalError"), request_id, host_id)
            return
        self.stats.answer("Success")
        out = success_body(request_id, plates, image.width, image.height, self.config.expand_refs)
        await _respond(send, 200, out, request_id)

    def _refused_at_random(self) -> bool:
        rate = self.config.throttle_random
        return rate > 0 and self._gateway_rng.random() < rate

    async def _recognize(self, image: ImageInput) -> list[DetectedPlate]:
        if self._inline:
            return self.recognizer.recognize(image)
        if self._batcher is not None:
            return await self._batcher.submit(image)
        return await asyncio.to_thread(self.recognizer.recognize, image)

    async def _error(
        self,
        send: Send,
        exc: ApiError,
        request_id: str,
        host_id: str,
        extra: dict[str, str] | None = None,
        complete: bool = True,
        status: int | None = None,
    ) -> None:
        self.stats.answer(exc.code)
        headers = dict(extra or {})
        if not complete:
            headers["connection"] = "close"
        body = error_body(exc, request_id, host_id)
        await _respond(send, status or exc.status, body, request_id, headers)

    async def _inject(
        self, kind: str, image: ImageInput, receive: Receive, send: Send, request_id: str,
        host_id: str, target: str = "/",
    ) -> None:
        cfg = self.config.faults
        if kind == "hang":
            try:
                if not await _hold(receive, cfg.hang_s):
                    self.stats.answer("(disconnected)")
                    return  # the client gave up: nobody left to answer
            except asyncio.CancelledError:  # server shutting down: drop the held connection
                _abort(send)
                return
        if kind == "reset":
            self.stats.answer("(reset)")
            if _abort(send):
                await asyncio.sleep(0)  # let the transport report the loss before we return
                return
            # No transport reachable: start an answer and never finish it.
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b"{", "more_body": True})
            return  # the server closes a connection whose answer was left unfinished
        if kind == "malformed":
            self.stats.answer("(malformed)")
            good = success_body(request_id, [], image.width, image.height)
            body = malformed_body(cfg.malformed_shape, good, request_id, target)
            await _respond(send, 200, body, request_id)
            return
        if kind == "error_200":
            await self._error(send, reject(cfg.error_200_code), request_id, host_id, status=200)
            return
        code = EXCLUSIVE_KINDS[kind]
        assert code is not None
        await self._error(send, reject(code), request_id, host_id)


def _target(scope: Scope) -> str:
    """The request's path and query string, as a gateway's error page would echo them."""
    query = scope["query_string"].decode("latin-1")
    return f"{scope['path']}?{query}" if query else scope["path"]


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1, an IPv4-mapped loopback)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


def _abort(send: Send) -> bool:
    """Drop the connection with a TCP RST (SO_LINGER 0 + abort). uvicorn does not expose the
    transport in the scope, but its ``send`` is a bound method of the request cycle that holds
    it. False when that is not reachable (another server)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        return False
    if transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return True


async def _hold(receive: Receive, seconds: float) -> bool:
    """Wait ``seconds`` without answering; False as soon as the client disconnects."""
    try:
        async with asyncio.timeout(seconds):
            while (await receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return True
    return False


async def _read_body(receive: Receive, cap: int) -> tuple[bytes | None, bool]:
    """(body, complete): ``(b"", False)`` past ``cap`` bytes, ``(None, False)`` when the client
    disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return b"", False
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks), True


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    request_id: str | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    if request_id:
        headers.append((b"x-acs-request-id", request_id.encode()))
    for name, value in (extra or {}).items():
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def build_app(config: ServerConfig, recognizer: Recognizer | None = None) -> OcrApp:
    """The ASGI app for ``config`` (the recognizer is built from the registry unless given)."""
    return OcrApp(config, recognizer)
