"""The local server on loopback: every refusal gives the real Code and HTTP status, and every
success shape is read by our own client."""

from __future__ import annotations

import hashlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote, urlsplit

import httpx
import pytest
from helpers.http_host import http_host
from PIL import Image as PILImage

from ocrserver.server import RunningServer, ServerConfig, start_server
from ocrserver.truth import make_test_image
from workers.api.client import Client, Image
from workers.api.signing import canonical_query, sha256_hex, sign
from workers.config import Credentials

CREDS = Credentials("testid", "testsecret")


class _Images(BaseHTTPRequestHandler):
    """A tiny loopback image host: /slow sleeps 3 s, /missing is 404, anything else an image."""

    files: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        path = unquote(self.path.split("?")[0])
        if path == "/slow":
            time.sleep(3)
        data = self.files.get(path)
        if data is None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("content-type", "application/octet-stream")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    with http_host(_Images) as url:
        yield url


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(url_timeout_s=1.0, keys="testid:testsecret,stsid:stssec:tok")) as s:
        yield s


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=20) as client:
        yield client


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def signed(
    http: httpx.Client,
    endpoint: str,
    *,
    body: bytes = b"",
    params: dict[str, str] | None = None,
    key: tuple[str, str] = ("testid", "testsecret"),
    date: str | None = None,
    nonce: str | None = None,
    override: dict[str, str] | None = None,
    raw_query: str | None = None,
) -> httpx.Response:
    """One request signed the SDK's way, with any header overridden before signing."""
    params = params or {}
    headers = {
        "host": urlsplit(endpoint).netloc,
        "x-acs-action": "RecognizeCarNumber",
        "x-acs-version": "2021-07-07",
        "x-acs-date": date or _now(),
        "x-acs-signature-nonce": nonce or uuid.uuid4().hex,
        "x-acs-content-sha256": sha256_hex(body),
        "accept": "application/json",
    }
    if body:
        headers["content-type"] = "application/octet-stream"
    headers.update(override or {})
    headers["Authorization"] = sign("POST", params, headers, *key)
    query = canonical_query(params) if raw_query is None else raw_query
    return http.post(f"{endpoint}/?{query}" if query else f"{endpoint}/", headers=headers, content=body)


def _code(resp: httpx.Response) -> tuple[int, str]:
    doc = resp.json()
    assert set(doc) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    assert doc["HostId"] == "127.0.0.1"
    assert doc["RequestId"] == resp.headers["x-acs-request-id"]
    assert doc["Code"] in doc["Recommend"]
    return resp.status_code, doc["Code"]


PNG = make_test_image(["浙A12345"])


# -- authentication -------------------------------------------------------------------------


def test_wrong_key_is_404_not_found(server: RunningServer, http: httpx.Client) -> None:
    r = signed(http, server.url, body=PNG, key=("nosuchkey", "testsecret"))
    assert _code(r) == (404, "InvalidAccessKeyId.NotFound")


def test_wrong_secret_is_signature_mismatch(server: RunningServer, http: httpx.Client) -> None:
    r = signed(http, server.url, body=PNG, key=("testid", "wrongsecret"))
    assert _code(r) == (400, "SignatureDoesNotMatch")
    assert "wrongsecret" not in r.text and "testsecret" not in r.text


def test_body_not_matching_its_hash_is_refused(server: RunningServer, http: httpx.Client) -> None:
    r = signed(http, server.url, body=PNG, override={"x-acs-content-sha256": sha256_hex(b"other")})
    assert _code(r) == (400, "SignatureDoesNotMatch")


def test_expired_date(server: RunningServer, http: httpx.Client) -> None:
    r = signed(http, server.url, body=PNG, date="2020-01-01T00:00:00Z")
    assert _code(r) == (400, "InvalidTimeStamp.Expired")
    r = signed(http, server.url, body=PNG, date="yesterday")
    assert _code(r) == (400, "InvalidTimeStamp.Format")


def test_reused_nonce(server: RunningServer, http: httpx.Client) -> None:
    nonce = uuid.uuid4().hex
    assert signed(http, server.url, body=PNG, nonce=nonce).status_code == 200
    assert _code(signed(http, server.url, body=PNG, nonce=nonce)) == (400, "SignatureNonceUsed")
    # The same nonce under another key is that key's first use.
    other = signed(http, server.url, body=PNG, nonce=nonce, key=("stsid", "stssec"),
                   override={"x-acs-security-token": "tok", "x-acs-accesskey-id": "stsid"})
    assert other.status_code == 200


def test_missing_and_garbled_authorization(server: RunningServer, http: httpx.Client) -> None:
    headers = {"x-acs-action": "RecognizeCarNumber", "x-acs-version": "2021-07-07"}
    r = http.post(f"{server.url}/", headers=headers, content=PNG)
    assert _code(r) == (400, "MissingAccessKeyId")
    r = http.post(f"{server.url}/", headers={**headers, "Authorization": "ACS3-HMAC-SHA256 garbage"})
    assert _code(r) == (400, "IncompleteSignature")
    r = http.post(f"{server.url}/", headers={**headers, "Authorization": "HMAC x"})
    assert _code(r) == (400, "IncompleteSignature")


def test_date_and_nonce_must_be_signed(server: RunningServer, http: httpx.Client) -> None:
    headers = {"host": urlsplit(server.url).netloc, "x-acs-action": "RecognizeCarNumber",
               "x-acs-version": "2021-07-07", "x-acs-content-sha256": sha256_hex(PNG)}
    headers["Authorization"] = sign("POST", {}, headers, "testid", "testsecret")
    headers.update({"x-acs-date": _now(), "x-acs-signature-nonce": uuid.uuid4().hex})
    assert _code(http.post(f"{server.url}/", headers=headers, content=PNG)) == (
        400, "IncompleteSignature")


def test_wrong_action_and_version(server: RunningServer, http: httpx.Client) -> None:
    r = signed(http, server.url, body=PNG, override={"x-acs-action": "RecognizeIdcard"})
    assert _code(r) == (404, "InvalidAction.NotFound")
    r = signed(http, server.url, body=PNG, override={"x-acs-version": "2019-12-30"})
    assert _code(r) == (400, "InvalidVersion")


def test_sts_token(server: RunningServer, http: httpx.Client) -> None:
    sts = {"x-acs-security-token": "tok", "x-acs-accesskey-id": "stsid"}
    assert signed(http, server.url, body=PNG, key=("stsid", "stssec"), override=sts).status_code == 200
    bad = {**sts, "x-acs-security-token": "forged"}
    r = signed(http, server.url, body=PNG, key=("stsid", "stssec"), override=bad)
    assert _code(r) == (400, "invalidStsToken")
    # Our own client sends STS credentials the SDK's way.
    client = Client(server.url, Credentials("stsid", "stssec", "tok"), http)
    assert client.recognize(Image(body=PNG)).plates[0].text == "浙A12345"


# -- image intake ---------------------------------------------------------------------------


def test_pdf_is_unsupported_format(server: RunningServer, http: httpx.Client) -> None:
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n"
    assert _code(signed(http, server.url, body=pdf)) == (415, "unsupportedImageFormat")


def test_ten_pixel_image_is_illegal_size(server: RunningServer, http: httpx.Client) -> None:
    tiny = make_test_image([], width=10, height=10)
    assert _code(signed(http, server.url, body=tiny)) == (416, "illegalImageSize")
    thin = make_test_image([], width=1000, height=20)
    assert _code(signed(http, server.url, body=thin)) == (416, "illegalImageSize")


def test_eleven_megabyte_body_is_too_large(server: RunningServer, http: httpx.Client) -> None:
    big = PNG + b"\0" * (11 * 1024 * 1024)
    assert _code(signed(http, server.url, body=big)) == (413, "exceededImageContent")


def test_url_and_body_both_or_neither(server: RunningServer, http: httpx.Client,
                                      image_host: str) -> None:
    both = signed(http, server.url, body=PNG, params={"Url": f"{image_host}/a.png"})
    assert _code(both) == (400, "imageUrlOrBodyEmpty")
    assert _code(signed(http, server.url)) == (400, "imageUrlOrBodyEmpty")


def test_url_of_2049_bytes(server: RunningServer, http: httpx.Client, image_host: str) -> None:
    url = f"{image_host}/"
    url += "a" * (2049 - len(url))
    assert len(url.encode()) == 2049
    assert _code(signed(http, server.url, params={"Url": url})) == (400, "exceededImageUrlLength")


def test_url_refusals(server: RunningServer, http: httpx.Client, image_host: str) -> None:
    unsafe = signed(http, server.url, params={"Url": "http://10.0.0.1/a.png"})
    assert _code(unsafe) == (400, "notSafeImageUrl")
    assert _code(signed(http, server.url, params={"Url": "ftp://127.0.0.1/a.png"})) == (
        400, "illegalImageUrl")
    missing = signed(http, server.url, params={"Url": f"{image_host}/missing"})
    assert _code(missing) == (400, "illegalImageUrl")
    started = time.monotonic()
    slow = signed(http, server.url, params={"Url": f"{image_host}/slow"})
    assert _code(slow) == (400, "imageTimeOut")
    assert time.monotonic() - started < 2.5  # the server's 1 s deadline, not the host's 3 s


# -- successes ------------------------------------------------------------------------------


def test_success_by_body_with_our_client(server: RunningServer, http: httpx.Client) -> None:
    client = Client(server.url, CREDS, http)
    got = client.recognize(Image(body=PNG))
    assert [p.text for p in got.plates] == ["浙A12345"]
    assert got.plates[0].plate_type == "小型汽车"
    assert got.plates[0].polygon is not None
    assert (got.width, got.height, got.org_width, got.org_height) == (320, 240, 320, 240)


def test_success_by_url_with_form_encoded_query(server: RunningServer, http: httpx.Client,
                                                image_host: str) -> None:
    _Images.files["/cam 1/车.png"] = make_test_image(["苏E99999"], fmt="png")
    url = f"{image_host}/{quote('cam 1')}/{quote('车.png')}"
    client = Client(server.url, CREDS, http)
    assert [p.text for p in client.recognize(Image(url=url)).plates] == ["苏E99999"]
    # The SDK puts the query on the wire form-encoded ('+' for space) and signs it with %20.
    _Images.files["/a b.png"] = make_test_image(["京N00001"])
    plus = f"{image_host}/a b.png"
    wire = "Url=" + quote(plus, safe="").replace("%20", "+")
    r = signed(http, server.url, params={"Url": plus}, raw_query=wire)
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["Data"])["data"]["data"]["车牌"] == "京N00001"


def test_envelope_has_the_documented_shape(server: RunningServer, http: httpx.Client) -> None:
    r = signed(http, server.url, body=make_test_image(["浙A12345", "粤B6789X"]))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    env = r.json()
    assert set(env) == {"RequestId", "Data"} and isinstance(env["Data"], str)
    doc = json.loads(env["Data"])
    assert list(doc) == ["data", "height", "orgHeight", "orgWidth", "prism_keyValueInfo",
                         "structure_list", "width"]
    data = doc["data"]
    assert list(data) == ["secondary_cls", "data", "score", "info"]
    assert isinstance(data["secondary_cls"]["type_str"], str)
    assert isinstance(data["secondary_cls"]["prob"], float)
    assert data["data"] == {"车牌": "浙A12345"}
    info = data["info"][0]
    assert list(info) == ["value", "key", "key_prob", "value_prob", "key_loc", "value_loc"]
    assert info["key"] == "车牌" and info["key_loc"] == ""
    assert len(info["value_loc"].split(",")) == 8
    assert doc["structure_list"][0] == {"$ref": "$.data"}
    assert doc["structure_list"][1]["data"] == {"车牌": "粤B6789X"}
    prism = doc["prism_keyValueInfo"]
    assert [p["value"] for p in prism] == ["浙A12345", "粤B6789X"]
    assert list(prism[0]) == ["key", "keyProb", "value", "valuePos", "valueProb"]
    assert isinstance(prism[0]["keyProb"], int) and isinstance(prism[0]["valueProb"], int)
    assert [set(p) for p in prism[0]["valuePos"]] == [{"x", "y"}] * 4
    assert all(isinstance(doc[k], int) for k in ("width", "height", "orgWidth", "orgHeight"))


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_every_success_shape_reads_back(server: RunningServer, http: httpx.Client,
                                        fmt: str, n: int) -> None:
    texts = ["浙A12345", "粤B6789X", "川A0000挂"][:n]
    img = make_test_image(texts, width=480, height=360, fmt=fmt)
    got = Client(server.url, CREDS, http).recognize(Image(body=img))
    assert [p.text for p in got.plates] == texts
    assert got.request_id and got.width == 480


def test_expanded_refs_read_back_the_same(http: httpx.Client) -> None:
    img = make_test_image(["浙A12345", "粤B6789X"])
    with start_server(ServerConfig(expand_refs=True)) as srv:
        r = signed(http, srv.url, body=img)
        assert "$ref" not in r.json()["Data"]
        got = Client(srv.url, CREDS, http).recognize(Image(body=img))
    assert [p.text for p in got.plates] == ["浙A12345", "粤B6789X"]


def _bare_png(color: tuple[int, int, int], size: tuple[int, int] = (200, 100)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_sidecar_truth_by_sha256_and_name(tmp_path: Path, http: httpx.Client,
                                          image_host: str) -> None:
    bare, other = _bare_png((10, 10, 10)), _bare_png((200, 10, 10), (64, 64))
    truth = tmp_path / "truth.jsonl"
    lines = [
        {"sha256": hashlib.sha256(bare).hexdigest(), "plates": [{"text": "鄂A11111", "type": "新能源车"}]},
        {"name": "named.png", "plates": [{"text": "鄂B22222"}]},
    ]
    truth.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", "utf-8")
    _Images.files["/dir/named.png"] = other
    with start_server(ServerConfig(truth_path=str(truth))) as srv:
        client = Client(srv.url, CREDS, http)
        by_sha = client.recognize(Image(body=bare)).plates
        assert [(p.text, p.plate_type) for p in by_sha] == [("鄂A11111", "新能源车")]
        assert by_sha[0].polygon is not None  # a sidecar plate without polygon gets a box
        by_name = client.recognize(Image(url=f"{image_host}/dir/named.png")).plates
        assert [p.text for p in by_name] == ["鄂B22222"]
        assert client.recognize(Image(body=other)).plates == ()  # by body: no name to match
        assert client.recognize(Image(body=make_test_image([]))).plates == ()
