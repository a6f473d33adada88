"""``python -m ocrserver [serve flags]``: the same as ``carnumber serve``, without loading the
other subcommands (used by :func:`ocrserver.server.spawn_server` and the benchmark)."""

from __future__ import annotations

import argparse
import logging
import sys

from ocrserver import cli
from workers.errors import CarnumberError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ocrserver", description=cli.__doc__)
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return cli.main(args)
    except CarnumberError as exc:
        print(f"carnumber serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
