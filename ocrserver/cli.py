"""``carnumber serve``: run the local RecognizeCarNumber-compatible server in the foreground.

Prints one line, ``carnumber serve: listening on http://HOST:PORT``, once it accepts calls
(``--port 0`` picks a free port). Options and fault injection are documented in ``ops/server.md``.
Top-level imports stay light: the server itself is imported inside :func:`main`.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ocrserver.config import ServerConfig

__all__ = ["add_arguments", "build_config", "main"]


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate (0..1)") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate must be in 0..1")
    return value


def _rate_ms(text: str) -> tuple[float, float]:
    rate, sep, ms = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected RATE:MS, e.g. 0.1:500")
    try:
        millis = float(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: MS must be a number") from None
    if millis < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: MS must be >= 0")
    return _rate(rate), millis


def _rate_code(text: str) -> tuple[float, str]:
    rate, _, code = text.partition(":")
    return _rate(rate), code or "InternalError"


def _rate_shape(text: str) -> tuple[float, str]:
    rate, _, shape = text.partition(":")
    return _rate(rate), shape or "truncated"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    srv = parser.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8080, help="listen port; 0 = pick a free one")
    srv.add_argument(
        "--keys",
        default=None,
        help="accepted AccessKeys, ID:SECRET[:STS_TOKEN][,...] (also CARNUMBER_SERVER_KEYS; "
        "default testid:testsecret)",
    )
    srv.add_argument(
        "--qps", type=float, default=0,
        help="calls per whole second per account (a whole number); 0 = no limit",
    )
    srv.add_argument(
        "--accounts",
        default=None,
        help="ID=ACCOUNT[,...]: keys of one main account share one --qps limit, as RAM users' "
        "keys do (also CARNUMBER_SERVER_ACCOUNTS; default: every key is its own account)",
    )
    srv.add_argument(
        "--throttle-random", type=_rate, default=0.0, metavar="RATE",
        help="refuse this share of calls with Throttling.User at random even within --qps, at "
        "the gateway and not counted against it, as a real gateway's own windows and clocks do "
        "now and then (e.g. 0.002: one call in 500)",
    )
    srv.add_argument(
        "--throttle-retry-after",
        action="store_true",
        help="send x-acs-retry-after (ms to the next second) with QPS refusals (off: the real "
        "service is not known to send it)",
    )
    srv.add_argument("--recognizer", default="replay", help="replay (default) or onnx")
    srv.add_argument("--truth", default=None, help="replay: JSONL sidecar of known plates")
    srv.add_argument("--model-dir", default=None, help="onnx: directory of the model files")
    srv.add_argument(
        "--allow-url-host",
        action="append",
        default=[],
        metavar="HOST",
        help="also fetch Url images from HOST (repeatable; loopback is always allowed)",
    )
    srv.add_argument("--url-timeout-s", type=float, default=5.0, help="Url download deadline")
    srv.add_argument("--latency-ms", type=float, default=0.0, help="fixed added latency per call")
    srv.add_argument(
        "--expand-refs",
        action="store_true",
        help='write structure_list[0] in full instead of {"$ref": "$.data"}',
    )
    srv.add_argument("--max-batch", type=int, default=8, help="batching recognizers: batch size")
    srv.add_argument("--max-wait-ms", type=float, default=5.0, help="batching recognizers: wait")
    srv.add_argument("--log-level", default="warning", help="uvicorn log level")

    flt = parser.add_argument_group("fault injection (rates 0..1, applied to signed, valid calls)")
    flt.add_argument("--fault-500", type=_rate, default=0.0, metavar="RATE", help="InternalError")
    flt.add_argument("--fault-503", type=_rate, default=0.0, metavar="RATE",
                     help="ServiceUnavailable")
    flt.add_argument("--fault-504", type=_rate, default=0.0, metavar="RATE", help="ServiceTimeout")
    flt.add_argument("--fault-throttle", type=_rate, default=0.0, metavar="RATE",
                     help="Throttling.User regardless of --qps")
    flt.add_argument("--fault-slow", type=_rate_ms, default=(0.0, 0.0), metavar="RATE:MS",
                     help="delay this share of calls by MS before answering")
    flt.add_argument("--fault-hang", type=_rate, default=0.0, metavar="RATE",
                     help="hold the connection --hang-s without answering")
    flt.add_argument("--hang-s", type=float, default=60.0, help="how long a hang lasts (60)")
    flt.add_argument("--fault-reset", type=_rate, default=0.0, metavar="RATE",
                     help="drop the TCP connection (RST) instead of answering")
    flt.add_argument("--fault-malformed", type=_rate_shape, default=(0.0, "truncated"),
                     metavar="RATE[:SHAPE]", help="HTTP 200 whose body is not the envelope; SHAPE: "
                     "truncated (default), html, empty, no-data, bad-data, wrong-types")
    flt.add_argument("--fault-error-200", type=_rate_code, default=(0.0, "InternalError"),
                     metavar="RATE[:CODE]", help="HTTP 200 whose body is an error (Code)")
    flt.add_argument("--seed", type=int, default=None, help="seed of the fault RNG")


def build_config(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    """The :class:`~ocrserver.config.ServerConfig` for parsed ``args``. Raises ConfigError."""
    from ocrserver.config import DEFAULT_KEYS, ServerConfig
    from ocrserver.faults import FaultConfig
    from ocrserver.intake import LOOPBACK_HOSTS
    from workers.errors import ConfigError

    env = os.environ if environ is None else environ
    keys = args.keys or env.get("CARNUMBER_SERVER_KEYS") or DEFAULT_KEYS
    slow_rate, slow_ms = args.fault_slow
    e200_rate, e200_code = args.fault_error_200
    malformed_rate, malformed_shape = args.fault_malformed
    try:
        faults = FaultConfig(
            rate_500=args.fault_500,
            rate_503=args.fault_503,
            rate_504=args.fault_504,
            rate_throttle=args.fault_throttle,
            rate_hang=args.fault_hang,
            rate_reset=args.fault_reset,
            rate_malformed=malformed_rate,
            malformed_shape=malformed_shape,
            rate_error_200=e200_rate,
            error_200_code=e200_code,
            rate_slow=slow_rate,
            slow_ms=slow_ms,
            hang_s=args.hang_s,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return ServerConfig(
        host=args.host,
        port=args.port,
        keys=keys,
        qps=args.qps,
        accounts=args.accounts or env.get("CARNUMBER_SERVER_ACCOUNTS") or "",
        recognizer=args.recognizer,
        truth_path=args.truth,
        model_dir=args.model_dir,
        allowed_url_hosts=LOOPBACK_HOSTS | frozenset(args.allow_url_host),
        url_timeout_s=args.url_timeout_s,
        latency_ms=args.latency_ms,
        faults=faults,
        seed=args.seed,
        throttle_retry_after=args.throttle_retry_after,
        throttle_random=args.throttle_random,
        expand_refs=args.expand_refs,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        log_level=args.log_level,
    )


def main(args: argparse.Namespace) -> int:
    from ocrserver.server import URL_LINE_PREFIX, run_forever

    config = build_config(args)

    def announce(url: str) -> None:
        print(f"{URL_LINE_PREFIX}{url}", flush=True)

    run_forever(config, announce)
    return 0
