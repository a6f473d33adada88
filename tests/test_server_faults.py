"""Each fault option of the local server, observed through our own client on loopback."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from ocrserver.faults import FaultConfig
from ocrserver.server import RunningServer, ServerConfig, start_server
from ocrserver.truth import make_test_image
from workers.api.client import Client, Image
from workers.config import Credentials
from workers.errors import (
    ApiError,
    BadImageError,
    CarnumberError,
    FatalApiError,
    RetryableApiError,
    TransportError,
    UnreadableAnswer,
)

CREDS = Credentials("testid", "testsecret")
PNG = make_test_image(["浙A12345"])


@contextmanager
def serving(read_timeout_s: float = 5.0, **config: object) -> Iterator[tuple[RunningServer, Client]]:
    with start_server(ServerConfig(**config)) as srv, httpx.Client(  # type: ignore[arg-type]
        timeout=httpx.Timeout(5.0, read=read_timeout_s)
    ) as http:
        yield srv, Client(srv.url, CREDS, http)


def _outcome(client: Client, body: bytes = PNG) -> str:
    try:
        client.recognize(Image(body=body))
        return "ok"
    except ApiError as exc:
        return f"{exc.status} {exc.code}"
    except TransportError as exc:
        return exc.code


@pytest.mark.parametrize(
    ("faults", "expected", "kind"),
    [
        (FaultConfig(rate_500=1.0), "500 InternalError", RetryableApiError),
        (FaultConfig(rate_503=1.0), "503 ServiceUnavailable", RetryableApiError),
        (FaultConfig(rate_504=1.0), "504 ServiceTimeout", RetryableApiError),
        (FaultConfig(rate_throttle=1.0), "400 Throttling.User", RetryableApiError),
        (FaultConfig(rate_error_200=1.0, error_200_code="ServiceUnavailable"),
         "200 ServiceUnavailable", RetryableApiError),
        (FaultConfig(rate_malformed=1.0), "local.unreadableAnswer", UnreadableAnswer),
        (FaultConfig(rate_reset=1.0), "local.connection", TransportError),
    ],
    ids=["500", "503", "504", "throttle", "error-200", "malformed", "reset"],
)
def test_each_fault_is_seen_by_the_client(faults: FaultConfig, expected: str,
                                          kind: type[CarnumberError]) -> None:
    with serving(faults=faults) as (srv, client):
        assert _outcome(client) == expected
        with pytest.raises(kind):
            client.recognize(Image(body=PNG))
        stats = srv.app.stats.to_json()
    assert sum(stats["faults"].values()) == 2


def test_reset_is_a_connection_error_in_raw_httpx() -> None:
    with serving(faults=FaultConfig(rate_reset=1.0)) as (srv, client):
        req = client._prepare(Image(body=PNG))
        with httpx.Client() as raw, pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            raw.post(req.url, headers=req.headers, content=req.content)
        # and the server is fine afterwards
        assert httpx.get(f"{srv.url}/__carnumber/stats").json()["answers"]["(reset)"] == 1


def test_hang_holds_the_connection_until_the_client_times_out() -> None:
    faults = FaultConfig(rate_hang=1.0, hang_s=30.0)
    started = time.monotonic()
    with serving(read_timeout_s=0.5, faults=faults) as (_, client):
        assert _outcome(client) == "local.timeout"
        assert time.monotonic() - started < 3
    assert time.monotonic() - started < 6  # stopping does not wait for the 30 s hang


def test_hang_answers_service_timeout_after_hang_s() -> None:
    with serving(faults=FaultConfig(rate_hang=1.0, hang_s=0.3)) as (_, client):
        t0 = time.monotonic()
        assert _outcome(client) == "504 ServiceTimeout"
        assert time.monotonic() - t0 >= 0.3


def test_slow_and_latency_delay_without_blocking() -> None:
    with serving(faults=FaultConfig(rate_slow=1.0, slow_ms=300)) as (_, client):
        t0 = time.monotonic()
        assert _outcome(client) == "ok"
        assert time.monotonic() - t0 >= 0.3
    with serving(latency_ms=1000) as (srv, client):
        took: list[float] = []

        def call() -> None:
            t0 = time.monotonic()
            assert _outcome(client) == "ok"
            took.append(time.monotonic() - t0)

        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.1)
        t1 = time.monotonic()  # non-blocking: the stats route answers while the call sleeps
        assert httpx.get(f"{srv.url}/__carnumber/stats").json()["requests_total"] == 1
        assert time.monotonic() - t1 < 0.5
        worker.join()
        assert took and took[0] >= 1.0


def test_faults_only_hit_signed_valid_calls() -> None:
    with serving(faults=FaultConfig(rate_500=1.0)) as (srv, client):
        wrong = Client(srv.url, Credentials("testid", "nope"), client.http)
        with pytest.raises(FatalApiError):
            wrong.recognize(Image(body=PNG))
        with pytest.raises(BadImageError):
            client.recognize(Image(body=b"%PDF-1.4" + b"\0" * 100))
        with pytest.raises(RetryableApiError):
            client.recognize(Image(body=PNG))
        assert srv.app.stats.to_json()["faults"] == {"500": 1}


def test_seeded_faults_repeat() -> None:
    faults = FaultConfig(rate_500=0.3, rate_503=0.2, rate_malformed=0.1)
    runs = []
    for _ in range(2):
        with serving(faults=faults, seed=42) as (_, client):
            runs.append([_outcome(client) for _ in range(30)])
    assert runs[0] == runs[1]
    assert {"ok", "500 InternalError", "503 ServiceUnavailable", "local.unreadableAnswer"} <= set(runs[0])


def test_reset_route_reseeds_and_clears_stats() -> None:
    with serving(faults=FaultConfig(rate_503=0.5), seed=1) as (srv, client):
        first = [_outcome(client) for _ in range(12)]
        assert httpx.post(f"{srv.url}/__carnumber/reset").json() == {"reset": True}
        assert srv.app.stats.requests_total == 0
        assert [_outcome(client) for _ in range(12)] == first


def test_malformed_shapes_from_the_command_line() -> None:
    """``--fault-malformed RATE[:SHAPE]``: every shape is a 200 that is not the envelope."""
    import argparse
    import json

    from ocrserver import cli
    from ocrserver.faults import MALFORMED_SHAPES
    from workers.errors import ConfigError

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    default = cli.build_config(parser.parse_args(["--fault-malformed", "0.2"]), environ={})
    assert (default.faults.rate_malformed, default.faults.malformed_shape) == (0.2, "truncated")
    with pytest.raises(ConfigError, match="shape 'xml' is not one of truncated, html"):
        cli.build_config(parser.parse_args(["--fault-malformed", "1:xml"]), environ={})
    for shape in MALFORMED_SHAPES:
        args = parser.parse_args(["--port", "0", "--fault-malformed", f"1:{shape}"])
        with start_server(cli.build_config(args, environ={})) as srv, httpx.Client() as http:
            req = Client(srv.url, CREDS, http)._prepare(Image(body=PNG))
            answer = http.post(req.url, headers=req.headers, content=req.content)
        assert answer.status_code == 200 and answer.headers["x-acs-request-id"], shape
        try:
            doc = json.loads(answer.content)
        except ValueError:
            assert shape in ("truncated", "html", "empty")
        else:
            assert shape in ("no-data", "bad-data", "wrong-types")
            assert doc["RequestId"] == answer.headers["x-acs-request-id"]
