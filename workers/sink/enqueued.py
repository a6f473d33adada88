"""The durable record of what the producer enqueued for a run, one small Parquet file per chunk.

Redis remembers only chunk id → digest (``run:{id}:chunks``), which is enough to skip published
chunks on a re-run but not to say *which images* a run promised to answer. ``carnumber verify``
needs that list, so the producer writes it beside the output, through the same pyarrow filesystem
the sink uses (a local directory or ``s3://``)::

    {output}/_enqueued/run={run_id}/chunk-{chunk_id}.parquet   image_id, source, chunk_id, meta

Design choices, each for a failure it rules out:

* **Written before the chunk is published.** A crash between the two leaves a record of a chunk
  nobody processes: verify calls those images *missing*, and re-running the same
  ``carnumber enqueue`` publishes the chunk (Redis never counted it). The other order could leave
  a published chunk with no record, whose images verify would call *unexpected*.
* **Named by chunk id**, and written to a temporary name then renamed (``Dataset.write_table``):
  a re-run of the producer overwrites a record instead of adding a second one, and a reader never
  sees half a file.
* **A record for every chunk, even one whose images were all dropped** (answered in earlier runs):
  then every first-pass chunk id in Redis has a record, and a missing record means the run was
  enqueued by an older version or to another ``CARNUMBER_OUTPUT``. Dropped images are not listed;
  their count is in the run's hash (``images_skipped``).
* **Only first-pass chunks** (ids of digits alone). ``retry-failures`` (``retry1-…``) and
  ``resume`` republish images that are already recorded, so they write nothing here.
* The leading underscore keeps the directory out of every reader's ``run=*/`` glob and out of the
  ledger, which only looks at ``run=`` directories. Sources are redacted (never a signed query
  string), as in the output rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from workers.message import Chunk, ImageRef, redact_url
from workers.sink.dataset import Dataset, check_run_id, open_dataset

__all__ = [
    "RECORD_SCHEMA",
    "EnqueuedRecords",
    "is_first_pass",
    "recorder",
]

RECORD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # redacted, as in the output rows
        pa.field("chunk_id", pa.string(), nullable=False),
        pa.field("meta", pa.map_(pa.string(), pa.string())),  # so a republished image keeps it
        # The producer's verdicts, so a republished image is what the producer published: the
        # URL to fetch is the sealed one (workers/storage/sealed.py), or the item was refused
        # with this code and message. Null in version 1 records.
        pa.field("sealed", pa.bool_()),
        pa.field("refused_code", pa.string()),
        pa.field("refused_message", pa.string()),
    ],
    metadata={b"carnumber.enqueued_version": b"2"},
)
_REF_COLUMNS = ["image_id", "source", "meta", "sealed", "refused_code", "refused_message"]
_PREFIX = "chunk-"
_HEX = frozenset("0123456789abcdef")
_SUFFIX = ".parquet"


def is_first_pass(chunk_id: str) -> bool:
    """True for the producer's own chunk ids, which have a record: ``0000042`` for a run's first
    source, ``s1a2b3c4d-0000042`` for a further source enqueued into the same run; False for
    republished ones (``retry1-0000042``), which do not."""
    head, dash, number = chunk_id.rpartition("-")
    if not dash:
        return chunk_id.isdigit()
    return number.isdigit() and len(head) == 9 and head[0] == "s" and all(c in _HEX for c in head[1:])


@dataclass(frozen=True, slots=True)
class EnqueuedRecords:
    """The records of every run in one output dataset."""

    dataset: Dataset

    def run_dir(self, run_id: str) -> str:
        return f"{self.dataset.root}/_enqueued/run={check_run_id(run_id)}"

    def write(self, chunk: Chunk) -> str:
        """Record ``chunk``'s images (possibly none); overwrites an earlier record of the same
        chunk id. Returns the file's path. Raises ``OSError`` or ``pyarrow.ArrowException``
        when the output store refuses the write (the producer then stops before publishing)."""
        table = pa.table(
            {
                "image_id": [r.image_id for r in chunk.images],
                "source": [redact_url(r.source) for r in chunk.images],
                "chunk_id": [chunk.chunk_id] * len(chunk.images),
                "meta": [list(r.meta.items()) or None for r in chunk.images],
                "sealed": [r.sealed or None for r in chunk.images],
                "refused_code": [r.refused[0] if r.refused else None for r in chunk.images],
                "refused_message": [r.refused[1] if r.refused else None for r in chunk.images],
            },
            schema=RECORD_SCHEMA,
        )
        return self.dataset.write_table(
            self.run_dir(chunk.run_id), f"{_PREFIX}{chunk.chunk_id}{_SUFFIX}", table
        )

    def files(self, run_id: str) -> dict[str, str]:
        """Chunk id → path of each record of ``run_id`` (empty when none was written)."""
        out = {}
        for path in self.dataset.parquet_files(self.run_dir(run_id)):
            name = path.rsplit("/", 1)[-1]
            if name.startswith(_PREFIX):
                out[name[len(_PREFIX) : -len(_SUFFIX)]] = path
        return out

    def read(self, run_id: str, columns: tuple[str, ...] = ("image_id", "source", "chunk_id")) -> pa.Table:
        """``columns`` of every record of ``run_id``, in chunk order: one row per image listed.
        Memory is those columns only (about 100 bytes per image with ``source``)."""
        paths = [p for _, p in sorted(self.files(run_id).items())]
        if not paths:
            return RECORD_SCHEMA.empty_table().select(list(columns))
        return pa.concat_tables(
            pq.read_table(p, filesystem=self.dataset.fs, columns=list(columns), schema=RECORD_SCHEMA)
            for p in paths
        )

    def chunk(self, run_id: str, chunk_id: str) -> Chunk | None:
        """The recorded chunk ``chunk_id`` as it was published (None when it has no record)."""
        path = self.files(run_id).get(chunk_id)
        if path is None:
            return None
        table = pq.read_table(path, filesystem=self.dataset.fs, columns=_REF_COLUMNS, schema=RECORD_SCHEMA)
        refs = tuple(_ref(r) for r in table.to_pylist())
        return Chunk(run_id, chunk_id, refs)

    def chunks(self, run_id: str, image_ids: Sequence[str]) -> list[Chunk]:
        """The recorded chunks that hold ``image_ids``, each cut down to those images and keeping
        their positions (a record lists a chunk's images in the order it was published), so a
        republished image is the same ``(chunk id, position)`` to the run's books."""
        wanted = set(image_ids)
        found: list[Chunk] = []
        for chunk_id, path in sorted(self.files(run_id).items()):
            table = pq.read_table(
                path, filesystem=self.dataset.fs, columns=_REF_COLUMNS, schema=RECORD_SCHEMA
            )
            rows = table.to_pylist()
            picked = [(p, r) for p, r in enumerate(rows) if r["image_id"] in wanted]
            if picked:
                found.append(
                    Chunk(
                        run_id,
                        chunk_id,
                        tuple(_ref(r) for _, r in picked),
                        tuple(p for p, _ in picked),
                    )
                )
        return found

    def refs(self, run_id: str, image_ids: Sequence[str]) -> list[ImageRef]:
        """The recorded refs of ``image_ids`` (source and metadata as enqueued, in chunk order;
        each image once), to publish them again."""
        wanted = pa.array(list(image_ids), pa.string())
        table = self.read(run_id, tuple(_REF_COLUMNS))
        table = table.filter(pc.is_in(table["image_id"], value_set=wanted))
        seen: dict[str, ImageRef] = {}
        for row in table.to_pylist():
            seen.setdefault(row["image_id"], _ref(row))
        return list(seen.values())


def _ref(row: dict[str, object]) -> ImageRef:
    """The image as the producer published it, from its record row."""
    code = row.get("refused_code")
    return ImageRef(
        str(row["source"]),
        str(row["image_id"]),
        dict(row["meta"] or []),  # type: ignore[call-overload]
        sealed=bool(row.get("sealed")),
        refused=(str(code), str(row.get("refused_message") or "")) if code else None,
    )


def recorder(output: str) -> Callable[[Chunk], None]:
    """The ``record`` callback for :func:`producers.enqueue.enqueue` that writes to ``output``
    (``CARNUMBER_OUTPUT``). Raises :class:`~workers.errors.ConfigError` if it cannot be opened."""
    records = EnqueuedRecords(open_dataset(output))

    def record(chunk: Chunk) -> None:
        records.write(chunk)

    return record
