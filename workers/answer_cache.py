"""The answer cache across runs: answers by content key, in immutable sorted segments that any
worker reads with a few small ranged reads, on local disk or on an object store.

Design note: ``ops/design/sink.md`` ("Answers across runs"). The layout, beside the output::

    {output}/_answers/v1/manifest.json     {"version": 1, "segments": [{"name", "entries"}, ...]}
    {output}/_answers/v1/<seg>.idx         n + 1 records (key: u64, offset: u64), sorted by key;
                                           the last is a sentinel whose offset ends the values
    {output}/_answers/v1/<seg>.val         the values (opaque bytes), one after another
    {output}/_answers/v1/<seg>.fence       every FENCE-th key of .idx (u64): what a reader keeps

A key is the first 64 bits of the BLAKE2b digest of the content key (``workers/content.py``);
each value starts with its full content key (then a NUL, then the payload), and
:meth:`AnswerCache.lookup` checks it, so a 64-bit collision is a miss (a call), never a wrong
answer. Payloads are opaque here (the producer writes journal answers: ``producers/answer_index.py``).

A reader keeps each segment's fence, 1/16 byte per entry (3 MB for 50 million answers), and
nothing else: a lookup of one key reads one block of ``FENCE`` records (2 KB) per segment, and
its value when found; a chunk's reads go out side by side on a thread pool. Segments are never
changed: :func:`add_segment` writes a new one and then the manifest (a rename locally, one PUT
on an object store, both atomic); :func:`merge` folds some into one, a key range of at most
about ``RANGE_ENTRIES`` entries at a time, so neither holds more than one batch or one range.
A reader that meets a segment merged away meanwhile reloads the manifest. Two writers at once
(two producers on one output) can lose each other's newest segment: those answers are then not
found, and paid for again, never wrong. This module imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

__all__ = [
    "FENCE",
    "RECORD",
    "AnswerCache",
    "add_segment",
    "cache_dir",
    "clear",
    "key_of",
    "merge",
    "put_file",
    "read_manifest",
]


VERSION = 1
FENCE = 128  # records per block: a lookup reads 2 KB of index
RECORD = np.dtype([("k", "<u8"), ("o", "<u8")])
RANGE_ENTRIES = 200_000  # entries a merge holds at once (~50 MB of answers)
_SENTINEL = np.iinfo(np.uint64).max


class Output(Protocol):
    """Where the output lives (the sink's ``Dataset``): its filesystem and root path."""

    fs: pafs.FileSystem
    root: str


def key_of(content_key: str) -> int:
    return int.from_bytes(hashlib.blake2b(content_key.encode(), digest_size=8).digest(), "big")


def cache_dir(root: str) -> str:
    return f"{root.rstrip('/')}/_answers/v{VERSION}"


# -- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    entries: int


def read_manifest(fs: pafs.FileSystem, directory: str) -> list[Segment]:
    """The segments, newest first; [] when there is no cache yet. Raises ``OSError``."""
    try:
        with fs.open_input_stream(f"{directory}/manifest.json") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return []
    if doc.get("version") != VERSION:
        return []
    return [Segment(str(s["name"]), int(s["entries"])) for s in doc["segments"]]


def _write_manifest(fs: pafs.FileSystem, directory: str, segments: Sequence[Segment]) -> None:
    doc = {"version": VERSION, "segments": [{"name": s.name, "entries": s.entries} for s in segments]}
    put_file(fs, f"{directory}/manifest.json", json.dumps(doc).encode())


def put_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so that a reader sees the old one or the new one, never a part."""
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


# -- writing --------------------------------------------------------------------------------


class _SegmentWriter:
    """Appends (key, value) pairs in key order to a new segment's files."""

    def __init__(self, fs: pafs.FileSystem, directory: str) -> None:
        self.fs, self.directory = fs, directory
        self.name = f"seg-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        fs.create_dir(directory, recursive=True)
        self._idx = fs.open_output_stream(self._path("idx"))
        self._val = fs.open_output_stream(self._path("val"))
        self._fence: list[np.ndarray] = []
        self.entries = 0
        self._offset = 0

    def _path(self, ext: str) -> str:
        return f"{self.directory}/{self.name}.{ext}"

    def write(self, keys: np.ndarray, lengths: np.ndarray, values: bytes) -> None:
        """``keys`` sorted and above every key written before; value i is ``lengths[i]`` bytes."""
        if not len(keys):
            return
        rec = np.empty(len(keys), dtype=RECORD)
        rec["k"] = keys
        rec["o"] = np.uint64(self._offset) + _starts(lengths)
        first = (-self.entries) % FENCE  # the positions that are multiples of FENCE
        self._fence.append(keys[first::FENCE].astype(np.uint64))
        self._idx.write(rec.tobytes())
        self._val.write(values)
        self.entries += len(keys)
        self._offset += len(values)

    def close(self) -> Segment:
        end = np.array([(_SENTINEL, self._offset)], dtype=RECORD)
        self._idx.write(end.tobytes())
        self._idx.close()
        self._val.close()
        fence = np.concatenate(self._fence) if self._fence else np.zeros(0, np.uint64)
        put_file(self.fs, self._path("fence"), fence.astype("<u8").tobytes())
        return Segment(self.name, self.entries)

    def abort(self) -> None:
        for stream in (self._idx, self._val):
            with contextlib.suppress(Exception):
                stream.close()
        _remove(self.fs, self.directory, self.name)


def clear(fs: pafs.FileSystem, directory: str) -> None:
    """Forget every answer: an empty manifest first (readers stop using the segments), then the
    segments' files."""
    old = read_manifest(fs, directory)
    fs.create_dir(directory, recursive=True)
    _write_manifest(fs, directory, [])
    for s in old:
        _remove(fs, directory, s.name)


def _remove(fs: pafs.FileSystem, directory: str, name: str) -> None:
    for ext in ("idx", "val", "fence"):
        with contextlib.suppress(FileNotFoundError, OSError):
            fs.delete_file(f"{directory}/{name}.{ext}")


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Where each of consecutive values of ``lengths`` bytes starts."""
    return np.concatenate((np.zeros(1, np.uint64), np.cumsum(lengths[:-1], dtype=np.uint64)))


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Positions that sort ``keys``, keeping the first of equal keys."""
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    keep = np.ones(len(sk), dtype=bool)
    keep[1:] = sk[1:] != sk[:-1]
    return order[keep]


def add_segment(fs: pafs.FileSystem, directory: str, entries: Sequence[tuple[str, bytes]]) -> Segment | None:
    """Write ``(content key, payload)`` pairs as a new segment and publish it (first of equal
    keys kept). Returns it, or None when ``entries`` is empty. Raises ``OSError``."""
    if not entries:
        return None
    keys = np.fromiter((key_of(k) for k, _ in entries), dtype=np.uint64, count=len(entries))
    order = _sorted_unique(keys)
    values = [entries[int(i)][0].encode() + b"\0" + entries[int(i)][1] for i in order]
    writer = _SegmentWriter(fs, directory)
    try:
        writer.write(keys[order], np.fromiter(map(len, values), np.uint64, len(values)), b"".join(values))
        segment = writer.close()
    except BaseException:
        writer.abort()
        raise
    _write_manifest(fs, directory, [segment, *read_manifest(fs, directory)])
    return segment


def merge(fs: pafs.FileSystem, directory: str, *, max_segments: int = 4) -> bool:
    """When there are more than ``max_segments`` segments, fold the newest ones into one,
    size-tiered: from the newest back, while the next older one is no bigger than those taken
    together (or too many would be left). Like a binary counter, each answer is rewritten
    O(log n) times and an old big segment stays as it is. Of equal keys the one from the older
    segment stays (the run that paid first). Returns whether it merged. Raises ``OSError``."""
    segments = read_manifest(fs, directory)  # newest first
    if len(segments) <= max_segments:
        return False
    take, total = 1, segments[0].entries
    while take < len(segments) and (segments[take].entries <= total or len(segments) - take >= max_segments):
        total += segments[take].entries
        take += 1
    chosen, kept = segments[:take], segments[take:]
    readers = [_SegmentReader(fs, directory, s) for s in reversed(chosen)]  # oldest first
    writer = _SegmentWriter(fs, directory)
    try:
        # Key ranges of about RANGE_ENTRIES each (a power of two, at most 256): memory is one
        # range, and a small cache is not read in 256 tiny pieces.
        bits = min(8, max(0, math.ceil(math.log2(max(1, total) / RANGE_ENTRIES))))
        starts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits) if bits else [0]
        edges: list[int | None] = [int(e) for e in starts] + [None]
        for lo, hi in itertools.pairwise(edges):
            parts = [r.range(lo, hi) for r in readers]
            keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint64)
            if not len(keys):
                continue
            lengths = np.concatenate([p[1] for p in parts])
            starts = _starts(lengths)
            blob = b"".join(p[2] for p in parts)
            order = _sorted_unique(keys)
            out_lengths = lengths[order]
            writer.write(
                keys[order],
                out_lengths,
                b"".join(blob[int(starts[i]) : int(starts[i] + lengths[i])] for i in order),
            )
        merged = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        for r in readers:
            r.close()
    _write_manifest(fs, directory, [merged, *kept])
    for s in chosen:
        _remove(fs, directory, s.name)
    return True


# -- reading --------------------------------------------------------------------------------


class _SegmentReader:
    def __init__(self, fs: pafs.FileSystem, directory: str, segment: Segment) -> None:
        self.segment = segment
        base = f"{directory}/{segment.name}"
        with fs.open_input_file(f"{base}.fence") as fh:
            self.fence = np.frombuffer(fh.read(), dtype="<u8")
        self._idx = fs.open_input_file(f"{base}.idx")
        self._val = fs.open_input_file(f"{base}.val")

    def close(self) -> None:
        self._idx.close()
        self._val.close()

    def _records(self, first: int, last: int) -> np.ndarray:
        """Records ``first`` .. ``last`` inclusive (the sentinel is record ``entries``)."""
        n = last - first + 1
        raw = self._idx.read_at(n * RECORD.itemsize, first * RECORD.itemsize)
        return np.frombuffer(raw, dtype=RECORD)

    def _bounds(self, key: int) -> tuple[int, int]:
        """The record positions [first, last] (last: one past, for the end offset) of the block
        that holds ``key`` if present."""
        block = int(np.searchsorted(self.fence, np.uint64(key), side="right")) - 1
        block = max(block, 0)
        first = block * FENCE
        return first, min(first + FENCE, self.segment.entries)

    def find(self, keys: Iterable[int], pool: ThreadPoolExecutor) -> dict[int, bytes]:
        """Values of the ``keys`` present: one read per block touched, then one per value, each
        batch of reads side by side on ``pool`` (on an object store every read is a request)."""
        if not self.segment.entries:
            return {}
        blocks: dict[tuple[int, int], list[int]] = {}
        for k in keys:
            blocks.setdefault(self._bounds(k), []).append(k)
        found: dict[int, tuple[int, int]] = {}
        for (_, wanted), rec in zip(
            blocks.items(), pool.map(lambda b: self._records(*b), blocks), strict=True
        ):
            ks = rec["k"][:-1]
            for k in wanted:
                j = int(np.searchsorted(ks, np.uint64(k)))
                if j < len(ks) and int(ks[j]) == k:
                    found[k] = (int(rec["o"][j]), int(rec["o"][j + 1]))
        spans = list(found.values())
        values = pool.map(lambda span: bytes(self._val.read_at(span[1] - span[0], span[0])), spans)
        return dict(zip(found, values, strict=True))

    def range(self, lo: int, hi: int | None) -> tuple[np.ndarray, np.ndarray, bytes]:
        """Every key in [lo, hi) with its value lengths and the values, in key order."""
        n = self.segment.entries
        if not n:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64), b""
        start = self._position(lo)
        end = n if hi is None else self._position(hi)
        if end <= start:
            return np.zeros(0, np.uint64), np.zeros(0, np.uint64), b""
        rec = self._records(start, end)
        offsets = rec["o"].astype(np.uint64)
        blob = bytes(self._val.read_at(int(offsets[-1] - offsets[0]), int(offsets[0])))
        return rec["k"][:-1].copy(), np.diff(offsets), blob

    def _position(self, key: int) -> int:
        """The position of the first record with a key >= ``key``."""
        first, last = self._bounds(key)
        ks = self._records(first, last)["k"][:-1]
        return first + int(np.searchsorted(ks, np.uint64(key), side="left"))


class AnswerCache:
    """Looks answers up by content key across the cache's segments (thread-safe). The manifest
    is read again after ``refresh_s``, after :meth:`refresh`, or at once when a segment is
    gone."""

    def __init__(
        self, fs: pafs.FileSystem, directory: str, *, refresh_s: float = 60.0, threads: int = 32
    ) -> None:
        self.fs, self.directory, self.refresh_s = fs, directory, refresh_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="answer-cache")
        self._lock = threading.Lock()
        self._readers: list[_SegmentReader] = []
        self._loaded_at: float | None = None

    @classmethod
    def beside(cls, dataset: Output, **kw: Any) -> AnswerCache:
        """The cache beside an output dataset (``workers.sink.dataset.open_dataset``)."""
        return cls(dataset.fs, cache_dir(dataset.root), **kw)

    def entries(self) -> int:
        return sum(r.segment.entries for r in self._current())

    def lookup(self, content_keys: Sequence[str]) -> dict[str, bytes]:
        """The payloads of the ``content_keys`` found. Raises ``OSError`` when the store fails
        (twice, when the first failure was a segment merged away meanwhile)."""
        if not content_keys:
            return {}
        try:
            return self._lookup(content_keys)
        except (OSError, pa.ArrowInvalid):
            # A segment merged away since the manifest was read (an object store says so with
            # a plain error, not FileNotFoundError): read the manifest again and try once more.
            self._reload()
            return self._lookup(content_keys)

    def _lookup(self, content_keys: Sequence[str]) -> dict[str, bytes]:
        wanted = {key_of(c): c for c in content_keys}
        out: dict[str, bytes] = {}
        for reader in self._current():
            if not wanted:
                break
            for k, value in reader.find(wanted, self._pool).items():
                head, _, payload = value.partition(b"\0")
                if head == wanted[k].encode():  # else a 64-bit collision: not this picture
                    out[wanted.pop(k)] = payload
        return out

    def _current(self) -> list[_SegmentReader]:
        with self._lock:
            if self._loaded_at is None or time.monotonic() - self._loaded_at > self.refresh_s:
                self._load()
            return self._readers

    def refresh(self) -> None:
        """Read the manifest again at the next lookup (a new run: the producer has just
        brought the cache up to date)."""
        with self._lock:
            self._loaded_at = None

    def _reload(self) -> None:
        with self._lock:
            self._load()

    def _load(self) -> None:
        segments = read_manifest(self.fs, self.directory)
        by_name = {r.segment.name: r for r in self._readers}
        readers = [by_name.pop(s.name, None) or _SegmentReader(self.fs, self.directory, s) for s in segments]
        for stale in by_name.values():
            stale.close()
        self._readers = readers
        self._loaded_at = time.monotonic()

    def close(self) -> None:
        with self._lock:
            for r in self._readers:
                r.close()
            self._readers, self._loaded_at = [], None
        self._pool.shutdown(wait=False)

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
