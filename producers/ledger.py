"""The incremental ledger: which images earlier runs already answered, in bounded memory.

An image is *answered* when some output row has its ``image_id`` and status ``ok`` or
``no_plate``. The dataset (``{output}/run={run_id}/part-*.parquet`` and ``compacted-*.parquet``)
is too big to load, so :meth:`Ledger.open` keeps a compact index beside it and brings it up to
date from the files it has not seen yet::

    {output}/_ledger/v1/state.json   runs (ordinal = position) + files ingested (size, mtime_ns)
    {output}/_ledger/v1/keys.bin     one sorted, unique array of 12-byte records
                                     (key: u64, run ordinal: u32), 12 bytes per answered image
    {output}/_ledger/v1/lock         flock held while updating

A key is the first 64 bits of the image id (ids are hex SHA-256 prefixes; other ids are hashed
with BLAKE2b-64). With 50 M answered images, the chance that an unanswered image's key collides
with one of them is ~3e-12 per lookup. The run ordinal lets :meth:`answered` ignore one run
(``exclude_run``, the run being enqueued, whose own chunks must stay the same on a re-run)
without rebuilding anything.

Lookups memory-map ``keys.bin`` and binary-search it in one vectorised call (a chunk of 200 ids
touches ~200 × log2(n) / 340 pages, mostly the same top levels). An update sorts at most
``batch_entries`` new records (12 bytes each) and merges them into the file one key range
(1/256 of the keys, by top byte) at a time, writing a new file beside the old and renaming it
over: memory is the batch plus one range, never the whole index.
Files that disappeared (parts replaced by compaction) are dropped from the state; their ids stay,
since the compacted files hold the same answers. A run directory that disappeared entirely means
rows were deleted: the index is rebuilt from scratch. Writers take the lock and replace the file by
rename, so a concurrent reader keeps its consistent (older) mapping. See ops/design/sources.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.errors import ConfigError
from workers.sink.schema import STATUS_NO_PLATE, STATUS_OK

__all__ = ["RECORD", "Ledger", "LedgerStats", "dataset_files", "keys_of", "locked"]

VERSION = 1
RECORD = np.dtype([("h", "<u8"), ("r", "<u4")])
_RANGES = 256  # merge granularity: one top-byte key range at a time
_ANSWERED = pa.array([STATUS_OK, STATUS_NO_PLATE])
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def keys_of(ids: Sequence[str] | pa.Array) -> np.ndarray:
    """64-bit keys of image ids: the first 16 hex digits, or BLAKE2b-64 for any other id."""
    texts = ids.to_numpy(zero_copy_only=False) if isinstance(ids, pa.Array) else list(ids)
    n = len(texts)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    try:
        raw = np.asarray(texts, dtype="S16").view(np.uint8).reshape(n, 16)
    except UnicodeEncodeError:  # a non-ASCII id somewhere: no fast path for this batch
        return np.fromiter((_key_one(str(t)) for t in texts), dtype=np.uint64, count=n)
    nibbles = _HEX[raw]
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=n)
    bad = (nibbles == 255).any(axis=1) | (lengths < 16)
    keys = np.zeros(n, dtype=np.uint64)
    for i in range(16):
        keys = (keys << np.uint64(4)) | nibbles[:, i].astype(np.uint64)
    for i in np.nonzero(bad)[0]:
        keys[i] = _key_one(str(texts[i]))
    return keys


def _key_one(image_id: str) -> int:
    if len(image_id) >= 16:
        with contextlib.suppress(ValueError):
            if all(c in "0123456789abcdefABCDEF" for c in image_id[:16]):
                return int(image_id[:16], 16)
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(slots=True)
class LedgerStats:
    files_ingested: int = 0  # new or changed files read by this open
    rows_ingested: int = 0  # answered rows among them
    entries: int = 0  # records in the index after the update
    rebuilt: bool = False


@dataclass(slots=True)
class _State:
    runs: list[str] = field(default_factory=list)
    files: dict[str, list[int]] = field(default_factory=dict)  # relative path -> [size, mtime_ns]

    def ordinal(self, run_id: str) -> int:
        if run_id not in self.runs:
            self.runs.append(run_id)
        return self.runs.index(run_id)


class Ledger:
    """Answers "which of these ids did an earlier run answer?" from the index. Use :meth:`open`."""

    def __init__(self, index_dir: str, state: _State, exclude_run: str | None, stats: LedgerStats):
        self.index_dir = index_dir
        self.exclude_run = exclude_run
        self.stats = stats
        self._exclude = state.runs.index(exclude_run) if exclude_run in state.runs else None
        self._map: np.ndarray | None = None

    @classmethod
    def open(
        cls,
        output: str,
        exclude_run: str | None = None,
        *,
        index_dir: str | None = None,
        batch_entries: int = 4_000_000,
        rebuild: bool = False,
    ) -> Ledger:
        """Bring the index under ``output`` up to date and open it for lookups.

        ``output`` is a local directory or a pyarrow filesystem URI (``s3://bucket/out``); for a
        remote output the index lives in ``index_dir`` (default: a per-output folder under
        ``~/.cache/carnumber/ledger``). ``rebuild`` starts the index from scratch.
        Raises :class:`ConfigError` when the output cannot be listed.
        """
        try:
            fs, root = pafs.FileSystem.from_uri(output) if "://" in output else _local(output)
        except (pa.ArrowInvalid, OSError) as exc:
            raise ConfigError(f"ledger: cannot open output {output!r} ({exc})") from None
        if index_dir is None:
            if isinstance(fs, pafs.LocalFileSystem):
                index_dir = os.path.join(root, "_ledger", f"v{VERSION}")
            else:
                tag = hashlib.sha256(output.encode()).hexdigest()[:16]
                index_dir = os.path.expanduser(f"~/.cache/carnumber/ledger/{tag}/v{VERSION}")
        stats = LedgerStats()
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return cls(index_dir, _State(), exclude_run, stats)  # no output yet: nothing answered
        try:
            os.makedirs(index_dir, exist_ok=True)
            with locked(index_dir):
                state = _update(fs, root, index_dir, batch_entries, rebuild, stats)
        except PermissionError as exc:
            raise ConfigError(
                f"ledger: cannot write its index in {index_dir} ({exc.strerror}); "
                "give the producer write access there or pass index_dir"
            ) from None
        path = _keys_path(index_dir)
        stats.entries = os.path.getsize(path) // RECORD.itemsize if os.path.exists(path) else 0
        return cls(index_dir, state, exclude_run, stats)

    def answered(self, image_ids: Sequence[str]) -> set[str]:
        """The subset of ``image_ids`` answered by a run other than ``exclude_run``."""
        records = self._records()
        if not image_ids or records is None:
            return set()
        keys = keys_of(image_ids)
        h = records["h"]
        lo = np.searchsorted(h, keys, side="left")
        hi = np.searchsorted(h, keys, side="right")
        hit = hi > lo
        if self._exclude is not None:
            # One record per hit is the rule; several only when more than one run answered it.
            single = hit & (hi - lo == 1)
            ok = np.zeros(len(keys), dtype=bool)
            ok[single] = records["r"][lo[single]] != self._exclude
            for j in np.nonzero(hit & ~single)[0]:
                ok[j] = bool((records["r"][lo[j] : hi[j]] != self._exclude).any())
            hit = ok
        return {image_ids[int(j)] for j in np.nonzero(hit)[0]}

    def _records(self) -> np.ndarray | None:
        if self._map is None:
            path = _keys_path(self.index_dir)
            if os.path.exists(path) and os.path.getsize(path):
                self._map = np.memmap(path, dtype=RECORD, mode="r")
        return self._map

    def close(self) -> None:
        self._map = None  # the memmap unmaps when no longer referenced

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the update -----------------------------------------------------------------------------


def _local(output: str) -> tuple[pafs.FileSystem, str]:
    return pafs.LocalFileSystem(), os.path.abspath(output)


def _keys_path(index_dir: str) -> str:
    return os.path.join(index_dir, "keys.bin")


@contextlib.contextmanager
def locked(index_dir: str) -> Iterator[None]:
    with open(os.path.join(index_dir, "lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _load_state(index_dir: str) -> _State | None:
    try:
        with open(os.path.join(index_dir, "state.json"), encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # a damaged state: rebuild
    if doc.get("version") != VERSION:
        return None
    return _State(runs=list(doc["runs"]), files=dict(doc["files"]))


def _save_state(index_dir: str, state: _State) -> None:
    tmp = os.path.join(index_dir, "state.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"version": VERSION, "runs": state.runs, "files": state.files}, fh)
    os.replace(tmp, os.path.join(index_dir, "state.json"))


def dataset_files(fs: pafs.FileSystem, root: str) -> dict[str, tuple[str, list[int]]]:
    """``relative path -> (run_id, [size, mtime_ns])`` of every visible Parquet file."""
    out: dict[str, tuple[str, list[int]]] = {}
    for run_dir in fs.get_file_info(pafs.FileSelector(root)):
        name = run_dir.base_name
        if run_dir.type != pafs.FileType.Directory or not name.startswith("run="):
            continue
        for info in fs.get_file_info(pafs.FileSelector(run_dir.path)):
            base = info.base_name
            if info.type != pafs.FileType.File or base.startswith(".") or not base.endswith(".parquet"):
                continue
            mtime = int(info.mtime_ns or 0)
            out[f"{name}/{base}"] = (name[len("run=") :], [int(info.size or 0), mtime])
    return out


def _update(
    fs: pafs.FileSystem,
    root: str,
    index_dir: str,
    batch_entries: int,
    rebuild: bool,
    stats: LedgerStats,
) -> _State:
    files = dataset_files(fs, root)
    state = None if rebuild else _load_state(index_dir)
    present_runs = {run for run, _ in files.values()}
    if state is not None and any(r not in present_runs and _ran(state, r) for r in state.runs):
        state = None  # a whole run's output was deleted: its ids must leave the index
    if state is None:
        stats.rebuilt = True
        state = _State()
        with contextlib.suppress(FileNotFoundError):
            os.remove(_keys_path(index_dir))
    todo = [rel for rel, (_, sig) in sorted(files.items()) if state.files.get(rel) != sig]
    pending: list[np.ndarray] = []
    pending_n = 0
    for rel in todo:
        run_id = files[rel][0]
        ordinal = state.ordinal(run_id)
        for keys in _answered_keys(fs, f"{root}/{rel}"):
            rec = np.empty(len(keys), dtype=RECORD)
            rec["h"], rec["r"] = keys, ordinal
            pending.append(rec)
            pending_n += len(rec)
            stats.rows_ingested += len(rec)
            if pending_n >= batch_entries:
                _merge(index_dir, np.concatenate(pending))
                pending, pending_n = [], 0
        stats.files_ingested += 1
    if pending:
        _merge(index_dir, np.concatenate(pending))
    state.files = {rel: sig for rel, (_, sig) in files.items()}
    _save_state(index_dir, state)
    return state


def _ran(state: _State, run_id: str) -> bool:
    prefix = f"run={run_id}/"
    return any(rel.startswith(prefix) for rel in state.files)


def _answered_keys(fs: pafs.FileSystem, path: str) -> Iterator[np.ndarray]:
    try:
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=65536, columns=["image_id", "status"]):
                mask = pc.is_in(batch.column("status"), value_set=_ANSWERED)
                ids = pc.filter(batch.column("image_id"), mask)
                if len(ids):
                    yield keys_of(ids)
    except FileNotFoundError:
        return  # replaced (compaction) between listing and reading: the next open sees the new one
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ConfigError(f"ledger: cannot read {path} ({type(exc).__name__}: {exc})") from None


def _merge(index_dir: str, new: np.ndarray) -> None:
    """Merge ``new`` records into ``keys.bin`` one top-byte key range at a time: sort, dedupe,
    append to a file beside it, rename it over the old one."""
    new = np.sort(new, order=("h", "r"))
    path = _keys_path(index_dir)
    old: Any = (
        np.memmap(path, dtype=RECORD, mode="r")
        if os.path.exists(path) and os.path.getsize(path)
        else np.empty(0, RECORD)
    )
    edges = np.arange(_RANGES + 1, dtype=np.uint64) << np.uint64(56)
    edges[-1] = np.iinfo(np.uint64).max
    old_b = [*np.searchsorted(old["h"], edges[:-1]).tolist(), len(old)]
    new_b = [*np.searchsorted(new["h"], edges[:-1]).tolist(), len(new)]
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as out:
        for i in range(_RANGES):
            a = np.asarray(old[old_b[i] : old_b[i + 1]])
            b = new[new_b[i] : new_b[i + 1]]
            if not len(b):
                out.write(a.tobytes())
                continue
            merged = np.unique(np.concatenate([a, b]))  # sorts by (h, r)
            out.write(merged.tobytes())
    del old
    os.replace(tmp, path)
