"""The monitoring stack for real, on loopback: a real Celery worker runs a run against the local
server (with injected 503s and throttles, so error codes exist), Flower listens to the task
events, ``carnumber metrics`` exports Redis, and Debian's ``prometheus`` scrapes both every second.

* Flower's HTTP API lists the run's tasks with their readable name and arguments (run, chunk,
  image count) and no secret or image source;
* every PromQL expression of the Grafana dashboard and of the alert rules is valid and returns
  series from that real run: the dashboard's as they are (Grafana variables filled in), the
  rules' down to each operand of their comparisons and set operators (a rule that is not firing
  returns nothing as a whole, but each metric it compares must exist);
* Prometheus loads alerts.yml with every rule healthy.

Skips with the reason when ``prometheus`` is not on PATH (``apt-get install prometheus``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from carnumber.localstack import Child, start_worker
from ocrserver.config import ServerConfig
from ocrserver.faults import FaultConfig
from ocrserver.server import start_server
from ocrserver.truth import make_test_image
from workers.books.runs import RunStore
from workers.keys import Keys

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "carnumber.json"
ALERTS = ROOT / "ops" / "prometheus" / "alerts.yml"
PROMETHEUS = shutil.which("prometheus")
KEY_ID, SECRET = "liveid", "live-secret-value-4711"
FLOWER_AUTH = ("ops", "flower-pass-0815")
IMAGES = 48


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout_s: float, auth: tuple[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, auth=auth, timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {timeout_s}s")
        time.sleep(0.2)


@dataclass
class Stack:
    run_id: str
    prometheus: str
    flower: str
    chunks: int


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("wb")
    try:
        return subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT
        )
    finally:
        fh.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not on PATH (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("live")
    prefix = f"cntest:{uuid.uuid4().hex[:12]}"
    run_id = f"live-{uuid.uuid4().hex[:6]}"
    archive = tmp / "archive"
    archive.mkdir()
    for i in range(IMAGES):
        plates = [{"text": f"浙C{i:05d}", "type": "小型汽车" if i % 3 else "大型汽车"}]
        (archive / f"cam3-{i:03d}.png").write_bytes(make_test_image(plates))
    (archive / "cam3-999.png").write_bytes(b"%PDF-1.7\n" + b"x" * 300)  # a final failure
    faults = FaultConfig(rate_503=0.08, rate_throttle=0.08)
    procs: list[subprocess.Popen[bytes]] = []
    children: list[Child] = []
    with start_server(
        ServerConfig(keys=f"{KEY_ID}:{SECRET}", latency_ms=40, faults=faults, seed=5)
    ) as server:
        env = {
            "CARNUMBER_ENDPOINT": server.url,
            "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
            "REDIS_URL": redis_url,
            "CARNUMBER_KEY_PREFIX": prefix,
            "CARNUMBER_QUEUE": f"{prefix}:queue",
            "CARNUMBER_OUTPUT": str(tmp / "out"),
            "CARNUMBER_CHUNK_SIZE": "4",
            "CARNUMBER_QPS": "15",
            "CARNUMBER_PRICE_PER_1000_CALLS": "1.5",  # the cost panel needs a price
            "CARNUMBER_QUOTA": "100000",
            "CARNUMBER_MAX_ATTEMPTS": "2",
            "CARNUMBER_RETRY_BASE_S": "0.05",
            "CARNUMBER_RETRY_CAP_S": "0.2",
        }
        try:
            children.append(start_worker(env, concurrency=2, hostname=f"live{uuid.uuid4().hex[:6]}@%h"))
            flower_port = _free_port()
            flower = f"http://127.0.0.1:{flower_port}"
            procs.append(
                _spawn(
                    [
                        sys.executable, "-m", "celery", "-A", "workers", "flower",
                        f"--port={flower_port}", "--address=127.0.0.1",
                        f"--basic-auth={FLOWER_AUTH[0]}:{FLOWER_AUTH[1]}",
                    ],
                    env,
                    tmp / "flower.log",
                )
            )  # fmt: skip
            metrics_port = _free_port()
            procs.append(
                _spawn(
                    [sys.executable, "-m", "carnumber.cli", "metrics", "--port", str(metrics_port)],
                    env,
                    tmp / "metrics.log",
                )
            )
            prom_port = _free_port()
            prom_dir = tmp / "prometheus"
            prom_dir.mkdir()
            shutil.copy(ALERTS, prom_dir / "alerts.yml")
            config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": ["alerts.yml"],
                "scrape_configs": [
                    {"job_name": "carnumber", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
                    {"job_name": "flower", "static_configs": [{"targets": [f"127.0.0.1:{flower_port}"]}]},
                ],
            }
            (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
            procs.append(
                _spawn(
                    [
                        PROMETHEUS,
                        f"--config.file={prom_dir / 'prometheus.yml'}",
                        f"--storage.tsdb.path={prom_dir / 'data'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn",
                    ],
                    {},
                    tmp / "prometheus.log",
                )
            )
            prometheus = f"http://127.0.0.1:{prom_port}"
            _wait_http(f"{flower}/healthcheck", 60)
            _wait_http(f"http://127.0.0.1:{metrics_port}/metrics", 30)
            _wait_http(f"{prometheus}/-/ready", 30)

            done = subprocess.run(
                [sys.executable, "-m", "carnumber.cli", "enqueue", str(archive), "--run", run_id],
                env={**os.environ, **env},
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            client = redis.Redis.from_url(redis_url)
            store = RunStore(client, Keys(prefix))
            deadline = time.monotonic() + 90
            while True:
                s = store.get(run_id)
                if s is not None and s.state == "done" and s.outstanding == 0:
                    break
                assert time.monotonic() < deadline, (s, children[0].lines[-20:])
                time.sleep(0.3)
            time.sleep(4)  # a few more scrapes, for rate() over the run's end
            yield Stack(run_id, prometheus, flower, chunks=-(-(IMAGES + 1) // 4))
        finally:
            for proc in reversed(procs):
                _stop(proc)
            for child in children:
                child.stop()
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


# -- Flower ----------------------------------------------------------------------------------
def test_flower_lists_the_runs_tasks_with_readable_args_and_no_secret(stack: Stack) -> None:
    deadline = time.monotonic() + 20
    while True:
        reply = httpx.get(f"{stack.flower}/api/tasks", params={"limit": 1000}, auth=FLOWER_AUTH, timeout=10)
        reply.raise_for_status()
        tasks = [t for t in reply.json().values() if f"run={stack.run_id} " in str(t.get("args"))]
        if len(tasks) == stack.chunks and all(t.get("state") == "SUCCESS" for t in tasks):
            break
        assert time.monotonic() < deadline, (len(tasks), stack.chunks, [t.get("state") for t in tasks])
        time.sleep(0.5)
    assert {t["name"] for t in tasks} == {"carnumber.process_chunk"}
    readable = rf"run={re.escape(stack.run_id)} chunk=\d{{7}} images=[1-4]"
    for t in tasks:
        assert re.fullmatch(rf"\[?'?{readable}'?\]?", t["args"]), t["args"]
        assert t["worker"].startswith("live")
        assert "answered" in (t.get("result") or "")
    text = reply.text
    for secret in (SECRET, "Signature", "cam3-", "file://", "image_bytes"):
        assert secret not in text, secret
    # Workers page: the node answers Flower's inspect
    workers = httpx.get(
        f"{stack.flower}/api/workers", params={"refresh": "true"}, auth=FLOWER_AUTH, timeout=20
    )
    assert any(name.startswith("live") for name in workers.json())


# -- Prometheus ------------------------------------------------------------------------------
_SPLIT = re.compile(r"\s+(?:and|or|unless)\s+|==|!=|>=|<=|(?<![=!~])>|<|(?<![eE])[-+]|\*|/|%")
_MODIFIER = re.compile(r"^\s*(?:bool\s+)?(?:(?:on|ignoring|group_left|group_right)\s*\([^)]*\)\s*)*")
_NUMBER = re.compile(r"^\s*-?\d+(?:\.\d+)?(?:e-?\d+)?\s*$")


def operands(expr: str) -> list[str]:
    """The operands of ``expr``'s top-level binary operators (set, comparison, arithmetic),
    recursing into an operand wrapped in parentheses; numbers are left out."""
    parts: list[str] = []
    depth = 0
    quote = ""
    start = 0
    i = 0
    while i < len(expr):
        c = expr[i]
        if quote:
            quote = "" if c == quote and expr[i - 1] != "\\" else quote
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            m = _SPLIT.match(expr, i)
            if m and m.end() > m.start():
                parts.append(expr[start:i])
                start = i = m.end()
                continue
        i += 1
    parts.append(expr[start:])
    out: list[str] = []
    for part in parts:
        part = _MODIFIER.sub("", part).strip()
        if not part or _NUMBER.match(part):
            continue
        if part.startswith("(") and _closing(part) == len(part) - 1:
            out.extend(operands(part[1:-1]))
        else:
            out.append(part)
    return out


def _closing(text: str) -> int:
    depth = 0
    for i, c in enumerate(text):
        depth += c == "("
        depth -= c == ")"
        if depth == 0:
            return i
    return -1


def test_operand_splitter() -> None:
    expr = (
        'increase(a_total[15m]) == 0 and on(run_id) b > 0\n and on(run_id) c{state=~"running|enqueuing"} == 1'
    )
    assert operands(expr) == ["increase(a_total[15m])", "b", 'c{state=~"running|enqueuing"}']
    assert operands("(sum(f) or vector(0)) == 0 and on() sum(g) > 0") == ["sum(f)", "vector(0)", "sum(g)"]
    assert operands('x{a="1"} - time()') == ['x{a="1"}', "time()"]
    assert operands("rate(x[1m]) / clamp_min(y, 1e-3)") == ["rate(x[1m])", "clamp_min(y, 1e-3)"]


def _query(prometheus: str, expr: str) -> dict:
    reply = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = reply.json()
    assert reply.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]


def _has_series(data: dict) -> bool:
    if data["resultType"] in ("scalar", "string"):
        return True
    return bool(data["result"])


def _dashboard_exprs(run_id: str) -> list[tuple[str, str]]:
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$__rate_interval", "30s")
                .replace("$account", ".+")
                .replace("$run", run_id)  # letters, digits and "-": no regex escaping needed
            )
            assert "$" not in expr, expr
            out.append((panel["title"], expr))
    return out


def test_every_dashboard_expression_returns_series_from_the_real_run(stack: Stack) -> None:
    exprs = _dashboard_exprs(stack.run_id)
    assert len(exprs) >= 20
    empty = []
    for title, expr in exprs:
        if not _has_series(_query(stack.prometheus, expr)):
            empty.append((title, expr))
        for part in operands(expr):
            if not _has_series(_query(stack.prometheus, part)):
                empty.append((title, part))
    assert not empty, empty
    # The template variables' label_values() queries find the run and the account.
    doc = json.loads(DASHBOARD.read_text())
    for var in doc["templating"]["list"]:
        metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"]).groups()  # type: ignore[union-attr]
        values = httpx.get(
            f"{stack.prometheus}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
        ).json()["data"]
        assert values, var["name"]
        if label == "run_id":
            assert stack.run_id in values


def test_every_alert_expression_is_valid_and_its_operands_return_series(stack: Stack) -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    empty = []
    for rule in rules:
        _query(stack.prometheus, rule["expr"])  # valid as a whole (it may well not be firing)
        parts = operands(rule["expr"])
        assert parts, rule["alert"]
        for part in parts:
            if not _has_series(_query(stack.prometheus, part)):
                empty.append((rule["alert"], part))
    assert not empty, empty
    loaded = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    health = {r["name"]: (r["health"], r.get("lastError", "")) for g in loaded for r in g["rules"]}
    assert set(health) == {r["alert"] for r in rules}
    deadline = time.monotonic() + 10
    while any(h != "ok" for h, _ in health.values()) and time.monotonic() < deadline:
        time.sleep(1)
        loaded = httpx.get(f"{stack.prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
        health = {r["name"]: (r["health"], r.get("lastError", "")) for g in loaded for r in g["rules"]}
    assert all(h == "ok" for h, _ in health.values()), health
