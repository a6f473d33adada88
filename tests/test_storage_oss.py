"""OSS storage through the real oss2 library against a loopback OSS server (tests/helpers)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers.oss_server import FakeOss
from PIL import Image as PILImage

from workers.api.client import Image
from workers.config import Settings
from workers.errors import ConfigError, ImageRejected, InputError, StorageCredentialsError, TransportError
from workers.imagecheck import MAX_BYTES
from workers.message import ImageRef, has_secret_params
from workers.storage import Resolver
from workers.storage.oss import OssStore, public_endpoint
from workers.storage.signed import SignedObject
from workers.storage.uris import object_uri

KEY = "cam 1/2026-11-23/车牌 ü?#.jpg"


def jpeg() -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (80, 40), (200, 20, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def oss() -> Iterator[FakeOss]:
    with FakeOss() as server:
        server.put("bkt", KEY, jpeg())
        server.put("bkt", "big.jpg", jpeg() + b"\0" * MAX_BYTES)
        server.put("bkt", "doc.jpg", b"%PDF-1.4\n")
        yield server


def settings_for(oss: FakeOss, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "oss_endpoint": oss.endpoint,
        "oss_access_key_id": oss.access_key_id,
        "oss_access_key_secret": oss.access_key_secret,
    }
    return Settings(**{**base, **kw})


def resolve(settings: Settings, *keys: str, bucket: str = "bkt") -> list[Any]:
    r = Resolver(settings)
    try:
        return r.resolve_many([ImageRef(object_uri("oss", bucket, k)) for k in keys])
    finally:
        r.close()


def test_url_mode_signs_a_url_the_server_accepts(oss: FakeOss) -> None:
    (target,) = resolve(settings_for(oss, oss_mode="url", signed_url_ttl_s=60), KEY)
    assert isinstance(target, SignedObject)
    out = target.signed_image()  # signed at each attempt, for that attempt
    assert isinstance(out, Image) and out.url is not None and has_secret_params(out.url)
    assert httpx.get(out.url).content == jpeg()  # signature V1 verified by the server
    expires = int(httpx.URL(out.url).params["Expires"])
    assert time.time() + 50 < expires <= time.time() + 61  # bounded lifetime
    forged = out.url.replace(f"Expires={expires}", f"Expires={expires + 3600}")
    assert httpx.get(forged).status_code == 403


def test_url_mode_heads_first(oss: FakeOss) -> None:
    out = resolve(settings_for(oss, oss_mode="url"), "nope.jpg", "big.jpg")
    assert isinstance(out[0], InputError) and "not found (NoSuchKey)" in str(out[0])
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.imageTooLarge"
    (missing,) = resolve(settings_for(oss), KEY, bucket="nobucket")
    assert isinstance(missing, InputError) and "NoSuchBucket" in str(missing)


def test_bytes_mode_downloads_and_checks(oss: FakeOss) -> None:
    out = resolve(settings_for(oss, oss_mode="bytes"), KEY, "doc.jpg", "big.jpg", "nope.jpg")
    assert isinstance(out[0], Image) and out[0].body == jpeg()
    assert isinstance(out[1], ImageRejected) and out[1].code == "local.unsupportedFormat"
    assert isinstance(out[2], ImageRejected) and out[2].code == "local.imageTooLarge"
    assert isinstance(out[3], InputError)


def test_wrong_secret_stops_the_fleet_and_is_never_echoed(oss: FakeOss) -> None:
    # Our credentials refused concern every image alike: raised (the pipeline stops the fleet,
    # images stay pending), never a failed row per image.
    for mode in ("bytes", "url"):
        with pytest.raises(StorageCredentialsError) as info:
            resolve(settings_for(oss, oss_mode=mode, oss_access_key_secret="s3cr3t-wrong"), KEY)
        assert "SignatureDoesNotMatch" in str(info.value) and "s3cr3t-wrong" not in str(info.value)


def test_sts_token_travels_with_requests_and_urls() -> None:
    with FakeOss(security_token="sts-token-123") as server:
        server.put("bkt", "a.jpg", jpeg())
        base = settings_for(server, oss_security_token="sts-token-123")
        (as_bytes,) = resolve(base.with_(oss_mode="bytes"), "a.jpg")
        assert isinstance(as_bytes, Image) and as_bytes.body == jpeg()
        (target,) = resolve(base.with_(oss_mode="url"), "a.jpg")
        as_url = target.signed_image()
        assert isinstance(as_url, Image) and as_url.url and "security-token" in as_url.url
        assert httpx.get(as_url.url).status_code == 200
        with pytest.raises(StorageCredentialsError, match="InvalidSecurityToken"):
            resolve(base.with_(oss_security_token=None, oss_mode="bytes"), "a.jpg")


def test_falls_back_to_alibaba_cloud_credentials(oss: FakeOss) -> None:
    settings = Settings(
        oss_endpoint=oss.endpoint,
        access_key_id=oss.access_key_id,
        access_key_secret=oss.access_key_secret,
        oss_mode="bytes",
    )
    (out,) = resolve(settings, KEY)
    assert isinstance(out, Image)


def test_server_errors_are_transport_errors(oss: FakeOss) -> None:
    oss.fail_next = 10
    try:
        (out,) = resolve(settings_for(oss, oss_mode="bytes"), KEY)
    finally:
        oss.fail_next = 0
    assert isinstance(out, TransportError) and "503" in str(out)


def test_missing_endpoint_or_credentials_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="CARNUMBER_OSS_ENDPOINT"):
        OssStore(Settings())
    with pytest.raises(ConfigError, match="OSS_ACCESS_KEY_ID"):
        OssStore(Settings(oss_endpoint="oss-cn-hangzhou.aliyuncs.com"))


def test_internal_endpoint_reads_internally_and_signs_publicly() -> None:
    assert public_endpoint("https://oss-cn-hangzhou-internal.aliyuncs.com") == (
        "https://oss-cn-hangzhou.aliyuncs.com"
    )
    store = OssStore(
        Settings(
            oss_endpoint="oss-cn-hangzhou-internal.aliyuncs.com",
            oss_access_key_id="id",
            oss_access_key_secret="secret",
        )
    )
    assert store.endpoint == "https://oss-cn-hangzhou-internal.aliyuncs.com"
    url = store.presign("bkt", "a/b.jpg", 300)  # signing is local: no request is made
    assert url.startswith("https://bkt.oss-cn-hangzhou.aliyuncs.com/a/b.jpg?")


def test_listing_pages_through_a_prefix_in_key_order(oss: FakeOss) -> None:
    for i in range(23):
        oss.put("lst", f"p/{22 - i:03d} é.jpg", b"x")
    oss.put("lst", "p/dir/", b"")
    oss.put("lst", "q/x.jpg", b"x")
    before = len(oss.requests)
    store = OssStore(settings_for(oss), page_size=5)
    keys = [o.key for o in store.iter_objects("lst", "p/")]
    assert keys == [f"p/{i:03d} é.jpg" for i in range(23)]
    assert len(oss.requests) - before == 5  # 24 keys, 5 a page
    with pytest.raises(InputError):
        list(store.iter_objects("nobucket", ""))
