"""A request held up after admission past its slot's ``send_by`` is not sent: nothing reaches the
service, its token and quota go back, and the image is admitted again (real server, real Redis)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aredis

from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.admission import Gate
from workers.api.client import AsyncClient, Image
from workers.config import Credentials, Settings
from workers.errors import SlotMissed
from workers.fleet import CircuitBreaker, FleetControl
from workers.keys import Keys, account_tag
from workers.message import Chunk, ImageRef
from workers.pipeline import ChunkContext, process_chunk
from workers.ratelimit import CallQuota, RateLimiter, RedisBackend
from workers.ratelimit.limiter import MAX_REBOOKS
from workers.retry import RetryPolicy
from workers.slots import Slots
from workers.storage import Resolver

CREDS = Credentials("sendid", "sendsecret")


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="sendid:sendsecret")) as srv:
        yield srv


def _requests(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["requests_total"])


def test_the_client_sends_nothing_past_the_deadline(server: RunningServer) -> None:
    body = make_test_image([{"text": "粤B12345", "type": "小型汽车"}])

    async def main() -> None:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=1)) as http:
            client = AsyncClient(server.url, CREDS, http)
            await client.recognize(Image(body=body))  # the pooled connection is open
            with pytest.raises(SlotMissed, match="past its rate-limit slot"):
                await client.recognize(Image(body=body), send_by=time.monotonic() - 0.001)
            assert _requests(server) == 1
            # The connection is still good: the next request on it goes through.
            rec = await client.recognize(Image(body=body), send_by=time.monotonic() + 5)
            assert [p.text for p in rec.plates] == ["粤B12345"]
            assert len(http._transport._pool.connections) == 1  # type: ignore[attr-defined]

    asyncio.run(main())
    assert _requests(server) == 2


def test_a_missed_slot_is_admitted_again_and_costs_no_call_or_quota(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """With no time at all allowed after the slot, every request misses its first
    ``MAX_REBOOKS`` slots (each handed back with its quota), then goes out without a
    deadline: one call per image, the quota counts exactly those calls."""
    refs = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        path.write_bytes(make_test_image([{"text": f"粤B{i:05d}", "type": "小型汽车"}]))
        refs.append(ImageRef(path.as_uri()))
    settings = Settings.from_env({"CARNUMBER_SOURCE_ROOT": str(tmp_path)})
    keys = Keys(key_prefix)
    account = account_tag(CREDS.access_key_id)

    async def main() -> tuple[RateLimiter, CallQuota, list[dict]]:
        ar = aredis.Redis.from_url(redis_url)
        backend = RedisBackend(ar)
        limiter = RateLimiter(backend, keys.rate(account), 100, guard_s=0.01, send_late_s=0.0)
        quota = CallQuota(backend, keys.quota(account), 1000, "total")
        fleet, breaker = FleetControl(ar, keys, account), CircuitBreaker(ar, keys, account)
        try:
            async with httpx.AsyncClient() as http:
                ctx = ChunkContext(
                    client=AsyncClient(server.url, CREDS, http),
                    resolver=Resolver(settings),
                    gate=Gate(fleet=fleet, breaker=breaker, limiter=limiter, quota=quota),
                    policy=RetryPolicy.from_settings(settings),
                    fleet=fleet,
                    breaker=breaker,
                    slots=Slots(2),
                )
                result = await process_chunk(Chunk("late", "0000000", tuple(refs)), ctx)
            assert await quota.used() == len(refs)
        finally:
            await ar.aclose()
        return limiter, quota, result.rows

    limiter, _, rows = asyncio.run(main())
    assert sorted(r["plate"] for r in rows) == [f"粤B{i:05d}" for i in range(4)]
    assert {r["attempts"] for r in rows} == {1}  # a missed slot is not an attempt
    assert limiter.abandoned == len(refs) * MAX_REBOOKS
    assert _requests(server) == len(refs)
