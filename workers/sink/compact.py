"""``carnumber compact``: merge a run's part files into a few large files, one outcome per image.

Two passes keep memory to a few small columns per row. Pass one reads only ``image_id``,
``status`` and ``processed_at`` of every part and picks, per image, the winning part: an answer
(``ok``/``no_plate``) beats a failure, then the latest attempt wins — so a ``retry-failures`` run
or a redelivered chunk never leaves two outcomes for one image. Pass two streams each part and
keeps the winners' rows, rolling over to a new file every ``rows_per_file`` rows.

The swap is atomic for readers on a local filesystem: the merged files are written to a hidden
staging directory, then the run directory is renamed aside and the staging directory renamed
into its place (a reader sees the old run, then the new one; never both).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.sink.dataset import Dataset
from workers.sink.schema import SCHEMA, STATUS_FAILED

__all__ = ["CompactReport", "compact_run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompactReport:
    run_id: str
    parts_in: int
    files_out: int
    rows_in: int
    rows_out: int
    images: int


def best_outcomes(keys: pa.Table) -> pa.Table:
    """The winning row per ``image_id`` of a table with ``image_id``, ``status``,
    ``processed_at`` and ``file``: an answer beats a failure, then the latest, then the last file."""
    if keys.num_rows == 0:
        return keys
    ranked = keys.append_column("answered", pc.not_equal(keys["status"], STATUS_FAILED)).sort_by(
        [
            ("image_id", "ascending"),
            ("answered", "descending"),
            ("processed_at", "descending"),
            ("file", "descending"),
        ]
    )
    ids = ranked["image_id"].combine_chunks()
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    mask = pa.concat_arrays([pa.array([True]), first])
    return ranked.filter(mask).drop_columns(["answered"])


def read_keys(
    dataset: Dataset,
    files: list[str],
    extra: tuple[str, ...] = (),
    on_file: Callable[[int], None] | None = None,
) -> tuple[pa.Table, int]:
    """The small columns of every file, with the file's index; and the total row count.
    ``on_file(n)`` is called after the n-th file is read."""
    cols = ["image_id", "status", "processed_at", *extra]
    tables = []
    for i, path in enumerate(files):
        t = pq.read_table(path, filesystem=dataset.fs, columns=cols, schema=SCHEMA)
        tables.append(t.append_column("file", pa.array([i] * t.num_rows, pa.int32())))
        if on_file is not None:
            on_file(i + 1)
    if not tables:
        empty = SCHEMA.empty_table().select(cols)
        return empty.append_column("file", pa.array([], pa.int32())), 0
    table = pa.concat_tables(tables)
    return table, table.num_rows


def compact_run(
    dataset: Dataset,
    run_id: str,
    rows_per_file: int = 500_000,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> CompactReport:
    """Merge ``run_id``'s parts. Safe to run again; a run with no parts is left as it is.
    ``on_progress(phase, files_done, files)`` follows both passes (phase ``read``, ``write``)."""
    run_dir = dataset.run_dir(run_id)
    files = dataset.parquet_files(run_dir)
    progress = on_progress or (lambda phase, done, total: None)
    keys, rows_in = read_keys(dataset, files, on_file=lambda n: progress("read", n, len(files)))
    winners = best_outcomes(keys).select(["image_id", "file"])
    if not files:
        return CompactReport(run_id, 0, 0, 0, 0, 0)
    local = isinstance(dataset.fs, pafs.LocalFileSystem)
    token = uuid.uuid4().hex[:8]
    out_dir = f"{dataset.root}/.compact-{run_id}-{token}" if local else run_dir
    dataset.fs.create_dir(out_dir, recursive=True)

    written: list[str] = []
    writer: pq.ParquetWriter | None = None
    in_file = 0
    rows_out = 0

    def open_next() -> pq.ParquetWriter:
        name = f"compacted-{token}-{len(written):05d}.parquet"
        path = f"{out_dir}/{name}" if local else f"{out_dir}/.{name}.tmp"
        written.append(path)
        return pq.ParquetWriter(path, SCHEMA, filesystem=dataset.fs, compression="zstd")

    try:
        for i, path in enumerate(files):
            progress("write", i, len(files))
            keep_ids = winners.filter(pc.equal(winners["file"], i))["image_id"]
            if len(keep_ids) == 0:
                continue
            t = pq.read_table(path, filesystem=dataset.fs, schema=SCHEMA)
            t = t.filter(pc.is_in(t["image_id"], value_set=keep_ids.combine_chunks()))
            offset = 0
            while offset < t.num_rows:
                if writer is None or in_file >= rows_per_file:
                    if writer is not None:
                        writer.close()
                    writer, in_file = open_next(), 0
                take = min(rows_per_file - in_file, t.num_rows - offset)
                writer.write_table(t.slice(offset, take))
                offset += take
                in_file += take
                rows_out += take
    finally:
        if writer is not None:
            writer.close()

    progress("write", len(files), len(files))
    _publish(dataset, run_dir, out_dir, files, written, local, token)
    report = CompactReport(run_id, len(files), len(written), rows_in, rows_out, len(winners))
    log.debug("compacted run %s: %s", run_id, report)
    return report


def _publish(
    dataset: Dataset,
    run_dir: str,
    out_dir: str,
    parts: list[str],
    written: list[str],
    local: bool,
    token: str,
) -> None:
    fs = dataset.fs
    if local:
        aside = f"{dataset.root}/.old-{run_dir.rsplit('/', 1)[-1]}-{token}"
        fs.move(run_dir, aside)
        fs.move(out_dir, run_dir)
        # A part that landed while we merged (a late redelivery) must not be lost with the old dir.
        merged = {p.rsplit("/", 1)[-1] for p in parts}
        for path in dataset.parquet_files(aside):
            name = path.rsplit("/", 1)[-1]
            if name not in merged:
                fs.move(path, f"{run_dir}/{name}")
        fs.delete_dir(aside)
        return
    # Object stores: publish the merged files, then drop the parts they replace.
    for tmp in written:
        final = tmp.replace("/.", "/", 1).removesuffix(".tmp")
        fs.copy_file(tmp, final)
        fs.delete_file(tmp)
    for path in parts:
        fs.delete_file(path)
