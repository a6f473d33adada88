"""Drill 4: two worker nodes on test hosts of their own (network namespaces with veth links to
this host, where Redis and the local server listen); one is cut off for 60 s, then let back.

Recovery: from the cut until every chunk the cut-off node held runs on the other node. When the
link comes back the cut-off node finds its chunks taken (its claims ran out, the answers are in
the journal) and the run ends with every image exactly once. Needs root (``ip netns``); every
address is on this machine's own namespaces and links, removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from dataclasses import dataclass

from ops.drills.faults import Result
from ops.drills.harness import Drill, audit, drill_dir

__all__ = ["Hosts", "partition_drill"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Hosts:
    """``n`` namespaces ``cn<tag><i>``, each linked to this host by a veth pair on
    10.231.<base + i>.0/24 (this host .1, the test host .2); drills running at once use other
    ``tag`` and ``base``."""

    tag: str
    n: int = 2
    base: int = 1

    def name(self, i: int) -> str:
        return f"cn{self.tag}{i}"

    def host_side(self, i: int) -> str:
        return f"{self.name(i)}h"

    def gateway(self, i: int) -> str:
        return f"10.231.{self.base + i}.1"

    def up(self) -> None:
        for i in range(self.n):
            ns, h, n = self.name(i), self.host_side(i), f"{self.name(i)}n"
            _ip("netns", "add", ns)
            _ip("link", "add", h, "type", "veth", "peer", "name", n)
            _ip("link", "set", n, "netns", ns)
            _ip("addr", "add", f"{self.gateway(i)}/24", "dev", h)
            _ip("link", "set", h, "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"10.231.{self.base + i}.2/24", "dev", n)
            _ip("netns", "exec", ns, "ip", "link", "set", n, "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        _ip("link", "set", self.host_side(i), "down")

    def heal(self, i: int) -> None:
        _ip("link", "set", self.host_side(i), "up")

    def down(self) -> None:
        for i in range(self.n):
            subprocess.run(["ip", "link", "del", self.host_side(i)], capture_output=True, timeout=10)
            subprocess.run(["ip", "netns", "del", self.name(i)], capture_output=True, timeout=10)


def partition_drill(args: argparse.Namespace, cut_s: float = 60.0, timeout_s: float = 900.0) -> Result:
    if shutil.which("ip") is None:
        raise RuntimeError("partition drill: needs iproute2 ('ip') and root")
    hosts = Hosts(tag=str(int(time.time()) % 10000))
    hosts.up()
    d: Drill | None = None
    try:
        d = Drill(
            drill_dir("partition"),
            images=args.images,
            lease_s=args.lease_s,
            chunk_size=args.chunk_size,
            pool=args.pool,
            also_bind=[hosts.gateway(i) for i in range(hosts.n)],
        )
        print(f"partition: {args.images} images, lease {args.lease_s:.0f} s, work dir {d.work}", flush=True)
        port = d.redis.port
        server_port = str(d.server.url).rsplit(":", 1)[-1]
        nodes = []
        for i in range(hosts.n):
            gw = hosts.gateway(i)
            nodes.append(
                d.start_node(
                    prefix_cmd=["ip", "netns", "exec", hosts.name(i)],
                    env={
                        "REDIS_URL": f"redis://{gw}:{port}/0",
                        "CARNUMBER_ENDPOINT": f"http://{gw}:{server_port}",
                    },
                )
            )
        started = time.monotonic()
        producer = d.start_producer()
        d.wait_for("a third written", lambda s: s.written >= args.images // 3, timeout_s)
        t_cut = d.redis_time()
        cut_at = time.monotonic()
        hosts.cut(0)
        print(f"  {nodes[0].name} cut off for {cut_s:.0f} s", flush=True)
        time.sleep(d.lease_s / 4 + 2)  # the live node has renewed its own leases by now
        stranded = d.held_since(t_cut)
        recovery = None
        while time.monotonic() - cut_at < cut_s:
            if recovery is None and not (stranded & d.held_since(t_cut)):
                recovery = time.monotonic() - cut_at
            time.sleep(0.25)
        hosts.heal(0)
        print(f"  link back; {len(stranded)} chunk(s) were stranded, running on the other node after "
              f"{recovery if recovery is not None else float('nan'):.1f} s", flush=True)  # fmt: skip
        if producer.wait(timeout_s) != 0:
            raise RuntimeError(f"enqueue failed: {d.producer_log()}")
        d.wait_for("run finished", d.finished, timeout_s)
        total = time.monotonic() - started
        notes = {"stranded_chunks": len(stranded), "cut_node_alive": nodes[0].alive()}
        return Result("partition", audit(d), d.processes * d.concurrency, [recovery or -1.0], total, notes)
    finally:
        if d is not None:
            d.close()
            if not args.keep:
                shutil.rmtree(d.work, ignore_errors=True)
        hosts.down()
