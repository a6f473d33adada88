"""ops/grafana without a Grafana: the provisioning files name the datasource and the folder the
dashboard uses, and every metric the dashboard queries is one ``carnumber metrics`` (or Flower, or
Prometheus itself) really exposes. The queries themselves run against a real Prometheus in
tests/test_ops_live_monitoring.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import flower.events
import yaml

from carnumber.exposition import families
from carnumber.monitor import AccountSnapshot, Snapshot
from workers.books.runs import RunSummary
from workers.metrics import CallStats

GRAFANA = Path(__file__).resolve().parents[1] / "ops" / "grafana"


def _exported() -> set[str]:
    run = RunSummary("r1", {"images_enqueued": "10", "images_written": "5"})
    account = AccountSnapshot(
        account="a1",
        stop={"code": "X", "message": "", "at": 1.0, "run": None},
        circuit={"state": "open", "calls": 1, "failures": 1, "opens": 1},
        quota_window="day",
        quota_limit=10,
        quota_used=1,
        quota_resets_at_s=2,
        rate_qps=10,
        rate_factor=0.5,
        rate_booked_ahead_s=0.0,
        calls=CallStats({"ok": 3}, 3, 0.5, ((0.1, 1),)),
    )
    snap = Snapshot(True, "carnumber", 1, 1, (run,), (account,), price_per_1000_calls=1.5)
    return {s.name for family in families(snap) for s in family.samples}


def test_provisioning_matches_the_dashboard() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = ds["datasources"][0]["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "carnumber.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    doc = json.loads((GRAFANA / "dashboards" / "carnumber.json").read_text())
    assert doc["uid"] == "carnumber"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid and target["expr"].strip(), panel["title"]
    assert {v["name"] for v in doc["templating"]["list"]} == {"account", "run"}


def test_dashboard_names_only_metrics_that_exist() -> None:
    exported = _exported()
    flower_source = Path(flower.events.__file__).read_text()
    doc = json.loads((GRAFANA / "dashboards" / "carnumber.json").read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in doc["templating"]["list"]]
    for expr in exprs:
        for name in set(re.findall(r"\b(carnumber_[a-z_]+|flower_[a-z_]+)\b", expr)):
            if name.startswith("flower_"):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                assert f"'{base}'" in flower_source, (expr, name)
            else:
                assert name in exported, (expr, name)
    covered = " ".join(exprs)
    for topic in ("carnumber_api_calls_total", "Throttling", "carnumber_api_call_latency_seconds_bucket",
                  "carnumber_quota_remaining", "carnumber_queue_depth", "carnumber_run_images_outstanding",
                  "flower_worker_online", "carnumber_rate_limit_qps"):  # fmt: skip
        assert topic in covered, topic
