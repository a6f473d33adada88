#!/usr/bin/env python3
"""The compose drill: docker-compose.yml run for real, offline, with a node death and a Redis restart.

    sudo ops/compose_drill.py [--images 5000] [--workers 3] [--run-timeout-s 600] [--keep]

What it does, every wait bounded, on this host only (nothing is pulled, nothing leaves it):

1. starts its own ``dockerd`` (own data root, exec root, socket and pid file under
   ``CARNUMBER_DRILL_DIR``, default /var/tmp/carnumber-drill), stopped by its pid at the end,
   unless ``DOCKER_HOST`` names a daemon already (it must run on this host: the archive is a
   bind mount);
2. builds what is missing: a Debian bookworm base image (ops/images/base.sh: debootstrap, then
   ``docker import``), the Redis image on it (ops/images/redis.Dockerfile), the wheelhouse
   (ops/images/wheelhouse.sh), then the carnumber image with ``docker build --network none``
   from that wheelhouse;
3. brings up the ``local`` profile with ``--scale worker=N`` on the project's own network marked
   ``internal`` (ops/compose.drill.yml), with the committed default env file, as a fresh clone
   would;
4. enqueues a generated archive (``python -m ocrserver.samples``) through the one-shot producer
   service, follows the run with ``carnumber status --json`` in a container, and reads Flower's
   API (basic auth) and the metrics endpoint from the host;
5. mid-run ``docker kill``s one worker container, then restarts the Redis container;
6. waits for the run to finish, compacts, reconciles the output against the archive
   (``carnumber verify --json`` and its own count of outcomes per archive image), prints the
   figures, and ends with ``down -v`` and the daemon stopped.

Exit status: 0 when every image of the archive has exactly one outcome; 1 on any miss, duplicate
or bounded wait that ran out; 2 when the drill cannot start (no root, no tool).

Docker programs no published ports on an ``internal`` network (the host has a leg on its bridge,
nothing else does), so the drill checks that every port binding the compose file asks for is on
127.0.0.1 and reads Flower, the metrics and the local API's counters at their containers'
addresses on that bridge.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "carnumberdrill"
BASE_IMAGE = "carnumber-base:bookworm"
REDIS_IMAGE = "carnumber-redis:bookworm"
APP_IMAGE = "carnumber:drill"
LOCAL_ENV = ROOT / "ops" / "compose.local.env"

# Run inside the carnumber image (``python -c``): one line of JSON, the outcomes per archive image.
# An image's outcome is the row with plate_index 0 or null; more than one such row is a duplicate.
RECONCILE = """
import collections, json, os, sys
from workers.sink.dataset import open_dataset
run_id, archive = sys.argv[1], sys.argv[2]
names = {n for n in os.listdir(archive) if n.endswith(".jpg")}
t = open_dataset("/data/output").read_run(run_id, columns=["source", "plate_index"]).to_pylist()
seen = collections.Counter(os.path.basename(r["source"]) for r in t if r["plate_index"] in (None, 0))
print(json.dumps({"archive": len(names), "rows": len(t), "images": len(set(seen) & names),
    "missing": len(names - set(seen)), "duplicates": sum(1 for n in names if seen[n] > 1),
    "unexpected": len(set(seen) - names)}))
"""


class DrillError(Exception):
    """A step failed or a bounded wait ran out: the drill reports it and exits 1."""


def log(message: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(argv: Sequence[str], *, timeout_s: float, env: dict[str, str] | None = None,
       check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; its output is returned (and echoed unless ``quiet``)."""
    try:
        done = subprocess.run(list(argv), cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise DrillError(f"{' '.join(argv[:6])}...: no end within {timeout_s:.0f} s") from None
    if (check and done.returncode != 0) or (not quiet and done.stdout.strip()):
        for line in (done.stdout + done.stderr).strip().splitlines()[-15:]:
            print(f"    {line}", flush=True)
    if check and done.returncode != 0:
        raise DrillError(f"{' '.join(argv[:6])}: exit {done.returncode}")
    return done


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, interval_s: float = 1.0) -> Any:
    """Call ``probe`` until it returns something truthy; DrillError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = probe()
        except (OSError, DrillError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise DrillError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def http_json(url: str, *, auth: str | None = None, method: str = "GET", timeout_s: float = 5) -> Any:
    request = urllib.request.Request(url, method=method)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        body = response.read().decode()
    return json.loads(body) if body.strip().startswith(("{", "[")) else body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the daemon ---------------------------------------------------------------------------------

@dataclass
class Daemon:
    """A dockerd of the drill's own, or none when DOCKER_HOST names one."""

    home: Path
    pid: int | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.home / 'docker.sock'}"

    def start(self, timeout_s: float = 90) -> str:
        pidfile = self.home / "dockerd.pid"
        if pidfile.exists():
            old = int(pidfile.read_text().strip() or 0)
            if old and Path(f"/proc/{old}").exists():
                raise DrillError(f"a drill dockerd already runs (pid {old}, {pidfile}); stop it first")
        self.home.mkdir(parents=True, exist_ok=True)
        logfile = (self.home / "dockerd.log").open("ab")
        # --bridge=none: no docker0; the drill's containers live on the project network only.
        proc = subprocess.Popen(
            ["dockerd", f"--data-root={self.home / 'data'}", f"--exec-root={self.home / 'exec'}",
             f"-H={self.host}", f"--pidfile={pidfile}", "--bridge=none"],
            stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True,
        )
        logfile.close()
        self.pid = proc.pid
        env = {**os.environ, "DOCKER_HOST": self.host}
        wait_for("dockerd answering", lambda: proc.poll() is None and sh(
            ["docker", "version", "--format", "{{.Server.Version}}"], env=env, timeout_s=10,
            check=False, quiet=True).returncode == 0, timeout_s)
        if proc.poll() is not None:
            raise DrillError(f"dockerd exited {proc.returncode}: see {self.home / 'dockerd.log'}")
        log(f"dockerd pid {self.pid}, {self.host}, data root {self.home / 'data'}")
        return self.host

    def stop(self, timeout_s: float = 60) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{self.pid}").exists() and time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                pass
            time.sleep(0.5)
        else:
            if Path(f"/proc/{self.pid}").exists():
                os.kill(self.pid, signal.SIGKILL)
        log(f"dockerd pid {self.pid} stopped")


# -- images -------------------------------------------------------------------------------------

def image_exists(tag: str, env: dict[str, str]) -> bool:
    return sh(["docker", "image", "inspect", tag], env=env, timeout_s=30, check=False,
              quiet=True).returncode == 0


def build_images(env: dict[str, str], *, python: str) -> dict[str, float]:
    """Build the base, Redis and carnumber images (and the wheelhouse) where missing: seconds each."""
    took: dict[str, float] = {}
    t = time.monotonic()
    if not image_exists(BASE_IMAGE, env):
        log(f"building {BASE_IMAGE} with debootstrap (minutes)")
        sh(["sh", "ops/images/base.sh", BASE_IMAGE], env=env, timeout_s=1200, quiet=True)
        took["base image"] = time.monotonic() - t
    t = time.monotonic()
    sh(["docker", "build", "-q", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "-f", "ops/images/redis.Dockerfile", "-t", REDIS_IMAGE, "ops/images"], env=env, timeout_s=300,
       quiet=True)
    took["redis image"] = time.monotonic() - t
    t = time.monotonic()
    # Refreshed each time (seconds when pip's cache has the wheels): pyproject.toml may have
    # gained a dependency. Without an index an existing wheelhouse is used as it is.
    log("filling ops/wheelhouse (pip wheel on the host)")
    filled = sh(["sh", "ops/images/wheelhouse.sh"], env={**env, "PYTHON": python}, timeout_s=900,
                check=not any((ROOT / "ops" / "wheelhouse").glob("*.whl")), quiet=True)
    if filled.returncode != 0:
        log(f"wheelhouse.sh failed ({filled.stderr.strip().splitlines()[-1:]}): building from the "
            "wheelhouse as it is")
    took["wheelhouse"] = time.monotonic() - t
    t = time.monotonic()
    sh(["docker", "build", "-q", "--network", "none", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg", "OFFLINE=true", "-f", "ops/Dockerfile", "-t", APP_IMAGE, "."], env=env,
       timeout_s=900, quiet=True)
    took["carnumber image (--network none)"] = time.monotonic() - t
    return took


def make_archive(home: Path, count: int, env: dict[str, str]) -> Path:
    """``count`` generated images in ``home/input/archive-<count>`` (kept for the next drill)."""
    inputs = home / "input"
    archive = inputs / f"archive-{count}"
    if archive.is_dir():
        return archive
    partial = inputs / f".archive-{count}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    inputs.mkdir(parents=True, exist_ok=True)
    log(f"generating {count} images (python -m ocrserver.samples, in a container)")
    sh(["docker", "run", "--rm", "--network", "none", "--user", "0", "-v", f"{inputs}:/data/input",
        "--entrypoint", "python", APP_IMAGE, "-m", "ocrserver.samples", "--count", str(count),
        "--seed", "14", f"/data/input/{partial.name}"], env=env, timeout_s=1800)
    partial.rename(archive)
    return archive


# -- the stack ----------------------------------------------------------------------------------

def compose_cli(env: dict[str, str]) -> list[str]:
    if os.environ.get("CARNUMBER_COMPOSE"):
        return os.environ["CARNUMBER_COMPOSE"].split()
    if sh(["docker", "compose", "version"], env=env, timeout_s=30, check=False, quiet=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DrillError("neither `docker compose` nor docker-compose is installed")


@dataclass
class Stack:
    cli: list[str]
    env: dict[str, str]

    def compose(self, *args: str, timeout_s: float = 300, check: bool = True, quiet: bool = False,
                job: bool = False) -> subprocess.CompletedProcess[str]:
        """docker-compose with the drill's files and the local profile (and ``job``: the producer,
        never given to ``up``, which would start it too)."""
        profiles = ["--profile", "local", *(["--profile", "job"] if job else [])]
        argv = [*self.cli, "-p", PROJECT, "-f", "docker-compose.yml", "-f", "ops/compose.drill.yml",
                *profiles, *args]
        return sh(argv, env=self.env, timeout_s=timeout_s, check=check, quiet=quiet)

    def ids(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service, quiet=True, timeout_s=60).stdout.split()

    def inspect(self, cid: str, fmt: str) -> str:
        return sh(["docker", "inspect", "-f", fmt, cid], env=self.env, timeout_s=30,
                  quiet=True).stdout.strip()

    def address(self, service: str) -> str:
        ip = self.inspect(self.ids(service)[0], "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        if not ip:
            raise DrillError(f"{service}: no address on the project network")
        return ip

    def app(self, *args: str, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``carnumber ARGS`` in a one-shot producer container."""
        return self.compose("run", "--rm", "--no-deps", "-T", "producer", *args, timeout_s=timeout_s,
                            check=check, quiet=True, job=True)

    def status(self, run_id: str) -> dict[str, Any] | None:
        """``carnumber status RUN --json`` in the running metrics container; None if it fails."""
        cid = self.ids("metrics")
        done = sh(["docker", "exec", cid[0], "carnumber", "status", run_id, "--json"], env=self.env,
                  timeout_s=60, check=False, quiet=True)
        if done.returncode != 0:
            return None
        return dict(json.loads(done.stdout))


def flower_login() -> str:
    for line in LOCAL_ENV.read_text().splitlines():
        if line.startswith("FLOWER_BASIC_AUTH="):
            return line.split("=", 1)[1].strip()
    raise DrillError(f"{LOCAL_ENV}: no FLOWER_BASIC_AUTH")


def check_port_bindings(stack: Stack) -> list[str]:
    """Every host port binding of every container: all must be on 127.0.0.1."""
    bindings = []
    for cid in stack.compose("ps", "-q", quiet=True, timeout_s=60).stdout.split():
        name = stack.inspect(cid, "{{.Name}}").lstrip("/")
        ports = json.loads(stack.inspect(cid, "{{json .HostConfig.PortBindings}}") or "null") or {}
        for port, hosts in ports.items():
            for h in hosts or []:
                bindings.append(f"{name} {h.get('HostIp') or '0.0.0.0'}:{h.get('HostPort')}->{port}")
                if h.get("HostIp") != "127.0.0.1":
                    raise DrillError(f"{name}: port {port} published on {h.get('HostIp')!r}, not 127.0.0.1")
    return bindings


# -- the run ------------------------------------------------------------------------------------

@dataclass
class Timeline:
    start: float = field(default_factory=time.monotonic)
    events: dict[str, float] = field(default_factory=dict)
    last_written: int = 0
    last_progress: float = 0.0
    longest_stall_after_kill_s: float = 0.0

    def mark(self, name: str) -> float:
        self.events[name] = time.monotonic()
        return self.events[name]

    def since(self, name: str, until: str | None = None) -> float | None:
        if name not in self.events or (until and until not in self.events):
            return None
        return (self.events[until] if until else time.monotonic()) - self.events[name]


def follow_run(stack: Stack, run_id: str, total: int, workers: list[str], tl: Timeline,
               timeout_s: float, flower: str, metrics: str) -> dict[str, Any]:
    """Poll the run to its end, killing a worker at 30 % and restarting Redis after that."""
    redis_id = stack.ids("redis")[0]
    victim = workers[0]
    deadline = time.monotonic() + timeout_s
    tl.last_progress = time.monotonic()
    written_at_restart = -1
    looked = False
    status: dict[str, Any] = {}
    while True:
        now = time.monotonic()
        got = stack.status(run_id)
        if got is not None:
            status = got
        written = int(status.get("images_written", 0))
        if written > tl.last_written:
            if "kill" in tl.events:
                tl.longest_stall_after_kill_s = max(tl.longest_stall_after_kill_s, now - tl.last_progress)
            tl.last_written, tl.last_progress = written, now
        print(f"    status: {status.get('state', '?')} {written}/{status.get('images_enqueued', '?')}"
              f" failed={status.get('images_failed', 0)} calls={status.get('calls', 0)}"
              f" (t+{now - tl.start:.0f} s){'' if got else ' [status unavailable]'}", flush=True)
        if not looked and written > 0:
            looked = True
            show_flower_and_metrics(flower, metrics)
        if "kill" not in tl.events and written >= 0.3 * total:
            name = stack.inspect(victim, "{{.Name}}").lstrip("/")
            sh(["docker", "kill", victim], env=stack.env, timeout_s=60, quiet=True)
            tl.mark("kill")
            log(f"docker kill {name} (node death) at {written}/{total} written")
        elif "kill" in tl.events and "redis_restart" not in tl.events and tl.since("kill") >= 10:
            tl.mark("redis_restart")
            written_at_restart = written
            sh(["docker", "restart", "-t", "10", redis_id], env=stack.env, timeout_s=90, quiet=True)
            tl.mark("redis_back_up")
            log(f"docker restart redis at {written}/{total} written "
                f"(down {tl.since('redis_restart', 'redis_back_up'):.1f} s)")
        elif ("redis_restart" in tl.events and "redis_progress" not in tl.events
              and written > written_at_restart):
            tl.mark("redis_progress")
            log(f"writes resumed {tl.since('redis_restart', 'redis_progress'):.1f} s after the Redis restart")
        if status.get("state") in ("paused", "stopped", "quota_exhausted", "circuit_open"):
            raise DrillError(f"run {run_id}: {status.get('state')} ({status.get('stop_code')})")
        if (status.get("state") == "done" and written >= total and "redis_restart" in tl.events):
            tl.mark("done")
            return status
        if time.monotonic() > deadline:
            raise DrillError(f"run {run_id}: {written}/{total} written after {timeout_s:.0f} s "
                             f"(a killed worker's chunks not back: are leases in this version?)")
        time.sleep(3)


def show_flower_and_metrics(flower: str, metrics: str) -> None:
    try:
        workers = http_json(f"{flower}/api/workers?refresh=1", auth=flower_login(), timeout_s=15)
        log(f"Flower {flower}/api/workers (basic auth): {len(workers)} workers: {', '.join(sorted(workers))}")
    except (OSError, ValueError) as exc:
        log(f"Flower API: {exc}")
    try:
        text = str(http_json(f"{metrics}/metrics", timeout_s=15))
        ours = [line for line in text.splitlines() if line.startswith("carnumber_")]
        log(f"metrics {metrics}/metrics: {len(ours)} carnumber_ samples, e.g. "
            + "; ".join(ours[:3]))
    except (OSError, ValueError) as exc:
        log(f"metrics endpoint: {exc}")


def drill(args: argparse.Namespace) -> int:
    home = Path(os.environ.get("CARNUMBER_DRILL_DIR", "/var/tmp/carnumber-drill"))
    daemon = Daemon(home)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CARNUMBER_", "COMPOSE_", "REDIS_", "FLOWER_", "METRICS_"))}
    tl = Timeline()
    drill_start = time.monotonic()
    stack: Stack | None = None
    figures: dict[str, Any] = {}
    try:
        env["DOCKER_HOST"] = os.environ.get("DOCKER_HOST") or daemon.start()
        if "DOCKER_HOST" in os.environ:
            log(f"using the daemon at DOCKER_HOST={env['DOCKER_HOST']}")
        for step, took in build_images(env, python=args.python).items():
            log(f"built {step} in {took:.0f} s")
        if daemon.pid is not None:  # the drill's own data root: drop the rebuilt images' old layers
            sh(["docker", "image", "prune", "-f"], env=env, timeout_s=300, quiet=True)
        archive = make_archive(home, args.images, env)
        total = sum(1 for p in archive.iterdir() if p.suffix == ".jpg")
        log(f"archive {archive}: {total} images")
        env.update({
            "CARNUMBER_IMAGE": APP_IMAGE, "REDIS_IMAGE": REDIS_IMAGE,
            "CARNUMBER_BASE_IMAGE": BASE_IMAGE, "CARNUMBER_OFFLINE_BUILD": "true",
            "CARNUMBER_INPUT_DIR": str(archive.parent),
            "REDIS_PUBLISH": f"127.0.0.1:{free_port()}", "FLOWER_PUBLISH": f"127.0.0.1:{free_port()}",
            "METRICS_PUBLISH": f"127.0.0.1:{free_port()}",
        })
        stack = Stack(compose_cli(env), env)
        stack.compose("config", "-q", timeout_s=60, job=True)
        stack.compose("down", "-v", "--remove-orphans", timeout_s=180, quiet=True, job=True)
        tl = Timeline()
        stack.compose("up", "-d", "--no-build", "--scale", f"worker={args.workers}", timeout_s=300,
                      quiet=True)
        network = f"{PROJECT}_default"
        internal = sh(["docker", "network", "inspect", "-f", "{{.Internal}}", network], env=env,
                      timeout_s=30, quiet=True).stdout.strip()
        if internal != "true":
            raise DrillError(f"network {network}: internal={internal}")
        services = ("redis", "localapi", "worker", "flower", "metrics")
        log(f"stack up on network {network} (internal): "
            + ", ".join(f"{s} x{len(stack.ids(s))}" for s in services))
        for b in check_port_bindings(stack):
            log(f"published: {b}")
        flower = f"http://{stack.address('flower')}:5555"
        metrics = f"http://{stack.address('metrics')}:9808"
        api = f"http://{stack.address('localapi')}:8080"
        login = flower_login()
        wait_for("local API", lambda: http_json(f"{api}/__carnumber/stats"), 120)
        wait_for("metrics endpoint", lambda: http_json(f"{metrics}/metrics"), 120)
        wait_for(f"{args.workers} workers in Flower", lambda: len(
            http_json(f"{flower}/api/workers?refresh=1", auth=login, timeout_s=20)) >= args.workers, 180, 3)
        try:
            http_json(f"{flower}/api/workers", timeout_s=10)
            raise DrillError("Flower answered its API without a login")
        except urllib.error.HTTPError as exc:
            log(f"Flower without a login: HTTP {exc.code}; with {login.split(':')[0]}:***: "
                f"{args.workers} workers online")
        http_json(f"{api}/__carnumber/reset", method="POST")
        workers = stack.ids("worker")
        log(f"{len(workers)} worker containers; up in {time.monotonic() - tl.start:.0f} s")

        run_id = f"drill-{time.strftime('%Y%m%dT%H%M%S')}"
        tl.mark("enqueue")
        enqueue = stack.app("enqueue", f"/data/input/{archive.name}", "--run", run_id, timeout_s=300)
        log(f"enqueued through the producer service in {tl.since('enqueue'):.0f} s: "
            + " ".join(enqueue.stdout.split())[-200:])
        status = follow_run(stack, run_id, total, workers, tl, args.run_timeout_s, flower, metrics)
        figures["run_s"] = tl.since("enqueue", "done")
        victim_state = stack.inspect(workers[0], "{{.State.Status}} restarts={{.RestartCount}}")
        log(f"run done: {status.get('images_written')}/{total}; killed worker now: {victim_state}")

        stack.app("compact", run_id, timeout_s=300)
        verify = stack.app("verify", run_id, "--json", timeout_s=300, check=False)
        verdict = json.loads(verify.stdout) if verify.stdout.strip().startswith("{") else {}
        log(f"carnumber verify: {verify.stderr.strip().splitlines()[-1:] or ['(no verdict)']}")
        counted_out = stack.compose(
            "run", "--rm", "--no-deps", "-T", "--entrypoint", "python", "producer", "-c", RECONCILE,
            run_id, f"/data/input/{archive.name}", timeout_s=300, quiet=True, job=True).stdout
        counted = json.loads(counted_out.strip().splitlines()[-1])
        calls = http_json(f"{api}/__carnumber/stats")
        final = stack.app("status", run_id, timeout_s=120).stdout.strip()
        log(f"carnumber status (producer container): {final}")
        figures["run_calls"] = (stack.status(run_id) or {}).get("calls", "-")
        figures.update(
            images=counted["images"], archive=counted["archive"], missing=counted["missing"],
            duplicates=counted["duplicates"], unexpected=counted["unexpected"],
            verify_ok=bool(verdict.get("ok")), calls=calls.get("accepted_total"),
            requests=calls.get("requests_total"),
        )
    except DrillError as exc:
        log(f"FAILED: {exc}")
        figures["error"] = str(exc)
    finally:
        if stack is not None and not args.keep:
            stack.compose("down", "-v", "--remove-orphans", timeout_s=180, check=False, quiet=True,
                          job=True)
            log("down -v")
        figures["stack_s"] = time.monotonic() - tl.start
        if not args.keep:
            daemon.stop()
        figures["total_s"] = time.monotonic() - drill_start
    report(figures, tl)
    ok = ("error" not in figures and figures.get("missing") == 0 and figures.get("duplicates") == 0
          and figures.get("unexpected") == 0 and figures.get("images") == figures.get("archive")
          and figures.get("verify_ok"))
    print(f"compose drill: {'OK' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


def report(f: dict[str, Any], tl: Timeline) -> None:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} s"

    print("", flush=True)
    rows = [
        ("images (exactly one outcome)", f"{f.get('images', '-')} of {f.get('archive', '-')}"),
        ("missing", f.get("missing", "-")),
        ("duplicates", f.get("duplicates", "-")),
        ("unexpected", f.get("unexpected", "-")),
        ("carnumber verify", {True: "OK", False: "MISMATCH"}.get(f.get("verify_ok"), "-")),  # type: ignore[call-overload]
        ("calls (local API, accepted)", f"{f.get('calls', '-')} ({f.get('requests', '-')} requests)"),
        ("calls (the run's counter)", f.get("run_calls", "-")),
        ("run (enqueue to done)", s(f.get("run_s"))),
        ("recovery: kill to run done", s(tl.since("kill", "done"))),
        ("recovery: longest stall after kill",
         s(tl.longest_stall_after_kill_s if "kill" in tl.events else None)),
        ("recovery: Redis restart to writes", s(tl.since("redis_restart", "redis_progress"))),
        ("stack (up to down -v)", s(f.get("stack_s"))),
        ("total (the whole drill)", s(f.get("total_s"))),
    ]
    for name, value in rows:
        print(f"  {name:<38}{value}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops/compose_drill.py", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="archive size (default 5000)")
    parser.add_argument("--workers", type=int, default=3, help="worker containers (default 3)")
    parser.add_argument("--run-timeout-s", type=float, default=600,
                        help="longest wait for the run after enqueueing (default 600)")
    parser.add_argument("--python", default=os.environ.get("PYTHON", "python3"),
                        help="a CPython 3.11 with pip, for the wheelhouse (default python3)")
    parser.add_argument("--keep", action="store_true", help="leave the stack and daemon up (debugging)")
    args = parser.parse_args(argv)
    missing = [t for t in ("docker", "dockerd", "debootstrap") if not shutil.which(t)]
    if "DOCKER_HOST" in os.environ:
        missing = [t for t in missing if t == "docker"]
    if missing:
        print(f"compose drill: missing {', '.join(missing)} (apt-get install docker.io docker-compose "
              "debootstrap)", file=sys.stderr)
        return 2
    if os.geteuid() != 0 and "DOCKER_HOST" not in os.environ:
        print("compose drill: run as root (dockerd, debootstrap)", file=sys.stderr)
        return 2
    return drill(args)


if __name__ == "__main__":
    sys.exit(main())
