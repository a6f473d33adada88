"""OSS reads on rotating credentials: the OSS client asks the credential chain at each request
(oss2's ProviderAuth), so a token that is replaced mid-run is picked up without a restart.
Real oss2 against the loopback OSS server, tokens from a loopback credentials URI."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from helpers.oss_server import FakeOss

from workers.config import Settings
from workers.errors import ConfigError
from workers.storage.oss import OssStore


class TokenSource:
    """A credentials URI handing out the OSS key with a new 2-second token on each request; the
    OSS server is told to accept only the newest one (as if the old one had expired)."""

    def __init__(self, oss: FakeOss) -> None:
        self.oss, self.issued = oss, 0
        source = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:
                source.issued += 1
                token = f"oss-token-{source.issued}"
                source.oss.security_token = token
                exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))
                body = json.dumps({"Code": "Success", "AccessKeyId": oss.access_key_id,
                                   "AccessKeySecret": oss.access_key_secret,
                                   "SecurityToken": token, "Expiration": exp}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/creds"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def oss() -> Iterator[FakeOss]:
    with FakeOss() as server:
        server.put("bkt", "a.jpg", b"\xff\xd8jpeg")
        yield server


def test_oss_reads_follow_a_rotating_token(oss: FakeOss) -> None:
    source = TokenSource(oss)
    try:
        store = OssStore(Settings(oss_endpoint=oss.endpoint, credentials_uri=source.uri,
                                  aliyun_config_file="/nonexistent"))  # fmt: skip
        assert store.head("bkt", "a.jpg") == 6
        first = source.issued
        time.sleep(1.3)  # past half the token's life: the next request refreshes it
        assert store.get("bkt", "a.jpg", 100) == b"\xff\xd8jpeg"
        assert source.issued == first + 1
        # A signed URL carries the token it was signed with, and the server accepts it.
        url = store.presign("bkt", "a.jpg", 60)
        assert "security-token=oss-token-" in url
        assert httpx.get(url).content == b"\xff\xd8jpeg"
    finally:
        source.close()


def test_oss_s_own_variables_win_and_half_a_pair_is_an_error(oss: FakeOss) -> None:
    settings = Settings(oss_endpoint=oss.endpoint, oss_access_key_id=oss.access_key_id,
                        oss_access_key_secret=oss.access_key_secret,
                        credentials_uri="http://127.0.0.1:9/never-asked")  # fmt: skip
    assert OssStore(settings).head("bkt", "a.jpg") == 6
    with pytest.raises(ConfigError, match="OSS_ACCESS_KEY_SECRET"):
        OssStore(Settings(oss_endpoint=oss.endpoint, oss_access_key_id="x"))
    with pytest.raises(ConfigError, match="ALIBABA_CLOUD_CREDENTIALS_URI"):
        OssStore(Settings(oss_endpoint=oss.endpoint, aliyun_config_file="/nonexistent"))
