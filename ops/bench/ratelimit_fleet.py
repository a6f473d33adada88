"""One case of the rate-limit benchmark: local server → producer → Celery worker nodes, measured.

:func:`run_case` starts the local server with ``qps`` (replay recognizer) in this process, with
:class:`~ratelimit_measure.RecordingStats` so every accepted call's arrival time is known; starts
the case's Celery worker nodes as child processes (``celery -A workers worker -n NAME``), all on one
AccessKey; waits until every node answers a ping; in ``celery`` mode sets Celery's own per-worker
``rate_limit`` on the task with a remote-control command; enqueues the images; measures a steady
window that starts ``warmup_s`` after the first accepted call; then stops everything.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from ratelimit_measure import (
    CaseResult,
    RecordingStats,
    count_in,
    gap_stats,
    max_per_whole_second,
    max_sliding,
)
from ratelimit_trace import read_trace, trace_stats

from carnumber.commands.common import configure_celery, run_store
from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.server import RunningServer, start_server
from ocrserver.truth import distinct_copy, make_test_image
from workers.config import Settings

__all__ = ["KEY_ID", "Case", "make_archive", "run_case"]

KEY_ID, SECRET = "rlbenchid", "rlbenchsecret"
TASK_NAME = "carnumber.process_chunk"


@dataclass(frozen=True, slots=True)
class Case:
    """What one case runs. ``mode``: ``limiter`` (our global limiter, ``CARNUMBER_QPS=qps``,
    burst 1, the product's pacing guard) or ``celery`` (``CARNUMBER_QPS=0`` and Celery's
    ``rate_limit`` of ``qps``/s on each node). ``nodes``: (node name, pool processes) per Celery
    worker; ``concurrency``: calls in flight per process (``CARNUMBER_CONCURRENCY``);
    ``latency_ms``: added by the server per call; ``guard_ms``: ``CARNUMBER_RATE_GUARD_MS`` for
    the workers (``None``: the product's default); ``pool``: each node's Celery pool (with
    ``threads``, a node's "processes" are threads of one process sharing its call slots;
    ``default``: ``carnumber worker`` as it comes); ``server_qps``: the service's real limit
    when it is lower than the workers' ``qps`` (``None``: the same); ``throttle_random``: the
    share of calls the server refuses at random within its limit (``--throttle-random``)."""

    mode: str
    qps: int
    seconds: float
    warmup_s: float
    nodes: tuple[tuple[str, int], ...]
    concurrency: int
    chunk_size: int
    images: int
    latency_ms: float = 0.0
    label: str = ""
    guard_ms: float | None = None
    pool: str = "prefork"  # every node's pool: prefork, threads, or default (`carnumber worker` as is)
    server_qps: int | None = None
    throttle_random: float = 0.0

    @property
    def limit(self) -> int:
        """The service's real limit, calls per whole second."""
        return self.qps if self.server_qps is None else self.server_qps

    @property
    def name(self) -> str:
        return self.label or self.mode


@dataclass(slots=True)
class _Running:
    server: RunningServer
    stats: RecordingStats
    workers: list[Child] = field(default_factory=list)


def make_archive(folder: Path, n: int, distinct: int = 100) -> None:
    """``n`` PNG files with one plate each over ``distinct`` pictures, each file with bytes of its
    own (``distinct_copy``: copies of one picture would be called once)."""
    folder.mkdir(parents=True)
    pool = [make_test_image([{"text": f"苏E{i:05d}", "type": "小型汽车"}]) for i in range(min(n, distinct))]
    for i, data in enumerate(pool):
        (folder / f"pool-{i:04d}.png").write_bytes(data)
    for i in range(max(0, n - distinct)):
        (folder / f"img-{i:07d}.png").write_bytes(distinct_copy(pool[i % len(pool)], i))


def _settings(case: Case, server_url: str, redis_url: str, work: Path) -> tuple[Settings, dict[str, str]]:
    tag = f"rlbench-{uuid.uuid4().hex[:10]}"
    chunks = -(-case.images // case.chunk_size)
    env = {
        "REDIS_URL": redis_url,
        "CARNUMBER_ENDPOINT": server_url,
        "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
        "CARNUMBER_OUTPUT": str(work / "out"),
        "CARNUMBER_QUEUE": f"{tag}:queue",
        "CARNUMBER_KEY_PREFIX": tag,
        "CARNUMBER_QPS": str(case.qps) if case.mode == "limiter" else "0",
        "CARNUMBER_BURST": "1",
        "CARNUMBER_CHUNK_SIZE": str(case.chunk_size),
        "CARNUMBER_CONCURRENCY": str(case.concurrency),
        "CARNUMBER_QUEUE_HIGH_WATER": str(chunks + 1),  # publish everything up front
    }
    if case.guard_ms is not None:
        env["CARNUMBER_RATE_GUARD_MS"] = repr(case.guard_ms)
    return Settings.from_env(env), env


def _wait_for_nodes(names: Sequence[str], workers: Sequence[Child], timeout_s: float = 90.0) -> None:
    from workers.celery import app

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in workers:
            if w.proc.poll() is not None:
                raise RuntimeError("a worker exited at start-up:\n" + "\n".join(w.lines[-30:]))
        answered = {n for reply in app.control.ping(destination=list(names), timeout=1.0) for n in reply}
        if answered >= set(names):
            return
    raise RuntimeError(f"worker nodes did not answer a ping within {timeout_s:.0f} s")


def _set_celery_rate_limit(names: Sequence[str], qps: int) -> None:
    """Celery's own per-node task rate limit, set by remote control on every node."""
    from workers.celery import app

    replies = app.control.rate_limit(
        TASK_NAME, f"{qps}/s", destination=list(names), reply=True, timeout=5.0
    )
    ok = {n for reply in replies for n, answer in reply.items() if "ok" in answer}
    if ok != set(names):
        raise RuntimeError(f"rate_limit not confirmed by every node: {replies}")


def _enqueue(case: Case, settings: Settings, archive: Path, client: redis.Redis) -> str:
    from producers.enqueue import enqueue
    from producers.sources import open_source
    from workers.tasks import publish_chunk

    runs = run_store(settings, client)
    run_id = "bench"
    runs.create(run_id, "rate-limit bench")
    enqueue(
        itertools.islice(open_source(str(archive), settings), case.images),
        run_id,
        runs=runs,
        publish=lambda chunk: publish_chunk(chunk, settings.queue),
        queue_depth=lambda: int(client.llen(settings.queue)),
        chunk_size=settings.chunk_size,
        queue_high_water=settings.queue_high_water,
    )
    runs.touch(run_id)
    return run_id


def _first_accepted(running: _Running, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, accepted, _ = running.stats.snapshot()
        if accepted:
            return accepted[0]
        _check_alive(running.workers)
        time.sleep(0.05)
    tails = "\n".join(line for w in running.workers for line in w.lines[-15:])
    raise RuntimeError(f"no call reached the server within {timeout_s:.0f} s; workers said:\n{tails}")


def _check_alive(workers: Sequence[Child]) -> None:
    for w in workers:
        if w.proc.poll() is not None:
            raise RuntimeError(f"worker exited (rc {w.proc.returncode}):\n" + "\n".join(w.lines[-30:]))


def _stop(running: _Running, client: redis.Redis, settings: Settings | None) -> None:
    """Stop the workers (warm: running chunks finish, at most 20 s) and the server; delete this
    case's keys. ``settings`` is None when the case failed before it had any."""
    if settings is not None:
        client.delete(settings.queue)  # nothing new starts
    for w in running.workers:
        if w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + 20.0
    for w in running.workers:
        w.stop(timeout_s=max(0.1, deadline - time.monotonic()))
    running.server.stop()
    if settings is None:
        return
    keys = list(client.scan_iter(f"{settings.key_prefix}*", count=1000))
    # Kombu's bindings of this case's queue (older and newer naming); pidbox bindings are shared.
    keys += [settings.queue, f"_kombu.binding.{settings.queue}",
             f"_kombu.binding_permanent.{settings.queue}"]
    client.delete(*keys)


def _trace_server(server: RunningServer, stats: RecordingStats) -> None:
    """Let the server note each call's nonce, so an accepted call's arrival can be matched with the
    worker's trace (``ratelimit_probe``). Benchmark-only wrapping of the verifier."""
    verify = server.app.verifier.verify

    def traced(method: str, params: Any, headers: Mapping[str, str], body: bytes) -> Any:
        stats.last_nonce = headers.get("x-acs-signature-nonce")
        return verify(method, params, headers, body)

    server.app.verifier.verify = traced  # type: ignore[method-assign]


def _count_random_refusals(server: RunningServer, stats: RecordingStats) -> None:
    """Tell the server's random refusals (``--throttle-random``) from its limit's, in ``stats``.
    Benchmark-only wrapping."""
    refused = server.app._refused_at_random

    def counted() -> bool:
        if refused():
            stats.random_refusals += 1
            return True
        return False

    server.app._refused_at_random = counted  # type: ignore[method-assign]


def _probe_env(trace_dir: Path) -> dict[str, str]:
    """What a worker needs to load :mod:`ratelimit_probe` (``--include=ratelimit_probe``)."""
    here = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}
    env["RLBENCH_TRACE_DIR"] = str(trace_dir)
    return env


def run_case(
    case: Case,
    archive: Path,
    redis_url: str,
    work: Path,
    log: bool = True,
    dump: Path | None = None,
    trace: bool = False,
) -> CaseResult:
    """Run ``case`` and measure it. ``archive`` holds at least ``case.images`` images; ``work`` is
    a scratch folder for the output dataset. ``trace``: load :mod:`ratelimit_probe` into the
    workers and add delivery statistics (``CaseResult.trace``). Raises ``RuntimeError`` when a
    worker dies or no call arrives."""
    server = start_server(
        ServerConfig(keys=f"{KEY_ID}:{SECRET}", qps=case.limit, latency_ms=case.latency_ms,
                     throttle_random=case.throttle_random)
    )
    running = _Running(server, RecordingStats())
    server.app.stats = running.stats
    _count_random_refusals(server, running.stats)
    client = redis.Redis.from_url(redis_url)
    settings: Settings | None = None
    trace_dir = work / "trace"
    try:
        settings, env = _settings(case, server.url, redis_url, work)
        extra: list[str] = []
        if trace:
            env.update(_probe_env(trace_dir))
            extra.append("--include=ratelimit_probe")
            trace_dir.mkdir(parents=True)
            _trace_server(server, running.stats)
        configure_celery(settings)
        names = [name for name, _ in case.nodes]
        for name, processes in case.nodes:
            if case.pool == "default":
                # `carnumber worker` exactly as an operator starts it: no pool, -c or concurrency.
                # With --trace, Celery's own command with the same pool and size (the CLI takes
                # no --include).
                defaults = {k: v for k, v in env.items() if k != "CARNUMBER_CONCURRENCY"}
                running.workers.append(
                    start_worker(defaults, concurrency=None, hostname=name, via_cli=True)
                    if not trace
                    else start_worker(defaults, concurrency=2, hostname=name,
                                      extra=[*extra, "--pool=threads"])
                )
                continue
            running.workers.append(
                start_worker(env, concurrency=processes, hostname=name,
                             extra=[*extra, f"--pool={case.pool}"])
            )
        _wait_for_nodes(names, running.workers)
        if case.mode == "celery":
            _set_celery_rate_limit(names, case.qps)
        _enqueue(case, settings, archive, client)
        first = _first_accepted(running, timeout_s=30.0)
        start = first + case.warmup_s
        end = start + case.seconds
        if log:
            print(f"  {case.name} Q={case.qps}: calls flowing; measuring {case.seconds:g} s "
                  f"after {case.warmup_s:g} s warm-up", flush=True)
        # Calls admitted before ``end`` may reach the server up to the added latency later.
        settle = end + case.latency_ms / 1000.0 + 0.3
        while time.time() < settle:
            _check_alive(running.workers)
            time.sleep(min(1.0, max(0.01, settle - time.time())))
        requests, accepted, throttles = running.stats.snapshot()
        random_refusals = running.stats.random_refusals  # with the snapshot, not after the stop
        arrivals = running.stats.arrivals_by_nonce()
    finally:
        _stop(running, client, settings)
        client.close()
    requests.sort()
    accepted.sort()
    traced = read_trace(trace_dir, arrivals, first) if trace else []
    if dump is not None:
        dump.write_text(json.dumps({
            "case": case.name, "qps": case.qps, "first": first, "window": [start, end],
            "requests": requests, "accepted": accepted, "throttled": throttles, "trace": traced,
        }))
    steady = [t for t in accepted if start <= t < end]
    throttles.sort()
    return CaseResult(
        mode=case.name,
        qps=case.qps,
        limit=case.limit,
        achieved_per_s=count_in(accepted, start, end) / case.seconds,
        sent_per_s=count_in(requests, start, end) / case.seconds,
        throttled=len(throttles),
        max_accepted=max_per_whole_second(accepted),
        max_sent=max_per_whole_second(requests),
        max_sent_sliding=max_sliding(requests),
        duration_s=case.seconds,
        gaps=gap_stats(steady, 1.0 / case.qps),
        throttled_at_s=tuple(round(t - first, 3) for t in throttles),
        trace=trace_stats(traced, start, end, 1.0 / case.qps) if trace else None,
        requests=len(requests),
        random_refusals=random_refusals,
        throttled_in_window=count_in(throttles, start, end),
        requests_in_window=count_in(requests, start, end),
    )
