"""The local image checks in ``Url`` mode: ranged reads of the head and the tail of each object,
against moto's real S3 server and the loopback OSS server; bad pictures cost 0 API calls."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.oss_server import FakeOss
from helpers.s3_server import moto_s3, s3_client
from PIL import Image as PILImage

from ocrserver.config import ServerConfig
from ocrserver.server import start_server
from ocrserver.truth import make_test_image
from workers.api.client import Image
from workers.config import Settings
from workers.errors import ImageRejected
from workers.imagecheck import HEAD_BYTES, TAIL_BYTES
from workers.message import Chunk, ImageRef
from workers.runner import Runtime, execute_chunk
from workers.storage import Resolver
from workers.storage.objects import RangeRead
from workers.storage.resolver import precheck_object
from workers.storage.s3 import S3Store
from workers.storage.signed import SignedObject
from workers.storage.uris import object_uri

BUCKET = "cn-url-checks-test"


def encode(im: PILImage.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def noise(w: int, h: int) -> PILImage.Image:
    return PILImage.frombytes("RGB", (w, h), os.urandom(w * h * 3))


def bad_corpus() -> dict[str, tuple[bytes, str]]:
    """key -> (bytes, the rule that refuses it)."""
    png = encode(noise(300, 200), "PNG")
    return {
        "bad/pdf-named.jpg": (b"%PDF-1.4\n" + b"0" * 30_000, "local.unsupportedFormat"),
        "bad/ten-px.png": (encode(noise(10, 10), "PNG"), "local.imageTooSmall"),
        "bad/empty.jpg": (b"", "local.emptyImage"),
        "bad/truncated.png": (png[: len(png) // 2], "local.truncatedImage"),
        "bad/520x10.png": (encode(noise(520, 10), "PNG"), "local.imageTooSmall"),
        "bad/aspect-52.png": (encode(noise(1040, 20), "PNG"), "local.aspectRatio"),
        "bad/text.jpg": (b"plate list\n" * 3000, "local.unsupportedFormat"),
    }


_GOOD: dict[str, bytes] = {}


def good_corpus() -> dict[str, bytes]:
    if _GOOD:
        return _GOOD
    big = encode(noise(640, 480), "JPEG")  # ~ 100 KB: the checks must not read it all
    _GOOD.update(
        {
            "good/big.jpg": big,
            "good/plate.png": make_test_image([{"text": "京A00001", "type": "小型汽车"}]),
            "good/plate2.png": make_test_image([{"text": "京A00002", "type": "小型汽车"}]),
        }
    )
    return _GOOD


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3() as url:
        client = s3_client(url)
        client.create_bucket(Bucket=BUCKET)
        for key, (data, _) in bad_corpus().items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        for key, data in good_corpus().items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data, ContentType="image/jpeg")
        yield url


@pytest.fixture(scope="module")
def oss() -> Iterator[FakeOss]:
    with FakeOss() as server:
        for key, (data, _) in bad_corpus().items():
            server.put("bkt", key, data)
        for key, data in good_corpus().items():
            server.put("bkt", key, data)
        yield server


def _resolve(settings: Settings, scheme: str, bucket: str, keys: list[str]) -> list[Any]:
    r = Resolver(settings)
    try:
        return r.resolve_many([ImageRef(object_uri(scheme, bucket, k)) for k in keys])
    finally:
        r.close()


def _check_outcomes(out: list[Any], keys: list[str]) -> None:
    bad = bad_corpus()
    for key, got in zip(keys, out, strict=True):
        if key in bad:
            assert isinstance(got, ImageRejected), (key, got)
            assert got.code == bad[key][1], (key, got.code)
        else:
            assert isinstance(got, SignedObject) and got.content_key, (key, got)
            image = got.signed_image()  # what each attempt sends: a URL signed then
            assert isinstance(image, Image) and image.url, (key, image)


def test_s3_url_mode_refuses_the_bad_corpus_from_ranged_reads(s3_endpoint: str) -> None:
    keys = sorted(bad_corpus()) + sorted(good_corpus())
    out = _resolve(Settings(s3_endpoint_url=s3_endpoint, s3_mode="url"), "s3", BUCKET, keys)
    _check_outcomes(out, keys)
    pdf = out[keys.index("bad/pdf-named.jpg")]
    assert "PDF" in pdf.message


def test_oss_url_mode_refuses_the_bad_corpus_from_ranged_reads(oss: FakeOss) -> None:
    settings = Settings(
        oss_endpoint=oss.endpoint,
        oss_access_key_id=oss.access_key_id,
        oss_access_key_secret=oss.access_key_secret,
        oss_mode="url",
    )
    keys = sorted(bad_corpus()) + sorted(good_corpus())
    out = _resolve(settings, "oss", "bkt", keys)
    _check_outcomes(out, keys)
    # The big good JPEG cost its head and tail, not its 100 KB.
    oss.bytes_sent = 0
    _resolve(settings, "oss", "bkt", ["good/big.jpg"])
    assert oss.bytes_sent == HEAD_BYTES + TAIL_BYTES


def test_precheck_reads_a_few_kb_of_a_big_object(s3_endpoint: str) -> None:
    store = S3Store(Settings(s3_endpoint_url=s3_endpoint))
    reads: list[RangeRead] = []
    data = precheck_object(store, BUCKET, "good/big.jpg", on_read=reads.append)
    size = len(good_corpus()["good/big.jpg"])
    assert data is None and size > 50_000
    assert [(r.offset, len(r.data)) for r in reads] == [
        (0, HEAD_BYTES),
        (size - TAIL_BYTES, TAIL_BYTES),
    ]
    assert all(r.size == size for r in reads)
    assert reads[0].content_type == "image/jpeg" and reads[0].etag
    # A small object is read once, whole, and handed back (no second request).
    reads.clear()
    small = precheck_object(store, BUCKET, "good/plate.png", on_read=reads.append)
    assert small == good_corpus()["good/plate.png"] and len(reads) == 1
    # An empty object: the range cannot be satisfied, the size says 0.
    with pytest.raises(ImageRejected, match="emptyImage"):
        precheck_object(store, BUCKET, "bad/empty.jpg")


def test_bad_objects_cost_no_call_in_a_real_url_mode_run(
    s3_endpoint: str, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    """The whole worker path: the server fetches good objects by their presigned URL; the bad
    ones get a failed row naming the rule and no call."""
    keys = sorted(bad_corpus()) + sorted(good_corpus())
    with start_server(ServerConfig(keys="testid:testsecret")) as srv:
        settings = Settings.from_env(
            {
                "CARNUMBER_ENDPOINT": srv.url,
                "ALIBABA_CLOUD_ACCESS_KEY_ID": "testid",
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "testsecret",
                "REDIS_URL": redis_url,
                "CARNUMBER_KEY_PREFIX": key_prefix,
                "CARNUMBER_OUTPUT": str(tmp_path / "out"),
                "CARNUMBER_QPS": "0",
                "CARNUMBER_S3_ENDPOINT_URL": s3_endpoint,
                "CARNUMBER_S3_MODE": "url",
            }
        )
        refs = tuple(ImageRef(object_uri("s3", BUCKET, k)) for k in keys)
        with Runtime.from_settings(settings) as rt:
            result = execute_chunk(Chunk("url-checks", "0000000", refs), rt)
            rows = rt.dataset.read_run("url-checks").to_pylist()
        stats = httpx.get(f"{srv.url}/__carnumber/stats").json()
    good = len(good_corpus())
    assert result.calls == good and stats["requests_total"] == good
    failed = {r["source"]: r for r in rows if r["status"] == "failed"}
    bad = bad_corpus()
    assert len(failed) == len(bad)
    for key, (_, rule) in bad.items():
        row = failed[object_uri("s3", BUCKET, key)]
        assert row["error_code"] == rule and row["attempts"] == 0
