"""The official SDK (alibabacloud_ocr_api20210707), unmodified, against the local server."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

import pytest

sdk_client = pytest.importorskip("alibabacloud_ocr_api20210707.client")
sdk_models = pytest.importorskip("alibabacloud_ocr_api20210707.models")
open_api_models = pytest.importorskip("alibabacloud_tea_openapi.models")
tea_exceptions = pytest.importorskip("Tea.exceptions")

from ocrserver.server import RunningServer, ServerConfig, start_server  # noqa: E402
from ocrserver.truth import make_test_image  # noqa: E402
from workers.api.response import parse_data  # noqa: E402

PNG = make_test_image(["浙A12345"])


class _OneImage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig()) as s:
        yield s


@pytest.fixture(scope="module")
def image_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    httpd.daemon_threads = True
    Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/images/a b.png"
    httpd.shutdown()
    httpd.server_close()


def _sdk(server: RunningServer, key_id: str = "testid", secret: str = "testsecret") -> object:
    config = open_api_models.Config(
        access_key_id=key_id,
        access_key_secret=secret,
        endpoint=f"127.0.0.1:{server.port}",
        protocol="http",
    )
    return sdk_client.Client(config)


def _plate(resp: object) -> str:
    body = resp.body  # type: ignore[attr-defined]
    assert resp.status_code == 200 and body.request_id  # type: ignore[attr-defined]
    (plate,) = parse_data(body.data).plates
    return plate.text


def test_sdk_success_by_body(server: RunningServer) -> None:
    client = _sdk(server)
    req = sdk_models.RecognizeCarNumberRequest(body=io.BytesIO(PNG))
    resp = client.recognize_car_number(req)  # type: ignore[attr-defined]
    assert _plate(resp) == "浙A12345"
    doc = json.loads(resp.body.data)
    assert doc["structure_list"] == [{"$ref": "$.data"}]


def test_sdk_success_by_url(server: RunningServer, image_url: str) -> None:
    # A space in the URL: the SDK sends the query form-encoded and signs it %20-encoded.
    req = sdk_models.RecognizeCarNumberRequest(url=image_url)
    assert _plate(_sdk(server).recognize_car_number(req)) == "浙A12345"  # type: ignore[attr-defined]


def _sdk_error(client: object, body: bytes) -> object:
    req = sdk_models.RecognizeCarNumberRequest(body=io.BytesIO(body))
    with pytest.raises(tea_exceptions.TeaException) as err:
        client.recognize_car_number(req)  # type: ignore[attr-defined]
    return err.value


def test_sdk_wrong_secret(server: RunningServer) -> None:
    exc = _sdk_error(_sdk(server, secret="not-the-secret"), PNG)
    assert exc.code == "SignatureDoesNotMatch"  # type: ignore[attr-defined]
    assert exc.data["statusCode"] == 400  # type: ignore[attr-defined]


def test_sdk_bad_image(server: RunningServer) -> None:
    exc = _sdk_error(_sdk(server), b"%PDF-1.7\n" + b"\0" * 200)
    assert exc.code == "unsupportedImageFormat"  # type: ignore[attr-defined]
    assert exc.data["statusCode"] == 415  # type: ignore[attr-defined]


def test_sdk_throttled() -> None:
    codes = []
    with start_server(ServerConfig(qps=2)) as limited:
        client = _sdk(limited)
        for _ in range(10):  # 2 per whole second: some of 10 quick calls must be refused
            try:
                req = sdk_models.RecognizeCarNumberRequest(body=io.BytesIO(PNG))
                client.recognize_car_number(req)  # type: ignore[attr-defined]
                codes.append("ok")
            except tea_exceptions.TeaException as exc:
                codes.append(exc.code)
                assert exc.data["statusCode"] == 400  # type: ignore[attr-defined]
    assert "Throttling.User" in codes and "ok" in codes
    assert set(codes) == {"ok", "Throttling.User"}
