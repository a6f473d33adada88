"""``carnumber``: one console script, one subcommand per module.

Each command module exposes ``add_arguments(parser)`` and ``main(args) -> int`` and keeps its
top-level imports light (heavy ones inside ``main``). :class:`CarnumberError` is caught once, here,
and printed as one line: no tracebacks for configuration or input mistakes.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from workers.errors import CarnumberError

__all__ = ["main"]

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "recognize": ("carnumber.commands.recognize", "call the API once for one image and print JSON"),
    "serve": ("ocrserver.cli", "run the local RecognizeCarNumber-compatible server"),
    "enqueue": ("carnumber.commands.enqueue", "read a source and enqueue its images for a run"),
    "plan": ("carnumber.commands.plan", "count the calls, time, quota and cost a source needs"),
    "worker": (
        "carnumber.commands.worker",
        "start a Celery worker (same as celery -A workers worker)",
    ),
    "status": ("carnumber.commands.status", "show a run's progress and state"),
    "pause": ("carnumber.commands.pause", "stop one run's calls on every host (resume continues it)"),
    "cancel": ("carnumber.commands.cancel", "stop a run for good and take its chunks off the queue"),
    "resume": ("carnumber.commands.resume", "clear a stop or pause and re-publish a run's parked images"),
    "retry-failures": (
        "carnumber.commands.retry_failures",
        "re-enqueue a run's retryable failures",
    ),
    "compact": ("carnumber.commands.compact", "merge a run's part files into large Parquet files"),
    "report": ("carnumber.commands.report", "the morning summary of a run (outcomes, failures, calls, cost)"),
    "verify": ("carnumber.commands.verify", "check every enqueued image of a run has one outcome"),
    "metrics": ("carnumber.commands.metrics", "serve Prometheus metrics read from Redis"),
    "demo": ("carnumber.demo", "run the whole pipeline on a generated sample archive"),
    "eval": ("carnumber.commands.eval", "measure the offline recognizer on labelled photos"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carnumber",
        description="Batch licence-plate OCR through Alibaba Cloud RecognizeCarNumber.",
    )
    parser.add_argument("--config", help="TOML settings file (also CARNUMBER_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Even with -v: these libraries log request URLs and headers (signatures) at DEBUG/INFO.
    for name in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "s3transfer", "oss2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args._module.main(args) or 0)
    except CarnumberError as exc:
        print(f"carnumber {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
