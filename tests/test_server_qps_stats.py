"""The per-key QPS limit and the stats routes, on loopback; and the CLI as a child process."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time

import httpx
import pytest

from ocrserver import cli
from ocrserver.server import ServerConfig, spawn_server, start_server
from ocrserver.truth import make_test_image
from workers.api.client import AsyncClient, Client, Image
from workers.config import Credentials
from workers.errors import ConfigError, RetryableApiError

PNG = make_test_image(["浙A12345"])


async def _burst(url: str, creds: Credentials, n: int) -> list[str]:
    async with httpx.AsyncClient(timeout=10) as http:
        client = AsyncClient(url, creds, http)

        async def one() -> str:
            try:
                await client.recognize(Image(body=PNG))
                return "ok"
            except RetryableApiError as exc:
                return exc.code

        return list(await asyncio.gather(*(one() for _ in range(n))))


def test_qps_limit_is_exact_per_second_and_per_key() -> None:
    keys = "k1:s1,k2:s2"
    with start_server(ServerConfig(qps=5, keys=keys)) as srv:
        r1 = asyncio.run(_burst(srv.url, Credentials("k1", "s1"), 40))
        r2 = asyncio.run(_burst(srv.url, Credentials("k2", "s2"), 40))
        stats = httpx.get(f"{srv.url}/__carnumber/stats").json()
    for results in (r1, r2):
        assert set(results) == {"ok", "Throttling.User"}
        assert results.count("ok") >= 5  # a burst may straddle second boundaries: 5 in each
    assert stats["per_key"]["k1"]["max_accepted_per_second"] == 5
    assert stats["per_key"]["k2"]["max_accepted_per_second"] == 5
    assert stats["throttled"] == stats["answers"]["Throttling.User"] == 80 - stats["accepted_total"]
    assert stats["answers"]["Success"] == stats["accepted_total"] == r1.count("ok") + r2.count("ok")
    assert stats["requests_total"] == 80
    assert sum(stats["accepted_per_second"].values()) == stats["accepted_total"]
    assert all(n <= 10 for n in stats["accepted_per_second"].values())  # 2 keys x 5


def test_calls_are_counted_as_they_arrive_not_after_the_services_latency() -> None:
    """As a gateway does: the QPS window counts a call when it arrives, and a refusal is answered
    at once; only calls let in take the processing time. (Counted after the latency, the count
    carried this server's own wake-up lateness, which crowded whole seconds it did not send.)"""
    with start_server(ServerConfig(qps=1, latency_ms=400)) as srv:
        times: list[float] = []
        srv.app.stats.accepted = lambda key_id, now: times.append(now)  # type: ignore[method-assign]

        async def two() -> tuple[list[str], list[float], float]:
            loop = asyncio.get_running_loop()
            async with httpx.AsyncClient(timeout=10) as http:
                client = AsyncClient(srv.url, Credentials("testid", "testsecret"), http)

                async def one() -> tuple[str, float]:
                    try:
                        await client.recognize(Image(body=PNG))
                        return "ok", loop.time()
                    except RetryableApiError as exc:
                        return exc.code, loop.time()

                await client.recognize(Image(body=PNG))  # a connection open
                await asyncio.sleep(1.0)  # that call's second is over
                start, sent = loop.time(), time.time()
                results = await asyncio.gather(one(), one())
                return [r for r, _ in results], [t - start for _, t in results], sent

        outcomes, took, sent = asyncio.run(two())
    assert sorted(outcomes) in (["Throttling.User", "ok"], ["ok", "ok"])  # ok, ok: across a second
    if "Throttling.User" in outcomes:
        assert took[outcomes.index("Throttling.User")] < 0.3  # not held for the latency
    assert took[outcomes.index("ok")] >= 0.4
    assert 0 <= times[-1] - sent < 0.3  # counted on arrival, 400 ms before it was answered


def test_the_gateway_can_refuse_calls_at_random_within_the_limit() -> None:
    """``--throttle-random``: a share of calls refused although the limit has room, not counted
    against it (the stand-in for a real gateway's own windows and clocks)."""
    with start_server(ServerConfig(qps=0, throttle_random=0.25, seed=3)) as srv:
        results = asyncio.run(_burst(srv.url, Credentials("testid", "testsecret"), 200))
        stats = httpx.get(f"{srv.url}/__carnumber/stats").json()
    refused = results.count("Throttling.User")
    assert set(results) == {"ok", "Throttling.User"} and 25 <= refused <= 75
    assert stats["throttled"] == refused and stats["accepted_total"] == 200 - refused
    with start_server(ServerConfig(qps=5, throttle_random=1.0)) as srv:
        refusals = asyncio.run(_burst(srv.url, Credentials("testid", "testsecret"), 3))
        assert refusals == ["Throttling.User"] * 3
        assert httpx.get(f"{srv.url}/__carnumber/stats").json()["accepted_total"] == 0
    with pytest.raises(ConfigError, match="--throttle-random"):
        ServerConfig(throttle_random=1.5)


def test_throttle_retry_after_is_optional() -> None:
    with start_server(ServerConfig(qps=1, throttle_retry_after=True)) as srv, httpx.Client() as http:
        client = Client(srv.url, Credentials("testid", "testsecret"), http)
        errors = []
        for _ in range(5):
            try:
                client.recognize(Image(body=PNG))
            except RetryableApiError as exc:
                errors.append(exc)
        assert errors and all(e.code == "Throttling.User" for e in errors)
        assert all(e.retry_after_s is not None and 0 < e.retry_after_s <= 1.0 for e in errors)
    with start_server(ServerConfig(qps=1)) as srv, httpx.Client() as http:
        client = Client(srv.url, Credentials("testid", "testsecret"), http)
        with pytest.raises(RetryableApiError) as err:
            for _ in range(5):
                client.recognize(Image(body=PNG))
        assert err.value.retry_after_s is None  # off by default, like the real service


def test_stats_and_reset_routes() -> None:
    with start_server(ServerConfig()) as srv, httpx.Client() as http:
        Client(srv.url, Credentials("testid", "testsecret"), http).recognize(Image(body=PNG))
        stats = http.get(f"{srv.url}/__carnumber/stats").json()
        assert stats["requests_total"] == 1 and stats["answers"] == {"Success": 1}
        assert stats["max_accepted_per_second"] == 1 and stats["throttled"] == 0
        assert http.post(f"{srv.url}/__carnumber/reset").status_code == 200
        assert http.get(f"{srv.url}/__carnumber/stats").json()["requests_total"] == 0
        assert http.get(f"{srv.url}/__carnumber/nothing").status_code == 404


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_flags_build_the_config() -> None:
    cfg = cli.build_config(
        _parse("--qps", "10.0", "--fault-slow", "0.25:300", "--fault-error-200", "0.1:Throttling",
               "--fault-503", "0.2", "--allow-url-host", "images.local", "--seed", "4",
               "--throttle-random", "0.002"),
        environ={"CARNUMBER_SERVER_KEYS": "envid:envsecret"},
    )
    assert cfg.qps == 10 and cfg.port == 8080 and cfg.seed == 4 and cfg.throttle_random == 0.002
    assert cfg.faults.rate_slow == 0.25 and cfg.faults.slow_ms == 300
    assert (cfg.faults.rate_error_200, cfg.faults.error_200_code) == (0.1, "Throttling")
    assert {"images.local", "127.0.0.1"} <= cfg.allowed_url_hosts
    assert list(cfg.access_keys()) == ["envid"]
    assert "envsecret" not in repr(cfg)
    assert list(cli.build_config(_parse(), environ={}).access_keys()) == ["testid"]
    with pytest.raises(ConfigError, match="sum to at most 1"):
        cli.build_config(_parse("--fault-500", "0.6", "--fault-503", "0.6"), environ={})
    with pytest.raises(ConfigError, match="whole number"):
        cli.build_config(_parse("--qps", "2.5"), environ={})
    with pytest.raises(SystemExit):
        _parse("--fault-500", "1.5")


def test_serve_as_a_child_process_prints_its_url() -> None:
    with spawn_server(["--keys", "cid:csecret", "--qps", "3"]) as proc, httpx.Client() as http:
        assert proc.url.startswith("http://127.0.0.1:")
        got = Client(proc.url, Credentials("cid", "csecret"), http).recognize(Image(body=PNG))
        assert [p.text for p in got.plates] == ["浙A12345"]
    assert proc.proc.returncode is not None


def test_pictures_route_counts_calls_per_picture() -> None:
    other = make_test_image(["苏E00001"])
    with start_server(ServerConfig()) as srv, httpx.Client() as http:
        client = Client(srv.url, Credentials("testid", "testsecret"), http)
        for body in (PNG, other, PNG):
            client.recognize(Image(body=body))
        pictures = http.get(f"{srv.url}/__carnumber/pictures").json()
        stats = http.get(f"{srv.url}/__carnumber/stats").json()
    counts = {k: len(v) for k, v in pictures.items()}
    assert counts == {hashlib.sha256(PNG).hexdigest(): 2, hashlib.sha256(other).hexdigest(): 1}
    assert (stats["pictures"], stats["pictures_called_twice"]) == (2, 1)
