"""The local server's own STS (ocrserver/sts.py) and our client on its tokens, over loopback:
tokens it issued are accepted until they expire, then refused with Alibaba Cloud's
``InvalidSecurityToken.Expired``; the client renews and calls again when its credential source
has a newer token, and stops the fleet with the real code when it has not, or when the token was
revoked."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from ocrserver.server import RunningServer, ServerConfig, start_server
from ocrserver.sts import StsIssuer
from ocrserver.truth import make_test_image
from workers.api.client import AsyncClient, Client, Image
from workers.config import Credentials, Settings
from workers.credentials import provider_from_settings
from workers.errors import ApiError, FatalApiError, TransportError

PNG = make_test_image(["浙A12345"])
NO_CLI = "/nonexistent/aliyun-config.json"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="parent:parent-secret,other:other-secret")) as srv:
        yield srv


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def _issue(server: RunningServer, **query: Any) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/__carnumber/sts/credentials", params=query, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _creds(doc: dict[str, Any]) -> Credentials:
    return Credentials(doc["AccessKeyId"], doc["AccessKeySecret"], doc["SecurityToken"])


def _code(client: Client) -> str:
    with pytest.raises(ApiError) as info:
        client.recognize(Image(body=PNG))
    return info.value.code


def test_the_credentials_uri_answer_and_a_call_on_it(server: RunningServer, http: httpx.Client) -> None:
    doc = _issue(server, key="parent", duration_s=900)
    assert doc["Code"] == "Success" and doc["AccessKeyId"].startswith("STS.")
    expires = time.mktime(time.strptime(doc["Expiration"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert 898 <= expires - time.time() <= 900
    assert Client(server.url, _creds(doc), http).recognize(Image(body=PNG)).plates[0].text == "浙A12345"
    # The temporary key counts against its parent's account (QPS limit and stats), as on the cloud.
    per_key = httpx.get(f"{server.url}/__carnumber/stats").json()["per_key"]
    assert "parent" in per_key and not any(k.startswith("STS.") for k in per_key)


def test_each_bad_token_gets_the_gateway_s_code(server: RunningServer, http: httpx.Client) -> None:
    good = _creds(_issue(server, key="parent", duration_s=1))
    other = _creds(_issue(server, key="other"))
    assert _code(Client(server.url, Credentials(good.access_key_id, good.access_key_secret), http)) == (
        "MissingSecurityToken"
    )
    forged = good.security_token[:-4] + "AAAA"  # type: ignore[index]
    bad = Credentials(good.access_key_id, good.access_key_secret, forged)
    assert _code(Client(server.url, bad, http)) == "InvalidSecurityToken.Malformed"
    swapped = Credentials(good.access_key_id, good.access_key_secret, other.security_token)
    assert _code(Client(server.url, swapped, http)) == "InvalidSecurityToken.MismatchWithAccessKey"
    time.sleep(1.05)
    assert _code(Client(server.url, good, http)) == "InvalidSecurityToken.Expired"


def test_revoked_tokens_are_refused_and_later_ones_are_good(
    server: RunningServer, http: httpx.Client
) -> None:
    before = _creds(_issue(server, key="other"))
    httpx.post(f"{server.url}/__carnumber/sts/revoke", params={"key": "other"}).raise_for_status()
    assert _code(Client(server.url, before, http)) == "invalidStsToken"
    after = _creds(_issue(server, key="other"))
    assert Client(server.url, after, http).recognize(Image(body=PNG)).plates


def test_bad_requests_to_the_sts_routes() -> None:
    issuer = StsIssuer({})
    with pytest.raises(ValueError, match="not one of the server's keys"):
        issuer.issue("nobody", 60, time.time())
    with start_server(ServerConfig()) as srv:
        r = httpx.get(f"{srv.url}/__carnumber/sts/credentials", params={"duration_s": 0})
        assert r.status_code == 400 and "duration_s" in r.json()["Message"]
        # Only loopback clients get credentials (the server may listen on other addresses).
        scope = {"client": ("10.1.2.3", 5555), "query_string": b"", "method": "GET",
                 "path": "/__carnumber/sts/credentials"}  # fmt: skip
        assert srv.app._sts(scope)[0] == 403
        scope["client"] = ("::ffff:127.0.0.1", 5555)
        assert srv.app._sts(scope)[0] == 200


def _uri_provider(server: RunningServer, **query: Any) -> Any:
    q = "&".join(f"{k}={v}" for k, v in {"key": "parent", **query}.items())
    uri = f"{server.url}/__carnumber/sts/credentials?{q}"
    return provider_from_settings(Settings(credentials_uri=uri, aliyun_config_file=NO_CLI))


def test_an_expired_token_is_renewed_and_called_again(server: RunningServer) -> None:
    # The source announces 20 s more than the token really has (a skewed clock somewhere): the
    # service refuses it after 1 s; the client renews and the call after that succeeds.
    provider = _uri_provider(server, duration_s=1, extra_s=20)

    async def calls() -> tuple[BaseException, str]:
        async with httpx.AsyncClient(timeout=10) as http:
            client = AsyncClient(server.url, provider, http)
            await client.recognize(Image(body=PNG))
            await asyncio.sleep(1.05)
            with pytest.raises(TransportError) as info:
                await client.recognize(Image(body=PNG))
            rec = await client.recognize(Image(body=PNG))
            return info.value, rec.plates[0].text

    error, plate = asyncio.run(calls())
    assert error.code == "local.tokenExpired" and plate == "浙A12345"


def test_an_expired_token_with_nothing_newer_stops_with_the_real_code(
    server: RunningServer, http: httpx.Client
) -> None:
    # A fixed STS token in the environment, and a credentials URI stuck on one token.
    doc = _issue(server, key="parent", duration_s=1)
    time.sleep(1.05)
    fixed = Client(server.url, _creds(doc), http)
    with pytest.raises(FatalApiError, match=r"InvalidSecurityToken\.Expired"):
        fixed.recognize(Image(body=PNG))

    class Stuck(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            body = json.dumps({**doc, "Expiration": "2099-01-01T00:00:00Z"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    stuck = ThreadingHTTPServer(("127.0.0.1", 0), Stuck)
    threading.Thread(target=stuck.serve_forever, daemon=True).start()
    try:
        settings = Settings(credentials_uri=f"http://127.0.0.1:{stuck.server_address[1]}/",
                            aliyun_config_file=NO_CLI)  # fmt: skip
        client = Client(server.url, provider_from_settings(settings), http)
        with pytest.raises(FatalApiError) as info:
            client.recognize(Image(body=PNG))
        assert info.value.code == "InvalidSecurityToken.Expired"
    finally:
        stuck.shutdown()
        stuck.server_close()


def test_after_a_revocation_the_next_call_is_signed_with_a_fresh_token(server: RunningServer) -> None:
    provider = _uri_provider(server, key="other", duration_s=600)
    with httpx.Client(timeout=10) as http:
        client = Client(server.url, provider, http)
        client.recognize(Image(body=PNG))
        httpx.post(f"{server.url}/__carnumber/sts/revoke", params={"key": "other"}).raise_for_status()
        with pytest.raises(FatalApiError, match="invalidStsToken"):
            client.recognize(Image(body=PNG))  # stops the fleet, as a revoked key does
        assert client.recognize(Image(body=PNG)).plates  # after `carnumber resume`
