"""``carnumber compact RUN_ID`` — merge a run's part files into a few large Parquet files."""

from __future__ import annotations

import argparse

from carnumber.commands.common import settings_from

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id")
    parser.add_argument("--rows-per-file", type=int, default=500_000)


def main(args: argparse.Namespace) -> int:
    from carnumber.progress import Progress
    from workers.sink.compact import compact_run
    from workers.sink.dataset import open_dataset

    settings = settings_from(args)
    dataset = open_dataset(settings.output)
    passes = {"read": "pass 1/2 (read keys)", "write": "pass 2/2 (write)"}
    with Progress(f"compact {args.run_id}", unit="parts") as progress:
        report = compact_run(
            dataset,
            args.run_id,
            rows_per_file=args.rows_per_file,
            on_progress=lambda phase, done, total: progress.update(
                completed=done, total=total, step=passes[phase]
            ),
        )
    print(
        f"run {args.run_id}: {report.parts_in} parts ({report.rows_in} rows) -> {report.files_out} files, "
        f"{report.rows_out} rows, {report.images} images, in {dataset.run_dir(args.run_id)}"
    )
    return 0
