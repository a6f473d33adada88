"""S3 storage against a real S3-compatible server on loopback (moto's server mode)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers.s3_server import moto_s3, s3_client
from PIL import Image as PILImage

from workers.api.client import Image
from workers.config import Settings
from workers.errors import ImageRejected, InputError, TransportError
from workers.imagecheck import MAX_BYTES
from workers.message import ImageRef, has_secret_params
from workers.storage import Resolver
from workers.storage.s3 import S3Store
from workers.storage.signed import SignedObject
from workers.storage.uris import object_uri

BUCKET = "cn-storage-s3-test"
KEY = "cam 1/2026-11-23/车牌 ü?.jpg"


def jpeg() -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (80, 40), (10, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_s3() as url:
        client = s3_client(url)
        client.create_bucket(Bucket=BUCKET)
        client.put_object(Bucket=BUCKET, Key=KEY, Body=jpeg())
        client.put_object(Bucket=BUCKET, Key="bad/doc.jpg", Body=b"%PDF-1.4\n")
        client.put_object(Bucket=BUCKET, Key="big/huge.jpg", Body=jpeg() + b"\0" * MAX_BYTES)
        client.put_object(Bucket=BUCKET, Key="empty.jpg", Body=b"")
        yield url


def resolve(settings: Settings, *keys: str, bucket: str = BUCKET) -> list[Any]:
    r = Resolver(settings)
    try:
        return r.resolve_many([ImageRef(object_uri("s3", bucket, k)) for k in keys])
    finally:
        r.close()


def test_url_mode_presigns_a_url_the_server_honours(endpoint: str) -> None:
    settings = Settings(s3_endpoint_url=endpoint, s3_mode="url", signed_url_ttl_s=120)
    (target,) = resolve(settings, KEY)
    # Checked now, signed at each attempt: valid for the call's timeouts (5 + 10 s) plus 60 s.
    assert isinstance(target, SignedObject)
    out = target.signed_image()
    assert isinstance(out, Image) and out.url is not None
    assert out.url.startswith(endpoint) and has_secret_params(out.url)
    assert "X-Amz-Expires=75" in out.url
    fetched = httpx.get(out.url)
    assert fetched.status_code == 200 and fetched.content == jpeg()
    short = Settings(s3_endpoint_url=endpoint, s3_mode="url", signed_url_ttl_s=30)
    (capped,) = resolve(short, KEY)
    assert "X-Amz-Expires=30" in str(capped.signed_image().url)


def test_url_mode_checks_existence_and_size_first(endpoint: str) -> None:
    settings = Settings(s3_endpoint_url=endpoint, s3_mode="url")
    out = resolve(settings, "nope.jpg", "big/huge.jpg", "empty.jpg")
    assert isinstance(out[0], InputError) and "not found" in str(out[0])
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.imageTooLarge"
    assert isinstance(out[2], ImageRejected) and out[2].code == "local.emptyImage"
    (missing_bucket,) = resolve(settings, KEY, bucket="cn-no-such-bucket")
    assert isinstance(missing_bucket, InputError)


def test_bytes_mode_downloads_and_checks(endpoint: str) -> None:
    settings = Settings(s3_endpoint_url=endpoint, s3_mode="bytes")
    out = resolve(settings, KEY, "bad/doc.jpg", "big/huge.jpg", "nope.jpg")
    assert isinstance(out[0], Image) and out[0].body == jpeg()
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.unsupportedFormat"
    assert isinstance(out[2], ImageRejected) and out[2].code == "local.imageTooLarge"
    assert isinstance(out[3], InputError)


def test_presigned_url_over_2048_bytes_falls_back_to_bytes(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long STS session token makes the presigned URL longer than the API accepts.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "T" * 2100)
    (target,) = resolve(Settings(s3_endpoint_url=endpoint, s3_mode="url"), KEY)
    assert isinstance(target, SignedObject) and target.signed_image() is None
    out = target.bytes_image()
    assert out.url is None and out.body == jpeg() and out.content_key == target.content_key


def test_aws_endpoint_url_from_the_environment_is_honoured(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    (out,) = resolve(Settings(s3_mode="bytes"), KEY)
    assert isinstance(out, Image) and out.body == jpeg()


def test_unreachable_endpoint_is_a_transport_error_without_secrets(endpoint: str) -> None:
    with moto_s3() as other:
        pass  # started and stopped: nothing listens on that port any more
    settings = Settings(s3_endpoint_url=other, s3_mode="bytes", connect_timeout_s=0.5)
    r = Resolver(settings, stores={"s3": S3Store(settings, attempts=1)})
    try:
        (out,) = r.resolve_many([ImageRef(object_uri("s3", BUCKET, KEY))])
    finally:
        r.close()
    assert isinstance(out, TransportError)
    assert "testing" not in str(out) and "X-Amz" not in str(out)


def test_listing_pages_through_a_prefix(endpoint: str) -> None:
    client = s3_client(endpoint)
    bucket = "cn-storage-s3-list"
    client.create_bucket(Bucket=bucket)
    for i in range(25):
        client.put_object(Bucket=bucket, Key=f"p/{i:05d}.jpg", Body=b"x")
    client.put_object(Bucket=bucket, Key="p/folder/", Body=b"")
    client.put_object(Bucket=bucket, Key="q/other.jpg", Body=b"x")
    store = S3Store(Settings(s3_endpoint_url=endpoint), page_size=7)  # four pages
    keys = [o.key for o in store.iter_objects(bucket, "p/")]
    assert keys == [f"p/{i:05d}.jpg" for i in range(25)]
    with pytest.raises(InputError):
        list(store.iter_objects("cn-no-such-bucket", ""))
