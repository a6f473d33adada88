"""``carnumber verify``: reconcile what the producer enqueued for a run against the output.

Three inputs, none of them changed: the producer's records (:mod:`workers.sink.enqueued`, the images
the run promised to answer), the small columns of the run's output files (``image_id``,
``status``, ``processed_at``, ``plate_index``, ``error_code``, ``retryable``: memory is a few
columns per row, never whole rows) and, from Redis, the run's hash and its parked chunks (read
with ``LRANGE``, not taken).

An *outcome* is one (image, status, ``processed_at``): a file holds one per image (one row per
plate), and a genuine second attempt always carries a later time. Each enqueued image falls in
exactly one class, first match wins:

``duplicated``
    more than one *answer* outcome (``ok``/``no_plate``), or the same row (image, status, time,
    plate index) twice — a part file copied or written under two names, even one of failures.
    Once the run is compacted (only ``compacted-*`` files), any second outcome at all.
``parked``
    in a parked chunk: set aside while the fleet was paused; ``carnumber resume`` publishes it.
``in_flight``
    no outcome, in a chunk message that is alive on the broker (queued, or held by a worker: a
    dead holder's lease runs out and it is queued again): it will still get one.
``missing``
    no outcome, not parked, in no live message: lost (a message or a part file).
``exactly_one``
    one winning outcome. Failures followed by a later outcome (a ``retry-failures`` round) are
    *superseded*, not duplicates: compaction keeps the answer, as :func:`best_outcomes` does.

Outcomes for images the run never enqueued are ``unexpected``; first-pass chunks that Redis
counts as enqueued but have no record are ``unrecorded``. The run is clean when every enqueued
image has exactly one outcome, every other count is zero (failed images do have their one
outcome; they are reported by code, with their ``retryable`` flag, but are not a mismatch), and
every source was enqueued to its end (an enqueue that stopped early promised only part of it).

:func:`republish_missing` publishes the *missing* images again, from their records, under their
own chunk ids and positions (the run's books then count each once, ``workers/books/outcomes.py``); an
image whose rows are gone from the output is first forgotten by the books. Images in flight or
parked are never republished: they will run anyway, and a second copy would be a second holder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.books.outcomes import OutcomeBook
from workers.books.runs import RunStore
from workers.errors import InputError
from workers.message import Chunk
from workers.sink.compact import best_outcomes, read_keys
from workers.sink.dataset import Dataset
from workers.sink.enqueued import EnqueuedRecords, is_first_pass
from workers.sink.schema import SCHEMA, STATUS_FAILED

__all__ = [
    "KINDS",
    "Example",
    "FailedCode",
    "Verification",
    "parked_chunks",
    "republish_missing",
    "verify_run",
]

KINDS = ("missing", "in_flight", "parked", "duplicated", "unexpected", "unrecorded")
_MISMATCH_SCHEMA = pa.schema(
    [("kind", pa.string()), ("image_id", pa.string()), ("url", pa.string()), ("chunk_id", pa.string())]
)


@dataclass(frozen=True, slots=True)
class Example:
    """One image of a mismatch: its id, redacted source (None if unknown) and where it is."""

    image_id: str
    source: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class FailedCode:
    code: str
    retryable: bool
    images: int


@dataclass(slots=True)
class Verification:
    """What :func:`verify_run` found. Counts are images unless named otherwise."""

    run_id: str
    state: str
    stop_code: str | None
    compaction: str  # none | compacted | partial (compacted files and newer parts)
    part_files: int
    compacted_files: int
    record_chunks: int
    enqueued: int  # distinct images in the records
    listed_twice: int  # images recorded in more than one chunk (the source lists them twice)
    skipped_answered_earlier: int  # dropped by the producer, answered in earlier runs (Redis)
    exactly_one: int
    answered: int  # of exactly_one: the winning outcome is ok/no_plate
    failed: int  # of exactly_one: the winning outcome is a failure
    superseded: int  # of exactly_one: earlier failures replaced by a later outcome
    missing: int
    in_flight_images: int  # no outcome yet, in a live message (queued or held by a worker)
    parked: int
    parked_chunks: int
    duplicated: int
    unexpected: int
    unrecorded_chunks: int
    in_flight: int  # by Redis's counters: enqueued - written - parked
    # Sources not enqueued to their end: "SOURCE: N images published (why); finish: COMMAND".
    unfinished: list[str] = field(default_factory=list)
    failed_by_code: list[FailedCode] = field(default_factory=list)
    examples: dict[str, list[Example]] = field(default_factory=dict)
    # Every missing, parked and duplicated image: kind, image_id, url (its source), chunk_id.
    mismatched: pa.Table = field(default_factory=_MISMATCH_SCHEMA.empty_table)

    @property
    def ok(self) -> bool:
        """Every enqueued image has exactly one outcome, and nothing else is off."""
        return (
            self.exactly_one == self.enqueued and not any(self.counts().values()) and not self.unfinished
        )

    def counts(self) -> dict[str, int]:
        """The mismatch counts by kind (:data:`KINDS`); chunks for ``unrecorded``."""
        return {
            "missing": self.missing,
            "in_flight": self.in_flight_images,
            "parked": self.parked,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "unrecorded": self.unrecorded_chunks,
        }

    def reasons(self) -> list[str]:
        """One short phrase per mismatch kind found, e.g. ``"3 missing"``."""
        out = []
        for kind, n in self.counts().items():
            if n:
                out.append(f"{n} {'chunks ' if kind == 'unrecorded' else ''}{kind}")
        out.extend(f"not enqueued to its end: {u}" for u in self.unfinished)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "ok": self.ok,
            "reasons": self.reasons(),
            "state": self.state,
            "stop_code": self.stop_code,
            "compacted": self.compaction == "compacted",
            "compaction": self.compaction,
            "files": {"parts": self.part_files, "compacted": self.compacted_files},
            "record_chunks": self.record_chunks,
            "enqueued": self.enqueued,
            "listed_twice": self.listed_twice,
            "skipped_answered_earlier": self.skipped_answered_earlier,
            "exactly_one": self.exactly_one,
            "answered": self.answered,
            "failed": self.failed,
            "superseded": self.superseded,
            "missing": self.missing,
            "in_flight_images": self.in_flight_images,
            "parked": self.parked,
            "parked_chunks": self.parked_chunks,
            "unfinished": self.unfinished,
            "duplicated": self.duplicated,
            "unexpected": self.unexpected,
            "unrecorded_chunks": self.unrecorded_chunks,
            "in_flight": self.in_flight,
            "failed_by_code": [
                {"code": f.code, "retryable": f.retryable, "images": f.images} for f in self.failed_by_code
            ],
            "examples": {
                kind: [{"image_id": e.image_id, "source": e.source, "detail": e.detail} for e in items]
                for kind, items in self.examples.items()
            },
        }


def parked_chunks(runs: RunStore, run_id: str) -> Iterator[Chunk]:
    """The run's parked chunks, left in place (``resume`` publishes them)."""
    for _, chunk in runs.parked(run_id):
        yield chunk


def _ids(table: pa.Table, mask: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The distinct ``image_id`` values of the rows of ``table`` where ``mask`` holds."""
    return pc.unique(table.filter(mask)["image_id"]).cast(pa.string())


def _in(values: pa.ChunkedArray | pa.Array, value_set: pa.Array) -> pa.ChunkedArray | pa.Array:
    return pc.is_in(values, value_set=value_set.cast(pa.string()))


def _promised(listed: pa.Table) -> pa.Table:
    """One row per distinct image of the records (the first chunk that listed it): an image the
    source lists twice is enqueued twice, and both are one promise."""
    if pc.count_distinct(listed["image_id"]).as_py() == listed.num_rows:
        return listed
    enq = listed.group_by("image_id", use_threads=False).aggregate(
        [("source", "first"), ("chunk_id", "first")]
    )
    return enq.rename_columns(["image_id", "source", "chunk_id"])


def _outcomes(keys: pa.Table, compacted: bool) -> tuple[pa.Table, pa.Table, pa.Array]:
    """From the output's rows: the outcomes (image, status, time; with the last file holding
    it, its code and flag), per image the count of outcomes and of answers, and the duplicated
    image ids. A row repeated within an outcome (same plate index twice) is a copied file."""
    outcomes = keys.group_by(["image_id", "status", "processed_at"]).aggregate(
        [
            ("file", "max"),
            ("error_code", "min"),
            ("retryable", "max"),
            ("plate_index", "count_distinct", pc.CountOptions(mode="all")),
            ([], "count_all"),
        ]
    )
    repeated = _ids(outcomes, pc.greater(outcomes["count_all"], outcomes["plate_index_count_distinct"]))
    outcomes = outcomes.select(
        ["image_id", "status", "processed_at", "file_max", "error_code_min", "retryable_max"]
    )
    outcomes = outcomes.rename_columns(
        ["image_id", "status", "processed_at", "file", "error_code", "retryable"]
    )
    answer = pc.cast(pc.not_equal(outcomes["status"], STATUS_FAILED), pa.int64())
    per_image = (
        outcomes.append_column("answer", answer)
        .group_by("image_id")
        .aggregate([([], "count_all"), ("answer", "sum")])
    )
    dup_rule = pc.greater(per_image["answer_sum"], 1)
    if compacted:  # compaction kept one outcome per image: any second one came later
        dup_rule = pc.or_(dup_rule, pc.greater(per_image["count_all"], 1))
    return outcomes, per_image, pc.unique(pa.concat_arrays([_ids(per_image, dup_rule), repeated]))


def verify_run(
    dataset: Dataset,
    runs: RunStore,
    run_id: str,
    *,
    live: Iterable[Chunk] = (),
    examples: int = 5,
) -> Verification:
    """Reconcile ``run_id`` (see the module docstring); ``live``: the run's chunk messages alive
    on the broker (``workers.books.queued.live_chunks``); ``examples`` images listed per kind.

    Raises :class:`InputError` when Redis does not know the run, when the run has published
    chunks but no enqueued records (an older producer, or another ``CARNUMBER_OUTPUT``), or when
    a record or output file cannot be read. Redis errors pass through as ``redis.RedisError``.
    """
    summary = runs.get(run_id)
    if summary is None:
        raise InputError(f"run {run_id!r}: not found in Redis (key prefix {runs.keys.prefix!r})")
    records = EnqueuedRecords(dataset)
    recorded = records.files(run_id)
    published = [c.decode() for c in runs.r.hkeys(runs.keys.run_chunks(run_id))]
    unrecorded = sorted(c for c in published if is_first_pass(c) and c not in recorded)
    if not recorded and unrecorded:
        raise InputError(
            f"run {run_id!r}: {len(unrecorded)} chunks were enqueued but {records.run_dir(run_id)} "
            "holds no record of them: the run was enqueued by a carnumber older than `verify`, or "
            "with another CARNUMBER_OUTPUT than this one"
        )

    try:
        listed = records.read(run_id)
        files = dataset.parquet_files(dataset.run_dir(run_id))
        keys, _ = read_keys(dataset, files, extra=("plate_index", "error_code", "retryable"))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(
            f"run {run_id!r}: cannot read its records or output under {dataset.root} ({exc}); "
            "if a compaction was running, verify again when it is done"
        ) from None
    enq = _promised(listed)
    compacted_files = sum(p.rsplit("/", 1)[-1].startswith("compacted-") for p in files)
    compaction = "none" if not compacted_files else "partial" if compacted_files < len(files) else "compacted"
    outcomes, per_image, dup_ids = _outcomes(keys, compacted=compaction == "compacted")
    multi = pc.greater(per_image["count_all"], 1)
    superseded_ids = _ids(per_image, pc.and_(multi, pc.invert(_in(per_image["image_id"], dup_ids))))
    out_ids = per_image["image_id"].combine_chunks()

    parked = list(parked_chunks(runs, run_id))
    parked_where = {r.image_id: c.chunk_id for c in parked for r in c.images}
    parked_ids = pa.array(list(parked_where), pa.string())
    live_ids = pa.array(sorted({r.image_id for c in live for r in c.images}), pa.string())

    # Classify each enqueued image, first match wins.
    is_dup = _in(enq["image_id"], dup_ids)
    is_parked = pc.and_(pc.invert(is_dup), _in(enq["image_id"], parked_ids))
    has_out = _in(enq["image_id"], out_ids)
    no_out = pc.and_(pc.invert(pc.or_(is_dup, is_parked)), pc.invert(has_out))
    is_live = pc.and_(no_out, _in(enq["image_id"], live_ids))
    is_missing = pc.and_(no_out, pc.invert(is_live))
    is_one = pc.and_(pc.and_(pc.invert(is_dup), pc.invert(is_parked)), has_out)
    one_ids = _ids(enq, is_one)
    unexpected_ids = pc.filter(out_ids, pc.invert(_in(out_ids, enq["image_id"].combine_chunks())))

    # The winner of an image with one outcome is that outcome; only the few others need ranking.
    several = _in(outcomes["image_id"], _ids(per_image, multi))
    winners = pa.concat_tables([outcomes.filter(pc.invert(several)), best_outcomes(outcomes.filter(several))])
    won = winners.filter(_in(winners["image_id"], one_ids))
    failed = won.filter(pc.equal(won["status"], STATUS_FAILED))
    by_code = (
        failed.append_column("retry", pc.fill_null(failed["retryable"], False))
        .group_by(["error_code", "retry"])
        .aggregate([([], "count_all")])
        .sort_by([("count_all", "descending"), ("error_code", "ascending")])
    )

    kinds = {"missing": is_missing, "in_flight": is_live, "parked": is_parked, "duplicated": is_dup}
    mismatched = pa.concat_tables(
        [
            pa.table(
                {
                    "kind": [kind] * int(pc.sum(mask).as_py() or 0),
                    "image_id": enq.filter(mask)["image_id"],
                    "url": enq.filter(mask)["source"],
                    "chunk_id": enq.filter(mask)["chunk_id"],
                },
                schema=_MISMATCH_SCHEMA,
            )
            for kind, mask in kinds.items()
        ]
    )
    found = Verification(
        run_id=run_id,
        state=summary.state,
        stop_code=summary.fields.get("stop_code") or None,
        compaction=compaction,
        part_files=len(files) - compacted_files,
        compacted_files=compacted_files,
        record_chunks=len(recorded),
        enqueued=enq.num_rows,
        listed_twice=listed.num_rows - enq.num_rows,
        skipped_answered_earlier=int(summary.fields.get("images_skipped", 0)),
        exactly_one=len(one_ids),
        answered=won.num_rows - failed.num_rows,
        failed=failed.num_rows,
        superseded=int(pc.sum(_in(superseded_ids, one_ids)).as_py() or 0),
        missing=int(pc.sum(is_missing).as_py() or 0),
        in_flight_images=int(pc.sum(is_live).as_py() or 0),
        parked=int(pc.sum(is_parked).as_py() or 0),
        parked_chunks=len(parked),
        duplicated=int(pc.sum(is_dup).as_py() or 0),
        unexpected=len(unexpected_ids),
        unrecorded_chunks=len(unrecorded),
        in_flight=summary.outstanding,
        unfinished=[
            f"{e.source}: {e.published} images published ({e.reason or 'its producer stopped answering'});"
            f" finish: carnumber resume {run_id} (or {e.command})"
            for e in summary.unfinished_enqueues
        ],
        failed_by_code=[
            FailedCode(r["error_code"] or "?", bool(r["retry"]), r["count_all"]) for r in by_code.to_pylist()
        ],
        mismatched=mismatched,
    )
    found.examples = _examples(
        dataset, files, keys, mismatched, unexpected_ids, unrecorded, parked_where, examples
    )
    return found


def _examples(
    dataset: Dataset,
    files: list[str],
    keys: pa.Table,
    mismatched: pa.Table,
    unexpected_ids: pa.Array,
    unrecorded: list[str],
    parked_where: dict[str, str],
    n: int,
) -> dict[str, list[Example]]:
    """Up to ``n`` images per kind found, with where to look: chunk id, or the files holding it."""

    def where(ids: list[str]) -> dict[str, list[str]]:
        hits = keys.filter(_in(keys["image_id"], pa.array(ids, pa.string()))).select(["image_id", "file"])
        out: dict[str, list[str]] = {}
        for row in hits.to_pylist():
            name = files[row["file"]].rsplit("/", 1)[-1]
            if name not in out.setdefault(row["image_id"], []):
                out[row["image_id"]].append(name)
        return out

    found: dict[str, list[Example]] = {}
    for kind in ("missing", "in_flight", "parked", "duplicated"):
        rows = mismatched.filter(pc.equal(mismatched["kind"], kind)).slice(0, n).to_pylist()
        if not rows:
            continue
        in_files = where([r["image_id"] for r in rows]) if kind == "duplicated" else {}
        found[kind] = [
            Example(
                r["image_id"],
                r["url"],
                f"in {', '.join(in_files.get(r['image_id'], []))}"
                if kind == "duplicated"
                else f"parked chunk {parked_where[r['image_id']]}"
                if kind == "parked"
                else f"chunk {r['chunk_id']}",
            )
            for r in rows
        ]
    if len(unexpected_ids):
        ids = unexpected_ids.slice(0, n).to_pylist()
        in_files = where(ids)
        sources = _sources(dataset, files, keys, ids)
        found["unexpected"] = [Example(i, sources.get(i), f"in {', '.join(in_files[i])}") for i in ids]
    if unrecorded:
        found["unrecorded"] = [Example("", None, f"chunk {c} has no record") for c in unrecorded[:n]]
    return found


def _sources(dataset: Dataset, files: list[str], keys: pa.Table, ids: list[str]) -> dict[str, str]:
    """The output's source of a few images (one small read of each file that holds one)."""
    wanted = pa.array(ids, pa.string())
    hits = keys.filter(_in(keys["image_id"], wanted))
    out: dict[str, str] = {}
    for i in sorted(set(hits["file"].to_pylist())):
        t = pq.read_table(files[i], filesystem=dataset.fs, columns=["image_id", "source"], schema=SCHEMA)
        for row in t.filter(_in(t["image_id"], wanted)).to_pylist():
            out.setdefault(row["image_id"], row["source"])
    return out


_HELD = ("stopped", "quota_exhausted", "circuit_open", "paused", "cancelled", "shutdown")


def republish_missing(
    v: Verification,
    dataset: Dataset,
    runs: RunStore,
    publish: Callable[[Chunk], None],
    outcomes: OutcomeBook,
) -> list[Chunk]:
    """Publish ``v``'s *missing* images again (source and metadata from their records) under
    their own chunk ids and positions. Images the run's books count as answered although their
    rows are gone from the output are forgotten by the books first, so they are answered again.
    Images of chunks the producer never counted belong to an enqueue that did not finish
    (``carnumber resume`` runs it again), and are left to it. Returns the chunks published.
    Raises :class:`InputError` while the run is held (``carnumber resume`` first)."""
    ids = v.mismatched.filter(pc.equal(v.mismatched["kind"], "missing"))["image_id"].to_pylist()
    if not ids:
        return []
    state = runs.get(v.run_id)
    if state is not None and state.state in _HELD:
        raise InputError(
            f"run {v.run_id} is {state.state}: fix the cause and `carnumber resume {v.run_id}` first "
            "(workers would only park the images again)"
        )
    counted = {c.decode() for c in runs.r.hkeys(runs.keys.run_chunks(v.run_id))}
    chunks = [c for c in EnqueuedRecords(dataset).chunks(v.run_id, ids) if c.chunk_id in counted]
    for chunk in chunks:
        outcomes.clear(v.run_id, chunk.chunk_id, chunk.position_of())
        publish(chunk)
    runs.touch(v.run_id, verify_republished=sum(len(c.images) for c in chunks))
    return chunks
