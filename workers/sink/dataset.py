"""Where output goes: ``{output}/run={run_id}/part-<chunk>-<digest>.parquet``.

The sink takes a ``pyarrow.fs.FileSystem`` (local today; ``s3://`` through pyarrow's S3
filesystem works the same way), so nothing here knows about paths on a particular store.
Writes go to a temporary name and are renamed into place, so a reader never sees half a file and
a redelivered chunk overwrites its own part instead of adding one (see ops/design/sink.md).
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from workers.errors import ConfigError
from workers.sink.schema import SCHEMA

__all__ = ["Dataset", "open_dataset", "warm_up"]

_RUN_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_run_id(run_id: str) -> str:
    """Run ids name directories and Redis keys: letters, digits, ``-_.``; 1..100 characters."""
    if not run_id or len(run_id) > 100 or not set(run_id) <= _RUN_ID_CHARS or run_id[0] == ".":
        raise ConfigError(
            f"run id {run_id!r}: use 1-100 letters, digits, '-', '_' or '.', not starting with '.'"
        )
    return run_id


def warm_up() -> None:
    """Load now what a worker's first part write loads lazily: ``Table.from_pylist`` imports
    pandas and more on first use (~200 ms, holding the interpreter lock for stretches of ~25 ms,
    measured), which, on the threads pool, stalls the other chunk's calls right after their
    slots. Writes an empty part to memory; called at ``worker_init``."""
    pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), io.BytesIO(), compression="zstd")


@dataclass(frozen=True, slots=True)
class Dataset:
    fs: pafs.FileSystem
    root: str  # path inside fs, no trailing slash

    def run_dir(self, run_id: str) -> str:
        return f"{self.root}/run={check_run_id(run_id)}"

    def write_part(self, run_id: str, part_name: str, rows: Sequence[dict[str, Any]]) -> str:
        """Write ``rows`` as ``part_name``.parquet under the run, atomically. Returns the path."""
        table = pa.Table.from_pylist(list(rows), schema=SCHEMA)
        return self.write_table(self.run_dir(run_id), f"{part_name}.parquet", table)

    def write_table(self, directory: str, name: str, table: pa.Table) -> str:
        self.fs.create_dir(directory, recursive=True)
        final = f"{directory}/{name}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
            self.fs.move(tmp, final)  # rename(2): atomic on one filesystem
        else:
            # Object stores publish a PUT atomically; there is no rename to use.
            pq.write_table(table, final, filesystem=self.fs, compression="zstd")
        return final

    def parquet_files(self, directory: str) -> list[str]:
        """Visible Parquet files directly under ``directory`` (temporary files excluded)."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and i.base_name.endswith(".parquet")
            and not i.base_name.startswith((".", "_"))
        )

    def read_run(self, run_id: str, columns: Iterable[str] | None = None) -> pa.Table:
        files = self.parquet_files(self.run_dir(run_id))
        cols = list(columns) if columns is not None else None
        if not files:
            return SCHEMA.empty_table().select(cols) if cols else SCHEMA.empty_table()
        tables = [pq.read_table(f, filesystem=self.fs, columns=cols, schema=SCHEMA) for f in files]
        return pa.concat_tables(tables)


def open_dataset(output: str) -> Dataset:
    """The dataset at ``output``: a local directory or a URI pyarrow understands (``s3://...``)."""
    try:
        fs, path = pafs.FileSystem.from_uri(output if "://" in output else _abs(output))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"CARNUMBER_OUTPUT={output!r}: cannot open ({exc})") from None
    return Dataset(fs, path.rstrip("/"))


def _abs(path: str) -> str:
    import os

    return os.path.abspath(path)
