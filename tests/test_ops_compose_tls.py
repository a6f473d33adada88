"""docker-compose.yml's tls profile without a Docker engine: the redis-setup service's command
writes certificates and the ACL file from ops/compose.tls.env, the redis service's shell snippet
then really starts a TLS-only Redis with those users (the redis-server on PATH), its health check
passes, and the fleet's URL from the env file reaches it as the least-privilege user."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from workers.redis_connect import sync_client

ROOT = Path(__file__).resolve().parents[1]
SERVICES = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
TLS_ENV = ROOT / "ops" / "compose.tls.env"
REDIS_SERVER = shutil.which("redis-server")

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server (with TLS) not on PATH")


def _env_file() -> dict[str, str]:
    lines = [line for line in TLS_ENV.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _here(script: str, tls: Path, tmp: Path) -> str:
    """A service's script with its container paths moved into the test's directories."""
    # /tmp first: the test's own directories are under /tmp too.
    return (
        script.replace("$$", "$").replace("/tmp/", f"{tmp}/").replace("/tls/", f"{tls}/")
        .replace(" /tls ", f" {tls} ").replace("python /ops/", f"{sys.executable} {ROOT}/ops/")
        .replace("chown redis", "true")
    )  # fmt: skip


def test_the_tls_profile_starts_a_tls_only_redis_with_the_fleet_s_acl_user(tmp_path: Path) -> None:
    env_file = _env_file()
    assert env_file["REDIS_TLS"] == "on" and env_file["REDIS_URL"].startswith("rediss://carnumber:")
    tls, scratch = tmp_path / "tls", tmp_path / "tmp"
    tls.mkdir()
    scratch.mkdir()
    setup = SERVICES["redis-setup"]
    assert setup["profiles"] == ["tls"] and setup["user"] == "0" and setup["restart"] == "no"
    assert "./ops:/ops:ro" in setup["volumes"]
    env = {**os.environ, **env_file, "PYTHONPATH": str(ROOT)}
    setup_script = _here(setup["command"][0], tls, scratch)
    done = subprocess.run(["sh", "-c", setup_script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert oct((tls / "server.key").stat().st_mode & 0o777) == "0o600"
    acl = (tls / "users.acl").read_text()
    for secret in (env_file["REDIS_PASSWORD"], "local-only-fleet-7c2d", env_file["REDIS_MONITOR_PASSWORD"]):
        assert secret not in acl  # hashes only

    port = _free_port()
    shim = tmp_path / "bin" / "docker-entrypoint.sh"  # the image's entrypoint, minus the user switch
    shim.parent.mkdir()
    shim.write_text(
        f'#!/bin/sh\nshift\nexec {REDIS_SERVER} "$@" --tls-port {port} --bind 127.0.0.1 --dir {tmp_path}\n'
    )
    shim.chmod(0o755)
    script = _here(SERVICES["redis"]["command"][2], tls, scratch)
    run_env = {"PATH": f"{shim.parent}:{os.environ['PATH']}", **env_file}
    proc = subprocess.Popen(
        ["sh", "-c", script], env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    url = env_file["REDIS_URL"].replace("@redis:6379", f"@127.0.0.1:{port}").replace("/tls/", f"{tls}/")
    try:
        fleet = sync_client(url, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                fleet.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and proc.poll() is None, proc.stderr and proc.stderr.read()
                time.sleep(0.1)
        assert fleet.client_info()["user"] == "carnumber"
        fleet.set("carnumber:compose-tls", 1)
        with pytest.raises(redis.exceptions.NoPermissionError):
            fleet.config_get("*")
        fleet.close()
        # Plaintext is off: the port speaks TLS only.
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=1).ping()
        if shutil.which("redis-cli"):
            check = _here(SERVICES["redis"]["healthcheck"]["test"][1], tls, scratch)
            check = check.replace('redis-cli "$@" ping', f'redis-cli "$@" -p {port} ping')
            assert subprocess.run(["sh", "-c", check], env=run_env, timeout=10).returncode == 0
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_redis_waits_for_the_setup_then_names_it(tmp_path: Path) -> None:
    script = _here(SERVICES["redis"]["command"][2], tmp_path / "tls", tmp_path).replace("-lt 120", "-lt 1")
    done = subprocess.run(["sh", "-c", script], env={"PATH": os.environ["PATH"], "REDIS_TLS": "on"},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 2 and "docker compose --profile tls up redis-setup" in done.stderr
