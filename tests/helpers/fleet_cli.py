"""The fleet's commands as an operator runs them, for tests against a Redis of their own (TLS,
Sentinel): ``carnumber`` commands and Flower as child processes with a given environment."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ocrserver.truth import make_test_image

__all__ = ["ROOT", "carnumber", "flower", "flower_queue_lengths", "write_archive"]

ROOT = Path(__file__).resolve().parents[2]
FLOWER_LOGIN = "ops:flower-login-3141"


def write_archive(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"cam-{i:03d}.png").write_bytes(make_test_image([{"text": f"浙B{i:05d}"}]))
    return folder


def carnumber(argv: list[str], env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "carnumber.cli", *argv], env={**os.environ, **env}, capture_output=True,
        text=True, timeout=timeout_s, check=False, cwd=ROOT,
    )  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def flower(env: dict[str, str], log: Path, timeout_s: float = 60) -> Iterator[httpx.Client]:
    """``celery -A workers flower`` as Compose starts it (a login); yields a client logged in."""
    port = _free_port()
    celery = [sys.executable, "-m", "celery", "-A", "workers", "flower"]
    argv = [*celery, f"--port={port}", "--address=127.0.0.1", f"--basic-auth={FLOWER_LOGIN}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthcheck", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"flower did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        with httpx.Client(base_url=url, auth=tuple(FLOWER_LOGIN.split(":")), timeout=30) as client:
            yield client
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def flower_queue_lengths(env: dict[str, str], queue: str) -> list[dict]:
    """Flower's own broker client (its Broker tab and ``/api/queues/length``), built the way
    Flower builds it from our Celery app, in a process with ``env``."""
    code = (
        "import asyncio, json\n"
        "from flower.utils.broker import Broker\n"
        "from workers.celery import app\n"
        "with app.connection() as conn:\n"
        "    uri = conn.as_uri(include_password=True)\n"
        "conf = app.conf\n"
        "b = Broker(uri, broker_options=conf.broker_transport_options, broker_use_ssl=conf.broker_use_ssl)\n"
        f"print(json.dumps(asyncio.run(b.queues([{queue!r}]))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
