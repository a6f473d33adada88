"""Which images of a run ended in a retryable failure (their latest outcome, not any outcome)."""

from __future__ import annotations

import pyarrow.compute as pc

from workers.message import ImageRef
from workers.sink.compact import best_outcomes, read_keys
from workers.sink.dataset import Dataset
from workers.sink.schema import STATUS_FAILED

__all__ = ["retryable_failures"]


def retryable_failures(dataset: Dataset, run_id: str) -> list[ImageRef]:
    files = dataset.parquet_files(dataset.run_dir(run_id))
    keys, _ = read_keys(dataset, files, extra=("source", "meta", "retryable"))
    best = best_outcomes(keys)
    failed = best.filter(
        pc.and_(pc.equal(best["status"], STATUS_FAILED), pc.fill_null(best["retryable"], False))
    )
    return [
        ImageRef(source=row["source"], image_id=row["image_id"], meta=dict(row["meta"] or []))
        for row in failed.select(["image_id", "source", "meta"]).to_pylist()
    ]
