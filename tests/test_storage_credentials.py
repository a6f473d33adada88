"""Our own storage credentials refused (issue 20, item 6): the fleet stops like it does for a fatal
API code, images stay pending (never failed rows), and ``carnumber resume`` finishes the run once
the credentials are fixed. An object the store denies while its bucket is readable is that
object's row (``local.accessDenied``).

Real parts: the loopback OSS server (it verifies signatures, refuses a wrong secret with
SignatureDoesNotMatch), moto's S3 server with its authentication switched on, real ``carnumber
worker`` processes, the real ``carnumber enqueue`` / ``resume`` / ``status``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from helpers.oss_server import FakeOss
from helpers.s3_server import moto_s3, s3_client

from carnumber.cli import main as cli
from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.books.runs import RunStore
from workers.config import Settings
from workers.errors import FleetStopped, ImageRejected, StorageCredentialsError
from workers.keys import Keys
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.sink.dataset import open_dataset
from workers.storage import Resolver
from workers.storage.uris import object_uri

pytestmark = pytest.mark.timeout(180)
KEYS = "scid:scsecret"


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=KEYS)) as srv:
        yield srv


def _env(server: RunningServer, oss: FakeOss, redis_url: str, key_prefix: str, tmp: Path) -> dict[str, str]:
    return {
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "scid",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "scsecret",
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": f"{key_prefix}:queue",
        "CARNUMBER_OUTPUT": str(tmp / "out"),
        "CARNUMBER_CHUNK_SIZE": "4",
        "CARNUMBER_QPS": "0",
        "CARNUMBER_OSS_ENDPOINT": oss.endpoint,
        "CARNUMBER_OSS_MODE": "url",
        "OSS_ACCESS_KEY_ID": oss.access_key_id,
        "OSS_ACCESS_KEY_SECRET": oss.access_key_secret,
    }


def _worker(env: dict[str, str]) -> Child:
    return start_worker(env, concurrency=1, hostname=f"sc{abs(hash(env['OSS_ACCESS_KEY_SECRET']))}@%h")


def test_a_refused_storage_key_stops_the_fleet_and_resume_finishes_after_the_fix(
    server: RunningServer,
    redis_url: str,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeOss() as oss:
        for i in range(10):
            oss.put("bkt", f"cam/{i:03d}.png", make_test_image([{"text": f"粤B{i:05d}", "type": "小型汽车"}]))
        env = _env(server, oss, redis_url, key_prefix, tmp_path)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        # The workers' key has expired (here: a secret the store no longer accepts); the
        # producer's listing still works.
        worker = _worker({**env, "OSS_ACCESS_KEY_SECRET": "expired-secret"})
        try:
            assert cli(["enqueue", "oss://bkt/cam/", "--run", "night", "--wait"]) != 0
        finally:
            worker.stop()
        summary = RunStore(redis_client, Keys(key_prefix)).get("night")
        assert summary is not None and summary.parked == 10 and summary.written == 0
        assert summary.fields.get("held_by") == "stopped" or summary.state == "stopped"
        status = httpx.get(f"{server.url}/__carnumber/stats").json()
        assert status["accepted_total"] == 0  # not one paid call, and not one failed row
        assert open_dataset(env["CARNUMBER_OUTPUT"]).read_run("night").num_rows == 0
        stop = redis_client.hgetall(Keys(key_prefix).stop(_account()))
        assert stop[b"code"] == b"local.storageCredentials" and b"expired-secret" not in stop[b"message"]

        # The operator fixes the credentials and resumes: the run finishes, every image once.
        worker = _worker(env)
        try:
            assert cli(["resume", "night"]) == 0
            assert cli(["status", "night", "--follow"]) == 0
        finally:
            worker.stop()
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("night").to_pylist()
    assert len(rows) == 10 and len({r["image_id"] for r in rows}) == 10
    assert {r["status"] for r in rows} == {"ok"}


def _account() -> str:
    from workers.keys import account_tag

    return account_tag("scid")


def test_access_denied_to_one_object_is_its_row_to_a_whole_bucket_a_stop() -> None:
    with FakeOss() as oss:
        for key in ("a.jpg", "b.jpg", "secret.jpg"):
            oss.put("bkt", key, make_test_image([]))
        oss.denied.add(("bkt", "secret.jpg"))
        settings = Settings(
            oss_endpoint=oss.endpoint,
            oss_access_key_id=oss.access_key_id,
            oss_access_key_secret=oss.access_key_secret,
        )
        refs = [ImageRef(object_uri("oss", "bkt", k)) for k in ("a.jpg", "secret.jpg", "b.jpg")]
        r = Resolver(settings)
        try:
            out = r.resolve_many(refs)
            assert [type(o).__name__ for o in out] == ["SignedObject", "ImageRejected", "SignedObject"]
            assert isinstance(out[1], ImageRejected) and out[1].code == "local.accessDenied"
            # Alone in its chunk, soon after its bucket was readable: still that object's row.
            (again,) = r.resolve_many(refs[1:2])
            assert isinstance(again, ImageRejected) and again.code == "local.accessDenied"
        finally:
            r.close()
        # A fresh worker that can read nothing of the bucket: our credentials or policy. Stop.
        oss.denied |= {("bkt", "a.jpg"), ("bkt", "b.jpg")}
        fresh = Resolver(settings)
        try:
            with pytest.raises(StorageCredentialsError, match="no object of oss://bkt was readable"):
                fresh.resolve_many(refs)
        finally:
            fresh.close()


@pytest.fixture
def s3_with_auth(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket="cn-creds")
        client.create_bucket(Bucket="cn-creds-out")
        client.put_object(Bucket="cn-creds", Key="a.png", Body=make_test_image([{"text": "京C12345"}]))
        import moto.settings

        # moto checks signatures and keys from now on: "testing" is no IAM user it knows.
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        yield endpoint


def test_s3_refusing_our_key_stops_the_fleet_images_pending(
    s3_with_auth: str, server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "scid",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "scsecret",
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_OUTPUT": str(tmp_path / "out"),
            "CARNUMBER_QPS": "0",
            "CARNUMBER_S3_ENDPOINT_URL": s3_with_auth,
        }
    )
    refs = (ImageRef(object_uri("s3", "cn-creds", "a.png")),)
    for mode in ("url", "bytes"):
        with Runtime.from_settings(settings.with_(s3_mode=mode)) as rt:
            rt.runs.create(f"s3-{mode}", "test")
            result = execute_chunk(Chunk(f"s3-{mode}", "0000000", refs), rt)
            assert result.pending == list(refs) and result.rows == []
            assert isinstance(result.pause, FleetStopped) and result.pause.code == "local.storageCredentials"
            assert "InvalidAccessKeyId" in str(result.pause) and "testing" not in str(result.pause)


def test_an_output_store_refusing_our_key_stops_the_fleet(
    s3_with_auth: str, server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """The output bucket refuses the workers' key: every part write would fail. The task stops the
    fleet (images pending) and raises, so Celery retries the chunk after the fix."""
    import asyncio

    import redis.asyncio as aredis

    from workers import tasks
    from workers.fleet import FleetControl

    host = s3_with_auth.removeprefix("http://")
    settings = Settings.from_env(
        {
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "scid",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "scsecret",
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": key_prefix,
            "CARNUMBER_OUTPUT": f"s3://cn-creds-out/plates?endpoint_override={host}&scheme=http&region=us-east-1",
            "CARNUMBER_QPS": "0",
        }
    )
    image = tmp_path / "a.png"
    image.write_bytes(make_test_image([{"text": "京D12345"}]))
    chunk = Chunk("out-denied", "0000000", (ImageRef(image.as_uri()),))
    tasks.use_settings(settings)
    try:
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            tasks.process_chunk(chunk.to_wire())  # called directly: Celery's retry re-raises
    finally:
        tasks._close_runtime()
        tasks.use_settings(None)  # type: ignore[arg-type]

    async def stop_status() -> dict | None:
        client = aredis.Redis.from_url(redis_url)
        try:
            return await FleetControl.from_settings(client, settings).status()
        finally:
            await client.aclose()

    stop = asyncio.run(stop_status())
    assert stop is not None and stop["code"] == "local.storageCredentials" and stop["run"] == "out-denied"
