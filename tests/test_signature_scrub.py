"""No signature survives into a message, a record or the output (issue 20, item 5), while the URL
the service fetches still carries it.

An ``http(s)`` source keeps only the query parameters on ``CARNUMBER_KEEP_QUERY_PARAMS`` (an
allow-list: none by default); the URL as listed is sealed in Redis for the worker. The end-to-end
test lists a signed link of every major cloud and CDN in a manifest, runs the real ``carnumber
enqueue`` and a real worker, and looks for the signatures everywhere they must not be: the broker's
messages, every other Redis key, the ``_enqueued/`` records, the output, the worker's log. The
image server on loopback answers only the full signed URL, so every answered row proves the fetch
carried it.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.parquet as pq
import pytest
import redis

from carnumber.cli import main as cli
from carnumber.localstack import start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import make_test_image
from workers.errors import ConfigError
from workers.keys import Keys
from workers.message import canonical_url, has_secret_params, image_id_for, kept_params, redact_url
from workers.sink.dataset import open_dataset

pytestmark = pytest.mark.timeout(180)
MARK = "SIGVAL"  # in every signature and credential value below


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def signed_queries() -> dict[str, str]:
    """kind -> the query string of a signed link of that kind (live: expiring in an hour)."""
    now = datetime.now(UTC)
    later = int((now + timedelta(hours=1)).timestamp())
    amz = now.strftime("%Y%m%dT%H%M%SZ")
    return {
        "aws-sigv4": (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA" + MARK + "%2F20991231%2Fus-east-1%2Fs3"
            f"%2Faws4_request&X-Amz-Date={amz}&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
            f"&X-Amz-Security-Token=IQo{MARK}tok&X-Amz-Signature=ab{MARK}cd"
        ),
        "aws-sigv2": f"AWSAccessKeyId=AKIA{MARK}&Expires={later}&Signature=s{MARK}%3D",
        "oss-v1": f"OSSAccessKeyId=LTAI{MARK}&Expires={later}&Signature=o{MARK}%3D&security-token=CAIS{MARK}",
        "oss-v4": (
            f"x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-credential=LTAI{MARK}%2F20991231%2Fcn-hangzhou"
            f"%2Foss%2Faliyun_v4_request&x-oss-date={amz}&x-oss-expires=3600&x-oss-signature=v4{MARK}"
        ),
        "alibaba-cdn-a": f"auth_key={later}-0-0-{MARK}0123456789abcdef",
        "google-v4": (
            f"X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Credential=sa{MARK}%40p.iam.gserviceaccount.com"
            f"%2F20991231%2Fauto%2Fstorage%2Fgoog4_request&X-Goog-Date={amz}&X-Goog-Expires=3600"
            f"&X-Goog-SignedHeaders=host&X-Goog-Signature=g{MARK}"
        ),
        "google-v2": f"GoogleAccessId=sa{MARK}%40p.iam.gserviceaccount.com&Expires={later}&Signature=g{MARK}",
        "azure-sas": (
            f"sv=2022-11-02&ss=b&srt=o&sp=r&se={_iso(now + timedelta(hours=1))}&st={_iso(now)}&spr=https"
            f"&skoid=oid{MARK}&sktid=tid{MARK}&sig=az{MARK}%3D"
        ),
        "cloudfront-canned": f"Expires={later}&Signature=cf{MARK}~&Key-Pair-Id=K{MARK}",
        "cloudfront-policy": f"Policy=eyJ{MARK}&Signature=cfp{MARK}&Key-Pair-Id=K{MARK}",
        "tencent-cos": (
            f"q-sign-algorithm=sha1&q-ak=AKID{MARK}&q-sign-time=1;{later}&q-key-time=1;{later}"
            f"&q-header-list=host&q-url-param-list=&q-signature=q{MARK}&x-cos-security-token=t{MARK}"
        ),
        "tencent-cdn-d": f"sign=d{MARK}&t={later:x}",
        "qiniu": f"e={later}&token=AK{MARK}:s{MARK}",
        "wangsu": f"wsSecret=w{MARK}&wsTime={later:x}",
        "akamai": f"hdnts=exp%3D{later}~acl%3D%2F*~hmac%3D{MARK}",
        "huawei-obs": f"AccessKeyId=AK{MARK}&Expires={later}&Signature=h{MARK}",
        "custom-cdn": f"mytoken=c{MARK}&w=640",  # a kind nobody listed: the allow-list keeps it out
    }


def test_canonical_sources_keep_no_query_parameter_by_default() -> None:
    for kind, query in signed_queries().items():
        url = f"https://cams.example.com/2026/{kind}.jpg?{query}#frag"
        assert canonical_url(url) == f"https://cams.example.com/2026/{kind}.jpg", kind
        if kind != "custom-cdn":
            assert has_secret_params(url), kind
            # The deny-list below the allow-list (what the stored source is scrubbed with again,
            # and what the image id is taken over) also finds every known signature.
            assert MARK not in redact_url(url), (kind, redact_url(url))
    # A link signed again tomorrow is the same image.
    tomorrow = signed_queries()["aws-sigv4"].replace(f"ab{MARK}cd", "other-signature")
    base = "https://b.s3.amazonaws.com/a.jpg?"
    assert image_id_for(base + signed_queries()["aws-sigv4"]) == image_id_for(base + tomorrow)
    # Named harmless parameters can be kept; signature parameters never.
    assert (
        canonical_url("https://h/x.jpg?w=640&sig=1&id=7", kept_params("W, id"))
        == "https://h/x.jpg?w=640&id=7"
    )
    for name in ("Signature", "sig", "X-Amz-Date", "auth_key", "x-oss-credential", "token", "se"):
        with pytest.raises(ValueError, match="never kept"):
            kept_params(f"w,{name}")
    assert redact_url("https://user:PASS@h/x.jpg") == "https://h/x.jpg"


class _ImageServer:
    """Serves ``/img/<kind>.png`` only for the exact query it was signed with (and records every
    query it was asked for)."""

    def __init__(self, queries: dict[str, str]) -> None:
        self.queries = queries
        self.images = {
            kind: make_test_image([{"text": f"京A{i:05d}", "type": "小型汽车"}])
            for i, kind in enumerate(queries)
        }
        self.seen: dict[str, list[str]] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                kind = parts.path.rsplit("/", 1)[-1].removesuffix(".png")
                outer.seen.setdefault(kind, []).append(parts.query)
                body = outer.images.get(kind) if parts.query == outer.queries.get(kind) else None
                self.send_response(200 if body else 403)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def images() -> Iterator[_ImageServer]:
    server = _ImageServer(signed_queries())
    yield server
    server.close()


@pytest.fixture
def server() -> Iterator[RunningServer]:
    with start_server(ServerConfig(keys="sigid:sigsecret")) as srv:
        yield srv


def _texts(value: Any) -> Iterator[str]:
    if isinstance(value, bytes):
        yield value.decode("utf-8", "replace")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _texts(k)
            yield from _texts(v)
    elif isinstance(value, list | tuple | set):
        for v in value:
            yield from _texts(v)
    elif value is not None:
        yield str(value)


def _message_body(raw: bytes) -> str:
    """The chunk a Celery message on the Redis list carries (its body is base64 in the envelope)."""
    envelope = json.loads(raw)
    return base64.b64decode(envelope["body"]).decode("utf-8")


def _redis_texts(client: redis.Redis, prefix: str, queue: str) -> dict[str, list[str]]:
    """Every value under the test's prefix (and the broker queue), key -> its texts; the sealed-URL
    store, where the signed URLs are meant to be, apart."""
    out: dict[str, list[str]] = {}
    for key in {*client.scan_iter(f"{prefix}*", count=1000), queue.encode()}:
        kind = client.type(key)
        value: Any
        if kind == b"string":
            value = client.get(key)
        elif kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"list":
            value = client.lrange(key, 0, -1)
            if key == queue.encode():  # Celery messages: their bodies hold the chunks
                out.setdefault(key.decode(), []).extend(_message_body(raw) for raw in value)
        elif kind == b"set":
            value = client.smembers(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1)
        elif kind == b"stream":
            value = [fields for _, fields in client.xrange(key)]
        else:
            continue
        out.setdefault(key.decode(), []).extend(_texts(value))
    return out


def test_no_signature_reaches_messages_records_or_output_and_the_fetch_carries_it(
    images: _ImageServer,
    server: RunningServer,
    redis_url: str,
    redis_client: redis.Redis,
    key_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = tmp_path / "signed.csv"
    urls = {kind: f"{images.base}/img/{kind}.png?{q}" for kind, q in images.queries.items()}
    manifest.write_text("url,camera\n" + "".join(f"{u},{k}\n" for k, u in urls.items()), encoding="utf-8")
    queue = f"{key_prefix}:queue"
    env = {
        "CARNUMBER_ENDPOINT": server.url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": "sigid",
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "sigsecret",
        "REDIS_URL": redis_url,
        "CARNUMBER_KEY_PREFIX": key_prefix,
        "CARNUMBER_QUEUE": queue,
        "CARNUMBER_OUTPUT": str(tmp_path / "out"),
        "CARNUMBER_CHUNK_SIZE": "5",
        "CARNUMBER_QPS": "0",
        "CARNUMBER_KEEP_QUERY_PARAMS": "w",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    # Enqueued, not yet consumed: the broker's messages and every Redis key.
    assert cli(["enqueue", str(manifest), "--run", "signed"]) == 0
    texts = _redis_texts(redis_client, key_prefix, queue)
    sealed_prefix = Keys(key_prefix).sealed_url("")
    bodies = [t for t in texts[queue] if t.startswith("[[{")]  # the chunks, decoded
    assert len(bodies) == 4
    assert f"{images.base}/img/aws-sigv4.png" in "".join(bodies)
    leaks = {
        k: t[:200] for k, ts in texts.items() if not k.startswith(sealed_prefix) for t in ts if MARK in t
    }
    assert leaks == {}
    sealed = {k: ts for k, ts in texts.items() if k.startswith(sealed_prefix)}
    # Every URL as listed waits there for the worker, and only there (the scan does see them).
    assert len(sealed) == len(urls) and all(MARK in "".join(ts) for ts in sealed.values())

    # The producer's records for verify.
    records = tmp_path / "out" / "_enqueued"
    tables = [pq.read_table(p).to_pylist() for p in records.rglob("*.parquet")]
    assert sum(len(t) for t in tables) == len(urls)
    assert not [r for t in tables for r in t if MARK in str(r)]
    assert {r["source"] for t in tables for r in t} == {
        *(f"{images.base}/img/{k}.png" for k in urls if k != "custom-cdn"),
        f"{images.base}/img/custom-cdn.png?w=640",  # kept: CARNUMBER_KEEP_QUERY_PARAMS=w
    }

    worker = start_worker(env, concurrency=1, hostname=f"sig{abs(hash(key_prefix))}@%h")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and cli(["status", "signed", "--once"]) != 0:
            time.sleep(0.5)
        assert cli(["status", "signed", "--follow"]) == 0
    finally:
        worker.stop()
    rows = open_dataset(env["CARNUMBER_OUTPUT"]).read_run("signed").to_pylist()
    # Every link answered: the service fetched each one with its whole signature...
    assert len(rows) == len(urls) and {r["status"] for r in rows} == {"ok"}, rows
    assert {kind: qs[-1] for kind, qs in images.seen.items()} == images.queries
    # ...and no signature is in the output, the worker's log or any Redis key but the sealed ones.
    assert not [r for r in rows if MARK in str(r)]
    assert not [line for line in worker.lines if MARK in line]
    texts = _redis_texts(redis_client, key_prefix, queue)
    assert {
        k: t[:200] for k, ts in texts.items() if not k.startswith(sealed_prefix) for t in ts if MARK in t
    } == {}


def test_keeping_a_signature_parameter_is_refused_at_start(tmp_path: Path) -> None:
    from producers.sources import open_source
    from workers.config import Settings

    manifest = tmp_path / "m.txt"
    manifest.write_text("https://h/x.jpg?sig=1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="CARNUMBER_KEEP_QUERY_PARAMS: sig"):
        list(open_source(str(manifest), Settings(keep_query_params="sig")))
