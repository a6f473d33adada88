"""Bring the answer cache across runs (``workers/answer_cache.py``) up to date with the output.

The producer calls :func:`update_answers` before a run is enqueued (and ``carnumber plan``
before it counts): every output file not seen yet is read, each answered image (``ok`` or
``no_plate`` rows with a ``content_key``) becomes one entry, the first image of a picture wins,
and the new entries go into new segments of at most ``batch_entries`` (then the segments are
folded together, size-tiered). Workers look a picture up there before they call for it, so a
picture answered in an earlier run is not paid for again wherever it has moved.

What has been read is kept in ``{output}/_answers/v1/state.json`` (file -> size, mtime), like
the ledger's state. Files that disappear (compaction) leave their answers in the cache: the
compacted files hold the same answers, and their entries, read again, are folded away by the
next merge. A whole run directory that disappeared means its rows were deleted: the cache is
built again from what is left. Terminal errors are not cached: a later run tries them again, as
the ledger does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from producers.ledger import dataset_files, locked
from workers import answer_cache
from workers.books.journal import Answer
from workers.errors import ConfigError
from workers.sink.dataset import open_dataset
from workers.sink.rows import recognition_from_rows
from workers.sink.schema import STATUS_NO_PLATE, STATUS_OK

__all__ = ["AnswerIndexStats", "update_answers"]

_ANSWERED = pa.array([STATUS_OK, STATUS_NO_PLATE])
_COLUMNS = [
    "run_id",
    "image_id",
    "status",
    "content_key",
    "answered_by",
    "attempts",
    "plate_index",
    "plate",
    "plate_type",
    "plate_type_prob",
    "plate_prob",
    "polygon",
    "width",
    "height",
    "org_width",
    "org_height",
    "request_id",
]


@dataclass(slots=True)
class AnswerIndexStats:
    files_ingested: int = 0
    answers_added: int = 0  # entries written to new segments (before folding duplicates)
    entries: int = 0  # entries in the cache after the update
    segments: int = 0
    merged: bool = False
    rebuilt: bool = False


def update_answers(
    output: str,
    *,
    batch_entries: int = 200_000,
    max_segments: int = 4,
    rebuild: bool = False,
    on_file: Callable[[str], None] | None = None,
) -> AnswerIndexStats:
    """Ingest the output's new files into its answer cache. ``output``: a directory or
    ``s3://bucket/prefix``. Raises :class:`ConfigError` when the output cannot be read or the
    cache cannot be written."""
    dataset = open_dataset(output)  # ConfigError naming the output when it cannot be opened
    fs, root = dataset.fs, dataset.root
    stats = AnswerIndexStats()
    directory = answer_cache.cache_dir(root)
    try:
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return stats  # nothing written yet
        with _locked(fs, directory):
            _update(fs, root, directory, batch_entries, max_segments, rebuild, stats, on_file)
        segments = answer_cache.read_manifest(fs, directory)
    except OSError as exc:
        raise ConfigError(f"answer cache under {output!r}: {type(exc).__name__}: {exc}") from None
    stats.segments = len(segments)
    stats.entries = sum(s.entries for s in segments)
    return stats


@contextlib.contextmanager
def _locked(fs: pafs.FileSystem, directory: str) -> Iterator[None]:
    """One updater at a time where a lock exists (a local output); on an object store two
    producers at once may lose each other's newest segment (answers then paid again)."""
    fs.create_dir(directory, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        yield
        return
    with locked(directory):
        yield


def _load_state(fs: pafs.FileSystem, directory: str) -> dict[str, list[int]] | None:
    try:
        with fs.open_input_stream(f"{directory}/state.json") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return None
    except ValueError:
        return None
    return dict(doc["files"]) if doc.get("version") == 1 else None


def _save_state(fs: pafs.FileSystem, directory: str, files: dict[str, list[int]]) -> None:
    answer_cache.put_file(fs, f"{directory}/state.json", json.dumps({"version": 1, "files": files}).encode())


def _update(
    fs: pafs.FileSystem,
    root: str,
    directory: str,
    batch_entries: int,
    max_segments: int,
    rebuild: bool,
    stats: AnswerIndexStats,
    on_file: Callable[[str], None] | None,
) -> None:
    files = dataset_files(fs, root)
    state = None if rebuild else _load_state(fs, directory)
    if state is not None:
        present = {run for run, _ in files.values()}
        ingested = {rel.split("/", 1)[0][len("run=") :] for rel in state}
        if ingested - present:
            state = None  # a whole run's output was deleted: its answers must leave the cache
    if state is None:
        stats.rebuilt = True
        answer_cache.clear(fs, directory)
        state = {}
    pending: list[tuple[str, bytes]] = []
    for rel in sorted(files):
        sig = files[rel][1]
        if state.get(rel) == sig:
            continue
        for entry in _answers_in(fs, f"{root}/{rel}"):
            pending.append(entry)
            if len(pending) >= batch_entries:
                stats.answers_added += len(pending)
                answer_cache.add_segment(fs, directory, pending)
                pending = []
        stats.files_ingested += 1
        if on_file is not None:
            on_file(rel)
    if pending:
        stats.answers_added += len(pending)
        answer_cache.add_segment(fs, directory, pending)
    stats.merged = answer_cache.merge(fs, directory, max_segments=max_segments)
    _save_state(fs, directory, {rel: sig for rel, (_, sig) in files.items()})


def _answers_in(fs: pafs.FileSystem, path: str) -> Iterator[tuple[str, bytes]]:
    """``(content key, payload)`` of each answered image in one output file, in file order (an
    image's rows are consecutive: one part, or one compacted file, writes them together)."""
    try:
        with fs.open_input_file(path) as fh:
            pf = pq.ParquetFile(fh)
            names = set(pf.schema_arrow.names)
            if "content_key" not in names:
                return  # a schema-1 file: no content keys to cache by
            carry: list[dict[str, Any]] = []
            for batch in pf.iter_batches(batch_size=65536, columns=[c for c in _COLUMNS if c in names]):
                mask = pc.and_(
                    pc.is_in(batch.column("status"), value_set=_ANSWERED),
                    pc.is_valid(batch.column("content_key")),
                )
                rows = batch.filter(mask).to_pylist()
                for row in rows:
                    if carry and row["image_id"] != carry[0]["image_id"]:
                        yield _entry(carry)
                        carry = []
                    carry.append(row)
            if carry:
                yield _entry(carry)
    except FileNotFoundError:
        return  # replaced (compaction) between listing and reading: the next update reads it
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise ConfigError(f"answer cache: cannot read {path} ({type(exc).__name__}: {exc})") from None


def _entry(rows: list[dict[str, Any]]) -> tuple[str, bytes]:
    first = rows[0]
    by = first.get("answered_by") or first["image_id"]
    # The journal's own encoding, with 0 attempts: a copy answered from it makes no call.
    answer = Answer(0, recognition=recognition_from_rows(rows), by=by)
    return first["content_key"], answer.to_json().encode()
