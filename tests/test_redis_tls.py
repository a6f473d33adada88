"""Redis over TLS with an ACL user, end to end, against a real ``redis-server --tls-port
--aclfile`` whose certificates ``ops/redis_tls.py`` generates here: our clients, Celery's broker
(certificate verification on by default), a real worker + ``enqueue`` + ``status`` +
``metrics``, Flower's queue lengths; the fleet's least-privilege ACL denies nothing they do and
refuses what they must not do; no password reaches their output."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helpers.fleet_cli import ROOT, carnumber, flower, write_archive
from kombu import Connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from carnumber.localstack import start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ops.drills.redis_nodes import RedisProcess, tls_redis
from ops.redis_tls import acl_file, write_certs
from workers.config import Settings
from workers.errors import ConfigError
from workers.redis_connect import async_client, parse, sync_client

pytestmark = pytest.mark.timeout(180)

PASSWORD = "fleet-pw-5f1c2a9e"
ADMIN_PASSWORD = "admin-pw-77d0"
MONITOR_PASSWORD = "monitor-pw-31c1"
NO_RETRY = Retry(NoBackoff(), 0)  # a refusal is the answer: no retries to wait for
PREFIX = "tlsfleet"
QUEUE = "tlsfleet-queue"


class TLSRedis:
    def __init__(self, work: Path, client_certs: str = "optional") -> None:
        self.certs = write_certs(work / "certs")
        self.acl = work / "users.acl"
        env = {"REDIS_URL": f"rediss://carnumber:{PASSWORD}@127.0.0.1:1/0", "REDIS_PASSWORD": ADMIN_PASSWORD,
               "REDIS_MONITOR_PASSWORD": MONITOR_PASSWORD,
               "CARNUMBER_KEY_PREFIX": PREFIX, "CARNUMBER_QUEUE": QUEUE}  # fmt: skip
        self.acl.write_text(acl_file(env))
        self.server: RedisProcess = tls_redis(work, self.certs.ca.parent, self.acl, client_certs).start()
        self.port = self.server.port

    def url(self, user: str = "carnumber", password: str = PASSWORD, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {"ssl_ca_certs": str(self.certs.ca), **params}.items() if v)
        return f"rediss://{user}:{password}@127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def admin(self) -> redis.Redis:
        return sync_client(self.url("default", ADMIN_PASSWORD))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedis]:
    server = TLSRedis(tmp_path_factory.mktemp("tls"))
    yield server
    server.server.stop()


def test_our_clients_verify_the_certificate_and_log_in_as_the_acl_user(tls: TLSRedis, tmp_path: Path) -> None:
    client = sync_client(tls.url())
    assert client.ping() and client.client_info()["user"] == "carnumber"
    client.close()

    async def ping() -> str:
        ac = async_client(tls.url())
        try:
            return (await ac.client_info())["user"]
        finally:
            await ac.aclose()

    assert asyncio.run(ping()) == "carnumber"
    # A certificate from another CA is refused by default...
    other = write_certs(tmp_path / "other")
    stranger = sync_client(tls.url(ssl_ca_certs=str(other.ca)), retry=NO_RETRY)
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        stranger.ping()
    stranger.close()
    # ...and accepted only when the URL itself turns verification off.
    lax = sync_client(tls.url(ssl_ca_certs=str(other.ca), ssl_cert_reqs="none"))
    assert lax.ping()
    lax.close()
    wrong = sync_client(tls.url(password="wrong"), retry=NO_RETRY)
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    wrong.close()


def test_a_client_certificate_from_the_url(tmp_path: Path) -> None:
    strict = TLSRedis(tmp_path, client_certs="yes")
    try:
        without = sync_client(strict.url(), retry=NO_RETRY)
        with pytest.raises(redis.ConnectionError):
            without.ping()
        without.close()
        certs = strict.certs
        with_cert = sync_client(strict.url(ssl_certfile=str(certs.client), ssl_keyfile=str(certs.client_key)))
        assert with_cert.ping()
        with_cert.close()
    finally:
        strict.server.stop()


def test_bad_tls_urls_are_config_errors_naming_redis_url(tls: TLSRedis) -> None:
    with pytest.raises(ConfigError, match=r"REDIS_URL.*ssl_\* parameters need rediss://"):
        parse(f"redis://127.0.0.1:{tls.port}/0?ssl_ca_certs=/x")
    with pytest.raises(ConfigError, match="ssl_cert_reqs must be required, optional or none"):
        parse(tls.url(ssl_cert_reqs="maybe"))
    with pytest.raises(ConfigError, match=r"unknown parameter\(s\) ssl_ca_cert "):
        parse(f"rediss://127.0.0.1:{tls.port}/0?ssl_ca_cert=/x")
    with pytest.raises(ConfigError, match=r"ssl_ca_certs=/nowhere/ca\.pem: no such file") as caught:
        sync_client(tls.url(ssl_ca_certs="/nowhere/ca.pem"))
    assert PASSWORD not in str(caught.value)


def test_the_celery_broker_verifies_the_certificate_by_default(tls: TLSRedis, tmp_path: Path) -> None:
    from workers.celery import celery_config

    other = write_certs(tmp_path / "other")
    # kombu on its own connects to a rediss:// URL without ssl_cert_reqs and checks nothing:
    # the broker would talk to any server holding any certificate.
    unverified = f"rediss://carnumber:{PASSWORD}@127.0.0.1:{tls.port}/0"
    with Connection(unverified, transport_options={"socket_connect_timeout": 3}) as conn:
        assert conn.ssl == {"ssl_cert_reqs": ssl.CERT_NONE}
        conn.ensure_connection(max_retries=1)
    # Ours requires a valid certificate: the default CAs (no ssl_ca_certs) do not know our CA.
    conf = celery_config(Settings(redis_url=unverified))
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"), _broker(conf) as conn:
        conn.ensure_connection(max_retries=1)
    conf = celery_config(Settings(redis_url=tls.url(ssl_ca_certs=str(other.ca))))
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"), _broker(conf) as conn:
        conn.ensure_connection(max_retries=1)
    conf = celery_config(Settings(redis_url=tls.url()))
    assert conf["broker_use_ssl"] == {"ssl_ca_certs": str(tls.certs.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    with _broker(conf) as conn:
        conn.ensure_connection(max_retries=1)
        conn.default_channel.client.ping()


def _broker(conf: dict) -> Connection:
    return Connection(
        conf["broker_url"],
        ssl=conf["broker_use_ssl"],
        transport=conf["broker_transport"],
        transport_options={**conf["broker_transport_options"], "socket_connect_timeout": 3},
    )


@pytest.fixture
def api() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="tlsid:tlssecret")) as srv:
        yield srv


def test_worker_enqueue_status_metrics_and_flower_under_the_fleet_acl(
    tls: TLSRedis, api: RunningServer, tmp_path: Path
) -> None:
    archive = write_archive(tmp_path / "archive", 12)
    env = {
        "REDIS_URL": tls.url(), "CARNUMBER_ENDPOINT": api.url, "ALIBABA_CLOUD_ACCESS_KEY_ID": "tlsid",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "tlssecret", "CARNUMBER_KEY_PREFIX": PREFIX,
        "CARNUMBER_QUEUE": QUEUE, "CARNUMBER_OUTPUT": str(tmp_path / "out"), "CARNUMBER_CHUNK_SIZE": "4",
        "CARNUMBER_QPS": "0", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    admin = tls.admin()
    admin.acl_log_reset()
    worker = start_worker(env, hostname="tls@%h", via_cli=True, extra=["--loglevel=INFO"])
    try:
        with flower(env, tmp_path / "flower.log") as web:
            enqueue = carnumber(["enqueue", str(archive), "--run", "tls-night", "--wait"], env)
            assert enqueue.returncode == 0, enqueue.stdout + enqueue.stderr + "\n".join(worker.lines[-30:])
            status = carnumber(["status", "tls-night", "--json"], env)
            assert status.returncode == 0, status.stderr
            assert '"state": "done"' in status.stdout
            metrics = carnumber(["metrics", "--once"], env)
            assert metrics.returncode == 0, metrics.stderr
            assert "carnumber_redis_up 1.0" in metrics.stdout
            assert 'carnumber_run_images_written_total{run_id="tls-night"} 12.0' in metrics.stdout
            # Flower: its events (the tasks the worker ran), its view of the worker (remote
            # control), its queue lengths (its own Redis client, over TLS as the ACL user).
            tasks = _wait_json(web, "/api/tasks", lambda t: len(t) == 3)
            assert {t["state"] for t in tasks.values()} == {"SUCCESS"}
            workers = web.get("/api/workers?refresh=1").json()
            assert any(name.startswith("tls@") for name in workers), workers
            lengths = web.get("/api/queues/length").json()
            assert lengths == {"active_queues": [{"name": QUEUE, "messages": 0}]}
            pages = [web.get(p).text for p in ("/broker", "/workers")]
            pages += [json.dumps(workers)]
    finally:
        worker.stop()
    # Nothing the fleet did was refused; what it must not do is.
    assert admin.acl_log() == [], admin.acl_log()
    fleet = sync_client(tls.url())
    for forbidden in (("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("GET", "someone-else:key")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            fleet.execute_command(*forbidden)
    fleet.close()
    # The exporter's read-only user reads everything it exports, and can write nothing.
    as_monitor = {**env, "REDIS_URL": tls.url("carnumber-monitor", MONITOR_PASSWORD)}
    admin.acl_log_reset()
    monitored = carnumber(["metrics", "--once"], as_monitor)
    assert monitored.returncode == 0, monitored.stderr
    assert 'carnumber_run_images_written_total{run_id="tls-night"} 12.0' in monitored.stdout
    assert admin.acl_log() == [], admin.acl_log()
    reader = sync_client(as_monitor["REDIS_URL"])
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.set(f"{PREFIX}:x", 1)
    reader.close()
    admin.acl_log_reset()
    admin.close()
    outputs = [enqueue.stdout, enqueue.stderr, status.stdout, status.stderr, metrics.stdout, metrics.stderr,
               "\n".join(worker.lines), (tmp_path / "flower.log").read_text(), *pages]  # fmt: skip
    assert any("ready" in line for line in worker.lines), "\n".join(worker.lines[-20:])
    for text in outputs:
        assert PASSWORD not in text


def _wait_json(web: httpx.Client, path: str, done: Callable[[Any], bool], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = web.get(path).json()
        if done(got) or time.monotonic() > deadline:
            return got
        time.sleep(0.3)
