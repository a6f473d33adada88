"""A small Alibaba Cloud OSS server on loopback, speaking the REST calls oss2 makes for us.

Covered, written from OSS's public API reference (not from oss2's code):

* ``GET /{bucket}/{key}`` (GetObject) and ``HEAD /{bucket}/{key}`` (HeadObject), path-style
  (oss2 uses path style for an IP endpoint), with ``Content-Length``, ``Last-Modified``,
  ``ETag``, ``x-oss-request-id``;
* ``GET /{bucket}/?list-type=2`` (ListObjectsV2: ``prefix``, ``max-keys``,
  ``continuation-token``, ``start-after``, ``encoding-type=url``) and ``GET /{bucket}/``
  (ListObjects v1: ``prefix``, ``marker``, ``max-keys``), keys in UTF-8 byte order;
* errors as OSS sends them: XML ``<Error>`` bodies (``NoSuchKey``, ``NoSuchBucket``,
  ``AccessDenied``, ``SignatureDoesNotMatch``, ``InvalidAccessKeyId``) and, for HEAD, the same
  document base64-encoded in ``x-oss-err``;
* signature V1 verification: ``Authorization: OSS id:sig`` headers (HMAC-SHA1 over verb,
  Content-MD5, Content-Type, Date, ``x-oss-*`` headers and the canonical resource with its
  sub-resources) and signed URLs (``OSSAccessKeyId``, ``Expires``, ``Signature``, optional
  ``security-token``), expiry included; an STS token is checked when one is configured.

* ``Range: bytes=a-b`` / ``a-`` / ``-n`` on GetObject: 206 with ``Content-Range``; an invalid
  range (start past the end, an empty object) answers 200 with the whole object, as OSS does,
  or 416 with ``Content-Range: bytes */size`` under ``x-oss-range-behavior: standard``;
* ``If-Match`` on GetObject and HeadObject: 412 ``PreconditionFailed`` when the ETag differs.

Not covered: V4 signatures, CRC64 headers, multiple ranges, delimiters/common prefixes, writes.
``bytes_sent`` counts object bytes sent in GetObject bodies (to measure ranged reads).
``fail_next`` makes the next N requests answer 503 (to test retry/transport translation);
``on_signed_get`` runs before a GET by signed URL (the service's fetch) is served; objects in
``denied`` answer 403 AccessDenied (an object ACL); changing ``access_key_secret`` revokes a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

__all__ = ["FakeOss", "StoredObject"]

_SUBRESOURCES = frozenset(
    [
        "acl",
        "uploads",
        "location",
        "cors",
        "logging",
        "website",
        "referer",
        "lifecycle",
        "delete",
        "append",
        "tagging",
        "objectMeta",
        "uploadId",
        "partNumber",
        "security-token",
        "position",
        "img",
        "style",
        "styleName",
        "replication",
        "replicationProgress",
        "replicationLocation",
        "cname",
        "bucketInfo",
        "comp",
        "qos",
        "live",
        "status",
        "vod",
        "startTime",
        "endTime",
        "symlink",
        "x-oss-process",
        "response-content-type",
        "response-content-language",
        "response-expires",
        "response-cache-control",
        "response-content-disposition",
        "response-content-encoding",
        "restore",
        "callback",
        "callback-var",
        "continuation-token",
        "versionId",
        "versioning",
        "versions",
    ]
)


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up mid-answer (a size check that reads the headers only) is normal
    here: no traceback on the terminal for it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@dataclass
class StoredObject:
    data: bytes
    modified: float  # epoch seconds

    @property
    def etag(self) -> str:
        return hashlib.md5(self.data).hexdigest().upper()


class FakeOss:
    """``with FakeOss() as oss: oss.put("bkt", "a.jpg", b"..."); oss.endpoint`` → http://127.0.0.1:port"""

    def __init__(
        self,
        access_key_id: str = "fake-oss-id",
        access_key_secret: str = "fake-oss-secret",
        security_token: str | None = None,
    ) -> None:
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.security_token = security_token
        self.buckets: dict[str, dict[str, StoredObject]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) without query strings
        self.fail_next = 0
        self.bytes_sent = 0
        # Called as (bucket, key) before a GET by signed URL is served: lets a test overwrite an
        # object between our checks and the service's fetch.
        self.on_signed_get: Callable[[str, str], None] | None = None
        self.denied: set[tuple[str, str]] = set()  # (bucket, key) answered 403 AccessDenied
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- data -------------------------------------------------------------------------------

    def create_bucket(self, bucket: str) -> None:
        self.buckets.setdefault(bucket, {})

    def put(self, bucket: str, key: str, data: bytes, modified: float | None = None) -> None:
        self.buckets.setdefault(bucket, {})[key] = StoredObject(data, modified or time.time())

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeOss:
        server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOss:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- signature V1 -----------------------------------------------------------------------

    def expected_signature(self, method: str, headers: dict[str, str], resource: str, date: str) -> str:
        oss_headers = "".join(
            f"{k}:{v.strip()}\n"
            for k, v in sorted((k.lower(), v) for k, v in headers.items())
            if k.startswith("x-oss-")
        )
        to_sign = "\n".join(
            [
                method,
                headers.get("content-md5", ""),
                headers.get("content-type", ""),
                date,
                oss_headers + resource,
            ]
        )
        mac = hmac.new(self.access_key_secret.encode(), to_sign.encode("utf-8"), hashlib.sha1)
        return base64.b64encode(mac.digest()).decode()


def _canonical_resource(bucket: str, key: str, params: list[tuple[str, str]]) -> str:
    subs = sorted((k, v) for k, v in params if k in _SUBRESOURCES)
    query = "&".join(f"{k}={v}" if v else k for k, v in subs)
    return f"/{bucket}/{key}" + (f"?{query}" if query else "")


def _error_xml(code: str, message: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
        f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        f"<RequestId>{request_id}</RequestId><HostId>127.0.0.1</HostId></Error>"
    ).encode()


def _byte_range(spec: str | None, size: int) -> tuple[int, int] | str | None:
    """``bytes=a-b``, ``a-`` or ``-n`` → (first, last) inclusive, clipped to the object;
    ``"invalid"`` when it cannot be satisfied; None without a (parsable) Range header."""
    if not spec or not spec.startswith("bytes=") or "," in spec:
        return None
    first, sep, last = spec[6:].strip().partition("-")
    if not sep or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # a suffix: the last n bytes
        n = int(last)
        return (max(0, size - n), size - 1) if n > 0 and size > 0 else "invalid"
    start = int(first)
    end = min(int(last), size - 1) if last.isdigit() else size - 1
    if start >= size or (last.isdigit() and int(last) < start):
        return "invalid"
    return start, end


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _handler_for(oss: FakeOss) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        # -- plumbing -------------------------------------------------------------------

        def _send(
            self, status: int, body: bytes, headers: dict[str, str] | None = None, head: bool = False
        ) -> None:
            self.send_response(status)
            rid = uuid.uuid4().hex.upper()[:24]
            self.send_header("x-oss-request-id", rid)
            self.send_header("Server", "FakeOss")
            self.send_header("Date", formatdate(usegmt=True))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            doc = _error_xml(code, message, uuid.uuid4().hex.upper()[:24])
            if head:
                # HEAD answers have no body: OSS puts the error document in x-oss-err.
                self._send(status, b"", {"x-oss-err": base64.b64encode(doc).decode()}, head=True)
            else:
                self._send(status, doc, {"Content-Type": "application/xml"})

        # -- auth -------------------------------------------------------------------------

        def _authorised(self, bucket: str, key: str, params: list[tuple[str, str]], head: bool) -> bool:
            method = "HEAD" if head else "GET"
            headers = {k.lower(): v for k, v in self.headers.items()}
            query = dict(params)
            resource = _canonical_resource(bucket, key, params)
            auth = headers.get("authorization", "")
            if auth.startswith("OSS "):
                key_id, _, signature = auth[4:].partition(":")
                date = headers.get("date", "")
                token = headers.get("x-oss-security-token")
                try:
                    skew = abs(time.time() - parsedate_to_datetime(date).timestamp())
                except (TypeError, ValueError):
                    skew = float("inf")
                if skew > 900:
                    self._error(403, "RequestTimeTooSkewed", "bad Date", head)
                    return False
            elif "Signature" in query:
                key_id, signature = query.get("OSSAccessKeyId", ""), query["Signature"]
                date = query.get("Expires", "")
                token = query.get("security-token")
                if not date.isdigit() or int(date) < time.time():
                    self._error(403, "AccessDenied", "Request has expired.", head)
                    return False
            else:
                self._error(403, "AccessDenied", "You have no right to access this object.", head)
                return False
            if key_id != oss.access_key_id:
                self._error(403, "InvalidAccessKeyId", "The OSS Access Key Id does not exist.", head)
                return False
            if oss.security_token is not None and token != oss.security_token:
                self._error(403, "InvalidSecurityToken", "The security token is invalid.", head)
                return False
            expected = oss.expected_signature(method, headers, resource, date)
            if not hmac.compare_digest(expected, signature):
                self._error(403, "SignatureDoesNotMatch", "The request signature does not match.", head)
                return False
            return True

        # -- routes -----------------------------------------------------------------------

        def _serve(self, head: bool) -> None:
            parts = urlsplit(self.path)
            path = unquote(parts.path)
            params = parse_qsl(parts.query, keep_blank_values=True)
            bucket, _, key = path.lstrip("/").partition("/")
            with oss._lock:
                oss.requests.append(("HEAD" if head else "GET", path))
                if oss.fail_next > 0:
                    oss.fail_next -= 1
                    self._error(503, "ServiceUnavailable", "try again", head)
                    return
            if not self._authorised(bucket, key, params, head):
                return
            if (bucket, key) in oss.denied:  # an object's ACL or a policy on its prefix
                self._error(403, "AccessDenied", "You have no right to access this object.", head)
                return
            hook = oss.on_signed_get
            if hook is not None and not head and "Signature" in dict(params):
                hook(bucket, key)
            objects = oss.buckets.get(bucket)
            if objects is None:
                self._error(404, "NoSuchBucket", "The specified bucket does not exist.", head)
                return
            if not key:
                self._list(bucket, objects, dict(params))
                return
            obj = objects.get(key)
            if obj is None:
                self._error(404, "NoSuchKey", "The specified key does not exist.", head)
                return
            wanted_etag = self.headers.get("If-Match")
            if wanted_etag is not None and wanted_etag.strip().strip('"') != obj.etag:
                self._error(412, "PreconditionFailed", "A pre-condition did not hold.", head)
                return
            headers = {
                "Content-Type": "application/octet-stream",
                "ETag": f'"{obj.etag}"',
                "Last-Modified": formatdate(obj.modified, usegmt=True),
                "x-oss-object-type": "Normal",
                "x-oss-storage-class": "Standard",
            }
            status, body = 200, obj.data
            wanted = None if head else _byte_range(self.headers.get("Range"), len(obj.data))
            if wanted == "invalid":
                if self.headers.get("x-oss-range-behavior", "").lower() == "standard":
                    self._send(416, b"", {"Content-Range": f"bytes */{len(obj.data)}"})
                    return
            elif wanted is not None:
                start, end = wanted
                status, body = 206, obj.data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(obj.data)}"
            self.send_response(status)
            self.send_header("x-oss-request-id", uuid.uuid4().hex.upper()[:24])
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                with oss._lock:
                    oss.bytes_sent += len(body)
                self.wfile.write(body)

        def _list(self, bucket: str, objects: dict[str, StoredObject], q: dict[str, str]) -> None:
            v2 = q.get("list-type") == "2"
            prefix = q.get("prefix", "")
            max_keys = min(int(q.get("max-keys", "100") or 100), 1000)
            encode = q.get("encoding-type") == "url"
            if v2:
                token = q.get("continuation-token", "")
                after = base64.urlsafe_b64decode(token).decode() if token else q.get("start-after", "")
            else:
                after = q.get("marker", "")
            keys = sorted((k for k in objects if k.startswith(prefix)), key=lambda k: k.encode())
            keys = [k for k in keys if k.encode() > after.encode()]
            page, truncated = keys[:max_keys], len(keys) > max_keys

            def enc(s: str) -> str:
                return escape(quote(s, safe="") if encode else s)

            out = [
                '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult>',
                f"<Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix>",
                f"<MaxKeys>{max_keys}</MaxKeys><Delimiter></Delimiter>",
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
            ]
            if encode:
                out.append("<EncodingType>url</EncodingType>")
            if v2:
                out.append(f"<KeyCount>{len(page)}</KeyCount>")
                if truncated:
                    nxt = base64.urlsafe_b64encode(page[-1].encode()).decode()
                    out.append(f"<NextContinuationToken>{enc(nxt)}</NextContinuationToken>")
            else:
                out.append(f"<Marker>{enc(after)}</Marker>")
                if truncated:
                    out.append(f"<NextMarker>{enc(page[-1])}</NextMarker>")
            for k in page:
                obj = objects[k]
                out.append(
                    f"<Contents><Key>{enc(k)}</Key><LastModified>{_iso(obj.modified)}"
                    f'</LastModified><ETag>"{obj.etag}"</ETag><Type>Normal</Type>'
                    f"<Size>{len(obj.data)}</Size><StorageClass>Standard</StorageClass></Contents>"
                )
            out.append("</ListBucketResult>")
            self._send(200, "".join(out).encode("utf-8"), {"Content-Type": "application/xml"})

    return Handler
