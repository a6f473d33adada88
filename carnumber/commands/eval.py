"""``carnumber eval`` — measure the offline recognizer on labelled photos, with a progress bar
(``ocrserver.evaluate`` does the work; this wrapper only adds the progress display)."""

from __future__ import annotations

import argparse

from ocrserver import evaluate

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    evaluate.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from carnumber.progress import Progress

    with Progress("eval", unit="images") as bar:
        return evaluate.main(args, on_image=lambda done, total: bar.update(completed=done, total=total))
