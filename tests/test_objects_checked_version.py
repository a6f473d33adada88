"""Objects passed by URL (issue 20, items 4 and 7): the URL is signed at each attempt, for that
attempt only, and what the service fetches is what was checked, or the answer is not kept under
its content key.

Real parts: the loopback OSS server (it verifies signatures and their expiry, and serves the
service's fetch), moto's S3 server (versioning, If-Match), the local RecognizeCarNumber server
(it fetches the URL it is given), real Redis and Parquet.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.oss_server import FakeOss
from helpers.s3_server import moto_s3, s3_client

from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers import content
from workers.config import Settings
from workers.errors import ObjectChanged
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.storage import Resolver
from workers.storage.objects import RangeRead
from workers.storage.s3 import S3Store
from workers.storage.signed import SignedObject
from workers.storage.uris import object_uri

BUCKET = "cn-checked-version"
KEYS = "cvid:cvsecret"


def picture(plate: str, width: int = 400) -> bytes:
    return make_test_image([{"text": plate, "type": "小型汽车"}], width=width)


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys=KEYS)) as srv:
        yield srv


def _runtime(
    server: RunningServer, oss: FakeOss, redis_url: str, key_prefix: str, tmp: Path, **env: str
) -> Runtime:
    rt = Runtime.from_settings(
        Settings.from_env(
            {
                "CARNUMBER_ENDPOINT": server.url,
                "ALIBABA_CLOUD_ACCESS_KEY_ID": KEYS.split(":")[0],
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": KEYS.split(":")[1],
                "REDIS_URL": redis_url,
                "CARNUMBER_KEY_PREFIX": key_prefix,
                "CARNUMBER_OUTPUT": str(tmp / "out"),
                "CARNUMBER_QPS": "0",
                "CARNUMBER_OSS_ENDPOINT": oss.endpoint,
                "OSS_ACCESS_KEY_ID": oss.access_key_id,
                "OSS_ACCESS_KEY_SECRET": oss.access_key_secret,
                "CARNUMBER_OSS_MODE": "url",
                **env,
            }
        )
    )
    rt.runs.create("r", "test")
    rt.runs.touch("r")
    return rt


def _accepted(server: RunningServer) -> int:
    return int(httpx.get(f"{server.url}/__carnumber/stats").json()["accepted_total"])


def _plates(rows: list[dict[str, Any]], image_id: str) -> list[str | None]:
    return [r.get("plate") for r in rows if r["image_id"] == image_id]


# -- 4. a URL signed at each attempt ------------------------------------------------------------------


def test_a_url_never_expires_while_its_image_waits_for_a_slot(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """Two objects, 0.25 calls/s: the second waits 4 s for its slot, twice its URLs' lifetime.
    Signed once per chunk (before), the service found it expired (IllegalImageUrl: terminal, and
    paid); signed at its attempt, it is fresh."""
    with FakeOss() as oss:
        oss.put("bkt", "a.jpg", picture("京A11111"))
        oss.put("bkt", "b.jpg", picture("京B22222"))
        rt = _runtime(
            server, oss, redis_url, key_prefix, tmp_path, CARNUMBER_QPS="0.25", CARNUMBER_SIGNED_URL_TTL_S="2"
        )
        try:
            refs = tuple(ImageRef(object_uri("oss", "bkt", k)) for k in ("a.jpg", "b.jpg"))
            result = execute_chunk(Chunk("r", "0000000", refs), rt)
            rows = rt.dataset.read_run("r").to_pylist()
        finally:
            rt.close()
    assert (result.answered, result.failed) == (2, 0), rows
    assert sorted(r["plate"] for r in rows) == ["京A11111", "京B22222"]


# -- 7. an object overwritten between the check and the call ------------------------------------------


def test_an_object_overwritten_under_the_call_is_checked_again_never_mis_keyed(
    server: RunningServer, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    original, replacement = picture("苏E00001"), picture("浙A99999", width=420)
    with FakeOss() as oss:
        oss.put("bkt", "cam/a.jpg", original)
        oss.put("bkt", "cam/copy-of-a.jpg", original)  # the same picture elsewhere: the same ETag

        def overwrite_once(bucket: str, key: str) -> None:
            if key == "cam/a.jpg" and oss.buckets[bucket][key].data == original:
                oss.put(bucket, key, replacement)  # between our checks and the service's fetch

        oss.on_signed_get = overwrite_once
        rt = _runtime(server, oss, redis_url, key_prefix, tmp_path)
        try:
            first = ImageRef(object_uri("oss", "bkt", "cam/a.jpg"))
            copy = ImageRef(object_uri("oss", "bkt", "cam/copy-of-a.jpg"))
            execute_chunk(Chunk("r", "0000000", (first,)), rt)
            execute_chunk(Chunk("r", "0000001", (copy,)), rt)
            rows = rt.dataset.read_run("r").to_pylist()
        finally:
            rt.close()
        now = oss.buckets["bkt"]["cam/a.jpg"]
    # The first image's answer is the picture the object holds now, under that picture's key...
    (row,) = [r for r in rows if r["image_id"] == first.image_id]
    assert row["plate"] == "浙A99999"
    assert now.data == replacement and row["content_key"] == content.of_object(now.etag, len(now.data))
    # ...and a copy of the original picture gets the original's plates, from a call of its own
    # (before: the replacement's answer, journalled under the original's ETag).
    assert _plates(rows, copy.image_id) == ["苏E00001"]
    assert _accepted(server) == 3  # the fetch that saw the overwrite, the new version, the copy


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.create_bucket(Bucket=BUCKET + "-v")
        client.put_bucket_versioning(Bucket=BUCKET + "-v", VersioningConfiguration={"Status": "Enabled"})
        yield endpoint


def _check(endpoint: str, bucket: str, key: str, store: Any = None) -> Any:
    settings = Settings(s3_endpoint_url=endpoint, s3_mode="url")
    r = Resolver(settings, stores={"s3": store} if store is not None else None)
    try:
        (out,) = r.resolve_many([ImageRef(object_uri("s3", bucket, key))])
    finally:
        r.close()
    return out


def test_on_a_versioned_bucket_the_url_reads_the_checked_version(s3: str) -> None:
    client = s3_client(s3)
    bucket = BUCKET + "-v"
    client.put_object(Bucket=bucket, Key="a.jpg", Body=picture("苏E00002"))
    target = _check(s3, bucket, "a.jpg")
    assert isinstance(target, SignedObject) and target.bound and target.version_id
    client.put_object(Bucket=bucket, Key="a.jpg", Body=picture("浙A00003"))  # overwritten after the check
    image = target.signed_image()
    assert image is not None and "versionId=" in str(image.url)
    assert httpx.get(str(image.url)).content == picture("苏E00002")  # exactly what was checked
    assert target.unchanged()  # bound to its version: nothing to confirm


def test_on_a_plain_bucket_an_overwrite_is_seen_after_the_call(s3: str) -> None:
    client = s3_client(s3)
    client.put_object(Bucket=BUCKET, Key="b.jpg", Body=picture("苏E00004"))
    target = _check(s3, BUCKET, "b.jpg")
    assert isinstance(target, SignedObject) and not target.bound and target.unchanged()
    client.put_object(Bucket=BUCKET, Key="b.jpg", Body=picture("浙A00005"))
    assert not target.unchanged()
    again = target.recheck()
    assert isinstance(again, SignedObject) and again.content_key != target.content_key


class _OverwriteAfterFirstRead:
    """An S3 store that overwrites the object right after the check's first ranged read."""

    def __init__(self, store: S3Store, replacement: bytes) -> None:
        self.store, self.scheme, self.replacement = store, "s3", replacement
        self.done = False

    def get_range(self, bucket: str, key: str, offset: int, length: int, **kw: Any) -> RangeRead:
        got = self.store.get_range(bucket, key, offset, length, **kw)
        if not self.done:
            self.done = True
            self.store.client.put_object(Bucket=bucket, Key=key, Body=self.replacement)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_reads_after_the_first_carry_if_match_so_a_check_never_mixes_versions(s3: str) -> None:
    client = s3_client(s3)
    # Larger than the head read: the check needs a second read (the tail) of the same version.
    old, new = picture("苏E00006", width=1600), picture("浙A00007", width=1700)
    client.put_object(Bucket=BUCKET, Key="c.jpg", Body=old)
    store = _OverwriteAfterFirstRead(S3Store(Settings(s3_endpoint_url=s3)), new)
    target = _check(s3, BUCKET, "c.jpg", store)
    # The tail read found another ETag (412): the check started again on the new version, so its
    # key names the bytes the URL serves.
    new_etag = client.head_object(Bucket=BUCKET, Key="c.jpg")["ETag"].strip('"')
    assert isinstance(target, SignedObject) and target.etag == new_etag
    assert target.content_key == content.of_object(new_etag, len(new))
    with pytest.raises(ObjectChanged):
        S3Store(Settings(s3_endpoint_url=s3)).get("cn-checked-version", "c.jpg", 10**7, if_match="0" * 32)


def test_if_match_on_the_oss_server() -> None:
    with FakeOss() as oss:
        oss.put("bkt", "d.jpg", picture("苏E00008"))
        settings = Settings(
            oss_endpoint=oss.endpoint,
            oss_access_key_id=oss.access_key_id,
            oss_access_key_secret=oss.access_key_secret,
        )
        from workers.storage.oss import OssStore

        store = OssStore(settings)
        etag = store.get_range("bkt", "d.jpg", 0, 10).etag
        assert store.get_range("bkt", "d.jpg", 0, 10, if_match=etag).data == picture("苏E00008")[:10]
        oss.put("bkt", "d.jpg", picture("浙A00009"))
        with pytest.raises(ObjectChanged):
            store.get_range("bkt", "d.jpg", 0, 10, if_match=etag)
        with pytest.raises(ObjectChanged):
            store.get("bkt", "d.jpg", 10**7, if_match=etag)
        assert store.etag("bkt", "d.jpg") != etag and store.etag("bkt", "gone.jpg") is None
