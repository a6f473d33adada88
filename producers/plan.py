"""``carnumber plan``: the bill before the night, from the listing and the local checks alone.

::

    items = plan_items("s3://cams/2026-11-23/", settings)        # (ref, what the listing said)
    report = make_plan(items, settings, ledger=Ledger.open(settings.output, exclude_run="tonight"))
    bill(report, settings, quota_view(settings, redis_client))     # time, windows, cost, fits

Per image, in the order a real run meets it (the producer first, then a worker):

1. **answered in an earlier run** (the ledger, by image id; ``--reprocess`` turns it off): the
   producer drops it, nothing is read;
2. **rejected by the local checks** (the rules of :mod:`workers.imagecheck`, counted by rule with
   a few examples; a missing file or object counts under ``input.unreadable``): read exactly as
   a worker reads it: local files and archive members whole, objects in ``bytes`` mode whole,
   objects in ``url`` mode by their listed size and ranged reads of the head and tail
   (:func:`workers.storage.resolver.precheck_object`);
3. **a duplicate by content** of an image met before, with the content key a worker gives it
   (:mod:`workers.content`): SHA-256 of the bytes where they are read whole; for objects in
   ``url`` mode the store's ETag with the size. An ETag is the MD5 of the bytes only for a
   single-part upload without SSE-KMS: the same picture uploaded multipart, with other part
   sizes, or under KMS has another ETag, so such copies are *missed* (counted as calls), never
   wrongly merged. Keys of different kinds never match each
   other (a local file and an object of the same bytes are two calls here). Images that are not
   read (``http(s)`` URLs, ``listing_only``) are keyed by their source;
4. **answered in an earlier run by content** (the answer cache across runs,
   ``workers/answer_cache.py``; ``--reprocess`` turns it off): the first copy of a picture the
   cache knows, wherever it has moved; a worker answers it from the cache (counted in
   ``answered_earlier`` too);
5. everything else is a **call**.

Memory is flat in the number of images: content keys go into a temporary on-disk SQLite table
(:class:`DigestSet`), rules keep counters and at most :data:`EXAMPLES` examples, the ledger is a
memory map, the answer cache is read a block at a time. Nothing here calls the API or writes to Redis.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from producers.sources import Filter, object_prefix, open_source
from producers.sources.listing import iter_listed_objects
from producers.sources.seen import DigestSet
from workers import content
from workers.config import Settings
from workers.errors import CarnumberError, ImageRejected, InputError, TransportError
from workers.imagecheck import MAX_BYTES, check_image, check_parts, check_url
from workers.message import ImageRef
from workers.storage.archives import ArchiveReader
from workers.storage.objects import ObjectInfo, ObjectStore, RangeRead, store_for
from workers.storage.resolver import precheck_object
from workers.storage.uris import Location, parse_uri

__all__ = [
    "EXAMPLES",
    "DigestSet",
    "PlanReport",
    "QuotaView",
    "bill",
    "make_plan",
    "plan_items",
    "quota_view",
]

EXAMPLES = 3  # examples kept per rule
UNREADABLE = "input.unreadable"  # a missing/unreadable file or object: a failed row, no call
UNREACHABLE = "storage.unreachable"  # the store did not answer: a real run retries it

Item = tuple[ImageRef, ObjectInfo | None]


class Ledger(Protocol):
    def answered(self, image_ids: Sequence[str]) -> set[str]: ...


class Answers(Protocol):
    def lookup(self, content_keys: Sequence[str]) -> dict[str, bytes]: ...


@dataclass(slots=True)
class QuotaView:
    """The account's quota as Redis has it now: ``limit`` calls per ``window`` (``day`` or
    ``total``; ``limit`` None: no quota), ``used`` in the current window, ``left`` (None when
    unknown: Redis unreachable), ``resets_at`` (ISO-8601 UTC, None for ``total``)."""

    limit: int | None
    window: str
    used: int | None = None
    left: int | None = None
    resets_at: str | None = None
    error: str | None = None


@dataclass(slots=True)
class PlanReport:
    """What :func:`make_plan` found and :func:`bill` priced. Counts are images; times seconds."""

    source: str
    run_id: str | None = None
    listed: int = 0
    answered_earlier: int = 0
    answered_earlier_by_content: int = 0  # of those: moved or copied pictures (the answer cache)
    rejected: int = 0
    rejected_by_rule: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    duplicates: int = 0
    duplicates_by_key: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    bytes_read: int = 0
    scan_s: float = 0.0
    # the bill (filled by bill())
    qps: float = 0.0
    calls_per_s: float | None = None  # what the limiter paces to: qps / (1 + guard)
    call_time_s: float | None = None
    quota: QuotaView | None = None
    quota_windows: int | None = None  # windows (UTC days, nights) the calls span
    fits: bool = True
    verdict: str = ""
    price_per_1000_calls: float | None = None
    cost: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_items(
    uri: str,
    settings: Settings,
    *,
    glob: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    on_skip: Callable[[InputError], None] | None = None,
    store: ObjectStore | None = None,
) -> Iterator[Item]:
    """The source's refs in enqueue order, each with what an object-store listing said of it
    (size, ETag; None for every other source). Same forms, filters and raises as
    :func:`producers.sources.open_source`."""
    if (prefix_of := object_prefix(uri)) is not None:
        scheme, bucket, prefix = prefix_of
        chosen = store or store_for(scheme, settings)
        return iter_listed_objects(chosen, bucket, prefix, Filter(glob, since, until))
    refs = open_source(uri, settings, glob=glob, since=since, until=until, on_skip=on_skip)
    return ((ref, None) for ref in refs)


def make_plan(
    items: Iterable[Item],
    settings: Settings,
    *,
    source: str = "",
    run_id: str | None = None,
    ledger: Ledger | None = None,
    answers: Answers | None = None,
    stores: dict[str, ObjectStore] | None = None,
    listing_only: bool = False,
    threads: int = 8,
    batch: int | None = None,
    on_progress: Callable[[PlanReport], None] | None = None,
    tmp_dir: str | None = None,
) -> PlanReport:
    """Walk ``items`` in batches of ``batch`` (default ``settings.chunk_size``) and count what a
    run would do with each image (see the module docstring). ``listing_only``: read no bytes
    (rules only from listed sizes; duplicates by ETag + size or source). ``on_progress`` is
    called after every batch. Raises :class:`ConfigError` (a store's library or settings
    missing); problems with single images are counted, never raised.
    """
    report = PlanReport(source=source, run_id=run_id)
    checker = _Checker(settings, dict(stores or {}), listing_only, threads)
    started = time.monotonic()
    rules: Counter[str] = Counter()
    dup_kinds: Counter[str] = Counter()
    try:
        with DigestSet(tmp_dir) as seen:
            for chunk in _batches(items, batch or settings.chunk_size):
                report.listed += len(chunk)
                if ledger is not None:
                    answered = ledger.answered([ref.image_id for ref, _ in chunk])
                    if answered:
                        report.answered_earlier += sum(r.image_id in answered for r, _ in chunk)
                        chunk = [it for it in chunk if it[0].image_id not in answered]
                first_seen: list[str] = []
                for (ref, _), (rule, key, read) in zip(chunk, checker.check_many(chunk), strict=True):
                    report.bytes_read += read
                    if rule is not None:
                        rules[rule] += 1
                        examples = report.examples.setdefault(rule, [])
                        if len(examples) < EXAMPLES:
                            examples.append(ref.source)
                        continue
                    kind, _, _ = key.partition(b":")
                    if not seen.add(key):
                        dup_kinds[kind.decode()] += 1
                        continue
                    if kind in _CONTENT_KINDS:
                        first_seen.append(key.decode())
                    report.calls += 1
                if answers is not None and first_seen:
                    # Pictures the answer cache knows: a worker answers them from it, no call.
                    found = len(answers.lookup(first_seen))
                    report.calls -= found
                    report.answered_earlier += found
                    report.answered_earlier_by_content += found
                report.rejected = sum(rules.values())
                report.rejected_by_rule = dict(rules.most_common())
                report.duplicates = sum(dup_kinds.values())
                report.duplicates_by_key = dict(dup_kinds)
                report.scan_s = round(time.monotonic() - started, 3)
                if on_progress is not None:
                    on_progress(report)
    finally:
        checker.close()
    report.scan_s = round(time.monotonic() - started, 3)
    return report


def quota_view(settings: Settings, redis_url: str | None = None) -> QuotaView:
    """The quota of the account's limit group as counted in Redis now (``redis_url``, default
    ``settings.broker_url``). Never raises for Redis trouble: ``error`` says what went wrong and
    ``left`` stays None. Raises :class:`ConfigError` only when a quota is set but neither
    ``CARNUMBER_ACCOUNT`` nor an AccessKeyId names the account."""
    view = QuotaView(limit=settings.quota, window=settings.quota_window)
    if settings.quota is None:
        return view
    from workers.ratelimit import from_settings
    from workers.redis_connect import async_client

    settings.limit_group()  # ConfigError before touching Redis

    async def read() -> tuple[int, int | None]:
        client = async_client(
            redis_url or settings.broker_url,
            **settings.redis_access(),
            socket_connect_timeout=3,
            socket_timeout=5,
        )
        try:
            _, quota = from_settings(settings, client)
            return await quota.used(), await quota.remaining()
        finally:
            await client.aclose()

    try:
        view.used, view.left = asyncio.run(read())
    except Exception as exc:  # Redis down or refusing: the bill is still useful without it
        view.error = f"cannot read the quota counter ({type(exc).__name__})"
        return view
    if settings.quota_window == "day":
        tomorrow = datetime.now(UTC).date() + timedelta(days=1)
        view.resets_at = f"{tomorrow.isoformat()}T00:00:00Z"
    return view


def bill(report: PlanReport, settings: Settings, quota: QuotaView | None) -> PlanReport:
    """Price ``report``: time at the account's pace, quota windows, cost, and whether the quota
    left covers it (``fits``; ``verdict`` is the one line to print). Returns ``report``."""
    calls = report.calls
    report.qps = settings.qps
    if settings.qps > 0:
        report.calls_per_s = settings.qps / (1 + settings.rate_guard_ms / 1000)
        report.call_time_s = round(calls / report.calls_per_s, 1)
    report.quota = quota
    report.price_per_1000_calls = settings.price_per_1000_calls
    if settings.price_per_1000_calls is not None:
        report.cost = round(calls * settings.price_per_1000_calls / 1000, 4)
    days_by_time = math.ceil(report.call_time_s / 86400) if report.call_time_s else 1
    if quota is None or quota.limit is None:
        report.fits = True
        report.quota_windows = max(1, days_by_time) if calls else 0
        report.verdict = f"fits: {calls} calls, no call quota set (CARNUMBER_QUOTA)"
        return report
    left = quota.left if quota.left is not None else quota.limit
    unknown = " (quota counter unread: assumed unused)" if quota.left is None else ""
    if quota.window == "total":
        report.quota_windows = None
        report.fits = calls <= left
        report.verdict = (
            f"fits: {calls} calls of {left} left in the total quota{unknown}"
            if report.fits
            else f"does NOT fit: {calls} calls needed, {left} left in the total quota{unknown}; "
            "raise CARNUMBER_QUOTA or plan a smaller source"
        )
        return report
    by_quota = 1 if calls <= left else 1 + math.ceil((calls - left) / max(1, quota.limit))
    report.quota_windows = max(by_quota, days_by_time) if calls else 0
    report.fits = calls <= left
    if report.fits:
        report.verdict = f"fits: {calls} calls of {left} left in today's quota (UTC day){unknown}"
    else:
        report.verdict = (
            f"does NOT fit: {calls} calls needed, {left} left in today's quota (UTC day){unknown}; "
            f"at {quota.limit} a day it spans {report.quota_windows} quota windows "
            f"(the run parks at the limit; `carnumber resume` after {quota.resets_at or 'midnight UTC'})"
        )
    return report


# -- checks -----------------------------------------------------------------------------------


def _batches(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


Verdict = tuple[str | None, bytes, int]  # (rule or None, content key, bytes read)


class _Checker:
    """Reads each image as a worker would and names the rule that refuses it, or its key."""

    def __init__(
        self, settings: Settings, stores: dict[str, ObjectStore], listing_only: bool, threads: int
    ) -> None:
        self.settings = settings
        self.stores = stores
        self.listing_only = listing_only
        self.archives = ArchiveReader()
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        self.archives.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def check_many(self, chunk: Sequence[Item]) -> list[Verdict]:
        out: list[Verdict | None] = [None] * len(chunk)
        archives: dict[tuple[str, str], list[tuple[int, str]]] = {}
        objects: list[tuple[int, Location, ObjectInfo | None, str]] = []
        for i, (ref, listed) in enumerate(chunk):
            if ref.refused is not None:  # the source refused it already (a bad manifest line...)
                out[i] = (ref.refused[0], b"", 0)
                continue
            try:
                loc = parse_uri(ref.source)
            except InputError:
                out[i] = (UNREADABLE, b"", 0)
                continue
            # By id: two URLs that differ only in dropped query parameters are two images.
            source_key = b"source:" + ref.image_id.encode()
            if loc.kind == "http":
                out[i] = _rule_of(lambda loc=loc: check_url(loc.url), source_key)
            elif self.listing_only and loc.kind in ("file", "tar", "zip"):
                out[i] = (None, source_key, 0)
            elif loc.kind == "file":
                out[i] = self._file(loc.path)
            elif loc.kind in ("tar", "zip"):
                archives.setdefault((loc.kind, loc.path), []).append((i, loc.member))
            else:
                objects.append((i, loc, listed, ref.source))
        for (kind, path), members in archives.items():
            got = self.archives.read(kind, path, [m for _, m in members])
            for i, member in members:
                data = got[member]
                out[i] = _bytes_verdict(data) if isinstance(data, bytes) else _error_verdict(data)
        if objects:
            for scheme in {job[1].kind for job in objects}:
                self._store(scheme)  # ConfigError once, here
            if len(objects) == 1 or self.threads <= 1:
                results = [self._object(*job[1:]) for job in objects]
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="plan")
                results = list(self._pool.map(lambda job: self._object(*job[1:]), objects))
            for (i, *_), verdict in zip(objects, results, strict=True):
                out[i] = verdict
        assert all(v is not None for v in out)
        return out  # type: ignore[return-value]

    def _store(self, scheme: str) -> ObjectStore:
        store = self.stores.get(scheme)
        if store is None:
            store = self.stores[scheme] = store_for(scheme, self.settings)
        return store

    def _file(self, path: str) -> Verdict:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > MAX_BYTES:
                    return ("local.imageTooLarge", b"", 0)
                data = fh.read()
        except OSError:
            return (UNREADABLE, b"", 0)
        return _bytes_verdict(data)

    def _object(self, loc: Location, listed: ObjectInfo | None, source: str) -> Verdict:
        store = self._store(loc.kind)
        mode = self.settings.s3_mode if loc.kind == "s3" else self.settings.oss_mode
        if listed is not None and (listed.size == 0 or listed.size > MAX_BYTES):
            try:  # the listing decides: empty / too large, nothing read
                check_parts(b"", b"", listed.size)
            except ImageRejected as exc:
                return (exc.code, b"", 0)
        if self.listing_only:
            if listed is not None and listed.etag:
                return (None, _etag_key(listed.etag, listed.size), 0)
            return (None, b"source:" + source.encode(), 0)
        reads: list[RangeRead] = []
        try:
            if mode == "bytes":
                data = store.get(loc.bucket, loc.key, MAX_BYTES)
                return _bytes_verdict(data)
            precheck_object(store, loc.bucket, loc.key, on_read=reads.append)
        except ImageRejected as exc:
            return (exc.code, b"", sum(len(r.data) for r in reads))
        except InputError:
            return (UNREADABLE, b"", 0)
        except TransportError:
            return (UNREACHABLE, b"", 0)
        read = sum(len(r.data) for r in reads)
        etag = (listed.etag if listed is not None else None) or (reads[0].etag if reads else None)
        size = listed.size if listed is not None else (reads[0].size if reads else 0)
        if etag:
            return (None, _etag_key(etag, size), read)
        return (None, b"source:" + source.encode(), read)


_CONTENT_KINDS = (b"sha256", b"etag")  # the keys a worker gives a picture (workers/content.py)


def _etag_key(etag: str, size: int) -> bytes:
    return str(content.of_object(etag, size)).encode()


def _bytes_verdict(data: bytes) -> Verdict:
    try:
        check_image(data)
    except ImageRejected as exc:
        return (exc.code, b"", len(data))
    return (None, content.of_bytes(data).encode(), len(data))


def _error_verdict(err: CarnumberError) -> Verdict:
    if isinstance(err, ImageRejected):
        return (err.code, b"", 0)
    if isinstance(err, TransportError):
        return (UNREACHABLE, b"", 0)
    return (UNREADABLE, b"", 0)


def _rule_of(check: Callable[[], None], key: bytes) -> Verdict:
    try:
        check()
    except ImageRejected as exc:
        return (exc.code, b"", 0)
    return (None, key, 0)
