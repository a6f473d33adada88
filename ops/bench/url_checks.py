"""The local image checks in ``Url`` mode: extra bytes read per object, and the resolve rate with
and without them, against moto's S3 server on loopback.

The prefix holds ``--objects`` objects: the real scene photos (> 32 KB) of
``../shared/eval/plates/images`` (cycled; generated 640×480 JPEGs when that folder is absent)
and, one in ``--bad-every``, an
object of the bad-input corpus (PDF named ``.jpg``, 10 px PNG, empty, truncated PNG, 520×10,
1040×20, text named ``.jpg``). Then, over the same listing, in chunks of 200 on the resolver's
8 threads:

``head``    what ``Url`` mode did before: HEAD (size) + presign, no image checks (8 threads);
``checks``  what it does now: :func:`workers.storage.resolver.precheck_object` (a ranged read
            of the first 8 KiB, of the last 2 KiB when the object is longer, more only when
            those cannot decide) + presign, through :class:`workers.storage.Resolver`.

Reported: objects/s for the listing alone and for each mode, bytes read per object (mean, p50,
max) and requests per object, and how many objects each mode refused locally. moto runs in this
process (its own threads), so its CPU competes with the client's: the rates are a floor.

    python ops/bench/url_checks.py                  # 2,000 objects
    python ops/bench/url_checks.py --objects 500
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = ROOT.parent / "shared" / "eval" / "plates" / "images"
BUCKET = "cn-url-checks-bench"
CHUNK = 200


def _png(w: int, h: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (w, h), os.urandom(w * h * 3)).save(buf, format="PNG")
    return buf.getvalue()


def corpus() -> tuple[list[bytes], list[bytes]]:
    from PIL import Image

    if PHOTOS.is_dir():
        # Scene photos only (> 32 KB): the set also holds plate crops of a few KB, which fit in
        # one head read and would flatter the figure.
        good = [
            p.read_bytes()
            for p in sorted(PHOTOS.iterdir())
            if p.suffix.lower() == ".jpg" and p.stat().st_size > 32_000
        ]
    else:
        good = []
        for _ in range(20):
            buf = io.BytesIO()
            Image.frombytes("RGB", (640, 480), os.urandom(640 * 480 * 3)).save(buf, "JPEG")
            good.append(buf.getvalue())
    png = _png(300, 200)
    bad = [
        b"%PDF-1.4\n" + b"0" * 30_000,
        _png(10, 10),
        b"",
        png[: len(png) // 2],
        _png(520, 10),
        _png(1040, 20),
        b"plate list\n" * 3000,
    ]
    return good, bad


class Counting:
    """An ObjectStore wrapper that counts requests and object bytes read."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.scheme = store.scheme
        self.requests = 0
        self.bytes: dict[str, int] = {}

    def head(self, bucket: str, key: str) -> int:
        self.requests += 1
        return int(self.store.head(bucket, key))

    def get(self, bucket: str, key: str, max_bytes: int, **kw: Any) -> bytes:
        self.requests += 1
        data: bytes = self.store.get(bucket, key, max_bytes, **kw)
        self.bytes[key] = self.bytes.get(key, 0) + len(data)
        return data

    def get_range(self, bucket: str, key: str, offset: int, length: int, **kw: Any) -> Any:
        self.requests += 1
        got = self.store.get_range(bucket, key, offset, length, **kw)
        self.bytes[key] = self.bytes.get(key, 0) + len(got.data)
        return got

    def etag(self, bucket: str, key: str) -> Any:
        self.requests += 1
        return self.store.etag(bucket, key)

    def presign(self, bucket: str, key: str, ttl_s: int, **kw: Any) -> str:
        return str(self.store.presign(bucket, key, ttl_s, **kw))

    def iter_objects(self, bucket: str, prefix: str) -> Any:
        return self.store.iter_objects(bucket, prefix)


def run(objects: int, bad_every: int) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.s3_server import moto_s3, s3_client

    from workers.config import Settings
    from workers.errors import CarnumberError
    from workers.message import ImageRef
    from workers.storage import Resolver
    from workers.storage.s3 import S3Store
    from workers.storage.uris import object_uri

    good, bad = corpus()
    with moto_s3() as endpoint:
        client = s3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        total_bytes = 0
        for i in range(objects):
            data = bad[(i // bad_every) % len(bad)] if i % bad_every == 0 else good[i % len(good)]
            client.put_object(Bucket=BUCKET, Key=f"cam/{i:07d}.jpg", Body=data)
            total_bytes += len(data)
        settings = Settings(s3_endpoint_url=endpoint, s3_mode="url")
        store = S3Store(settings)

        started = time.perf_counter()
        keys = [o.key for o in store.iter_objects(BUCKET, "cam/")]
        listing_s = time.perf_counter() - started

        counting = Counting(store)

        def old_url_mode(key: str) -> bool:
            """HEAD + presign, as Url mode did before: True when refused (0 bytes)."""
            try:
                if counting.head(BUCKET, key) == 0:
                    return True
                counting.presign(BUCKET, key, 900)
            except CarnumberError:
                return True
            return False

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:  # the resolver's own thread count
            refused_head = sum(pool.map(old_url_mode, keys))
        head_s = time.perf_counter() - started
        head_requests = counting.requests

        counting = Counting(store)
        resolver = Resolver(settings, stores={"s3": counting})  # type: ignore[dict-item]
        started = time.perf_counter()
        refused = 0
        for k in range(0, len(keys), CHUNK):
            refs = [ImageRef(object_uri("s3", BUCKET, key)) for key in keys[k : k + CHUNK]]
            refused += sum(isinstance(r, CarnumberError) for r in resolver.resolve_many(refs))
        checks_s = time.perf_counter() - started
        resolver.close()
        # What each attempt pays to sign its own URL (local: no request), in microseconds.
        signing = []
        for key in keys[:1000]:
            t0 = time.perf_counter()
            store.presign(BUCKET, key, 75)
            signing.append((time.perf_counter() - t0) * 1e6)
    per_object = [counting.bytes.get(k, 0) for k in keys]
    return {
        "objects": len(keys),
        "mean_object_bytes": round(total_bytes / len(keys)),
        "listing_objects_per_s": round(len(keys) / listing_s),
        "head_mode_objects_per_s": round(len(keys) / head_s),
        "head_mode_requests_per_object": round(head_requests / len(keys), 2),
        "head_mode_refused": refused_head,
        "checks_objects_per_s": round(len(keys) / checks_s),
        "checks_requests_per_object": round(counting.requests / len(keys), 2),
        "checks_refused": refused,
        "checks_bytes_per_object_mean": round(statistics.fmean(per_object)),
        "checks_bytes_per_object_p50": int(statistics.median(per_object)),
        "checks_bytes_per_object_max": max(per_object),
        "checks_bytes_read_total": sum(per_object),
        "bytes_in_bucket_total": total_bytes,
        "presign_us_p50": round(statistics.median(signing), 1),
        "presign_us_p99": round(sorted(signing)[int(len(signing) * 0.99)], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--bad-every", type=int, default=10, help="one bad object in N")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run(args.objects, args.bad_every), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
