"""``carnumber recognize IMAGE`` — one call, printed as JSON: checks credentials and endpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from carnumber.commands.common import settings_from

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="a local image file, or an http(s) URL the service can fetch")
    parser.add_argument("--endpoint", help="override CARNUMBER_ENDPOINT")


def main(args: argparse.Namespace) -> int:
    import httpx

    from workers.api.client import Client, Image, http_timeout
    from workers.credentials import provider_from_settings
    from workers.errors import ApiError, InputError, TransportError
    from workers.imagecheck import check_image, check_url
    from workers.message import redact_url

    settings = settings_from(args, endpoint=args.endpoint)
    creds = provider_from_settings(settings)
    if args.image.startswith(("http://", "https://")):
        check_url(args.image)
        image = Image(url=args.image)
    else:
        path = Path(args.image)
        if not path.is_file():
            raise InputError(
                f"{args.image}: no such file (give a local image path or an http(s) URL)"
            )
        data = path.read_bytes()
        check_image(data)
        image = Image(body=data)
    with httpx.Client(timeout=http_timeout(settings)) as http:
        try:
            result = Client(settings.endpoint, creds, http).recognize(image)
        except (ApiError, TransportError) as exc:
            err = {
                "error": exc.code,
                "message": exc.message,
                "status": getattr(exc, "status", None),
                "request_id": getattr(exc, "request_id", None),
                "verdict": str(exc.verdict),
                "endpoint": redact_url(settings.endpoint),
            }
            print(json.dumps(err, ensure_ascii=False, indent=2))
            print(f"carnumber recognize: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    print(json.dumps(result.to_json(), ensure_ascii=False, indent=2))
    return 0
