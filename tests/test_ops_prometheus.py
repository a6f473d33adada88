"""ops/prometheus: the YAML loads, every rule is complete, every metric it names is one the
exporter (or Flower) really exposes, and, where promtool is installed, the config and rules pass
``promtool check`` and each alert fires (and only then) on synthetic series (``promtool test``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import flower.events
import pytest
import yaml

from carnumber.exposition import families
from carnumber.monitor import AccountSnapshot, Snapshot
from workers.books.runs import RunSummary
from workers.metrics import CallStats

OPS = Path(__file__).resolve().parents[1] / "ops" / "prometheus"
REQUIRED = {
    "CarnumberFleetStopped",
    "CarnumberCircuitOpen",
    "CarnumberQuotaExhausted",
    "CarnumberNoProgress",
    "CarnumberFailureRatioHigh",
    "CarnumberQueueEmptyRunNotDone",
    "CarnumberNoWorkers",
}


def _rules() -> list[dict]:
    doc = yaml.safe_load((OPS / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _exported_names() -> set[str]:
    """Every sample name the exporter produces for a snapshot with all fields present."""
    run = RunSummary("r1", {"images_enqueued": "10", "images_written": "5"})
    stats = CallStats({"ok": 3}, 3, 0.5, ((0.1, 1),))
    account = AccountSnapshot(
        account="a1",
        stop={"code": "X", "message": "", "at": 1.0, "run": None},
        circuit={"state": "open", "calls": 1, "failures": 1, "opens": 1},
        quota_window="day",
        quota_limit=10,
        quota_used=10,
        quota_resets_at_s=2,
        rate_qps=10,
        rate_factor=0.5,
        rate_booked_ahead_s=0.0,
        calls=stats,
    )
    snap = Snapshot(True, "carnumber", 1, 1, (run,), (account,))
    return {s.name for family in families(snap) for s in family.samples}


def test_prometheus_config_scrapes_exporter_and_flower_and_loads_the_rules() -> None:
    conf = yaml.safe_load((OPS / "prometheus.yml").read_text())
    assert conf["rule_files"] == ["alerts.yml"]
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in conf["scrape_configs"]
    }
    assert targets == {"carnumber": ["metrics:9808"], "flower": ["flower:5555"]}


def test_every_rule_is_complete_and_the_required_alerts_exist() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED
    for rule in rules:
        assert rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert (
            "ops/README.md#" in rule["annotations"]["description"]
            or "Restart" in (rule["annotations"]["description"])
        ), rule["alert"]


def test_rules_name_only_metrics_that_exist() -> None:
    exported = _exported_names()
    flower_source = Path(flower.events.__file__).read_text()
    readme = (OPS.parent / "README.md").read_text()
    for rule in _rules():
        for name in set(re.findall(r"\b(carnumber_[a-z_]+|flower_[a-z_]+)\b", rule["expr"])):
            if name.startswith("flower_"):
                assert f"'{name}'" in flower_source, (rule["alert"], name)
            else:
                assert name in exported, (rule["alert"], name)
        # each alert is explained in the operator's guide
        anchor = re.search(r"ops/README\.md#([a-z-]+)", rule["annotations"]["description"])
        if anchor:
            assert f'<a id="{anchor.group(1)}"></a>' in readme, rule["alert"]


# -- promtool ----------------------------------------------------------------------------------
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt prometheus)")

R1 = 'run_id="r1"'
SCENARIOS: list[dict] = [
    {
        "input_series": [
            {
                "series": 'carnumber_fleet_stopped{account="a1",code="InvalidAccessKeyId.NotFound"}',
                "values": "1x10",
            },
            {"series": 'carnumber_fleet_stopped{account="a2",code=""}', "values": "0x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "1m",
                "alertname": "CarnumberFleetStopped",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "account": "a1",
                            "code": "InvalidAccessKeyId.NotFound",
                        }
                    }
                ],
            }
        ],
    },
    {
        "input_series": [
            {"series": 'carnumber_circuit_state{account="a1",state="open"}', "values": "1x10"},
            {"series": 'carnumber_circuit_state{account="a1",state="closed"}', "values": "0x10"},
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "CarnumberCircuitOpen", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "CarnumberCircuitOpen",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "account": "a1", "state": "open"}}],
            },
        ],
    },
    {
        "input_series": [
            {"series": 'carnumber_quota_limit{account="a1",window="day"}', "values": "100x5"},
            {"series": 'carnumber_quota_remaining{account="a1",window="day"}', "values": "0x5"},
            {"series": 'carnumber_quota_limit{account="a2",window="day"}', "values": "100x5"},
            {"series": 'carnumber_quota_remaining{account="a2",window="day"}', "values": "5x5"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "1m",
                "alertname": "CarnumberQuotaExhausted",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "account": "a1", "window": "day"}}],
            }
        ],
    },
    {
        # r1: stuck at 100 written with 50 outstanding; r2: writing 10 a minute.
        "input_series": [
            {"series": f"carnumber_run_images_written_total{{{R1}}}", "values": "100x25"},
            {"series": f"carnumber_run_images_outstanding{{{R1}}}", "values": "50x25"},
            {"series": f'carnumber_run_state{{{R1},state="running"}}', "values": "1x25"},
            {"series": 'carnumber_run_images_written_total{run_id="r2"}', "values": "0+10x25"},
            {"series": 'carnumber_run_images_outstanding{run_id="r2"}', "values": "500x25"},
            {"series": 'carnumber_run_state{run_id="r2",state="running"}', "values": "1x25"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "20m",
                "alertname": "CarnumberNoProgress",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "run_id": "r1"}}],
            }
        ],
    },
    {
        # r1: 10 % of recent images fail; r2: 1 %.
        "input_series": [
            {"series": f"carnumber_run_images_written_total{{{R1}}}", "values": "0+10x40"},
            {"series": f"carnumber_run_images_failed_total{{{R1}}}", "values": "0+1x40"},
            {"series": 'carnumber_run_images_written_total{run_id="r2"}', "values": "0+100x40"},
            {"series": 'carnumber_run_images_failed_total{run_id="r2"}', "values": "0+1x40"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "35m",
                "alertname": "CarnumberFailureRatioHigh",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "run_id": "r1"}}],
            }
        ],
    },
    {
        "input_series": [
            {"series": 'carnumber_api_calls_total{account="a1",code="ok"}', "values": "0+90x30"},
            {"series": 'carnumber_api_calls_total{account="a1",code="InternalError"}', "values": "0+10x30"},
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "CarnumberApiErrorRatioHigh", "exp_alerts": []},
            {
                "eval_time": "25m",
                "alertname": "CarnumberApiErrorRatioHigh",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "account": "a1"}}],
            },
        ],
    },
    {
        # Queue and unacked empty from minute 5 on while r1 still says running.
        "input_series": [
            {"series": f'carnumber_run_state{{{R1},state="running"}}', "values": "1x30"},
            {"series": 'carnumber_queue_depth{queue="carnumber"}', "values": "3 2 1 1 0x26"},
            {"series": "carnumber_queue_unacked", "values": "1 1 1 1 1 0x25"},
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "CarnumberQueueEmptyRunNotDone", "exp_alerts": []},
            {
                "eval_time": "20m",
                "alertname": "CarnumberQueueEmptyRunNotDone",
                "exp_alerts": [{"exp_labels": {"severity": "warning", "run_id": "r1", "state": "running"}}],
            },
        ],
    },
    {
        # Workers gone (Flower says 0) while a run is in progress; no run -> no alert.
        "input_series": [
            {"series": 'flower_worker_online{worker="w1@host"}', "values": "1 1 0x20"},
            {"series": f'carnumber_run_state{{{R1},state="running"}}', "values": "1x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "CarnumberNoWorkers", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "CarnumberNoWorkers",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            },
        ],
    },
    {
        # No Flower metric at all (never saw a worker) counts as zero workers too.
        "input_series": [{"series": f'carnumber_run_state{{{R1},state="enqueuing"}}', "values": "1x20"}],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "CarnumberNoWorkers",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            }
        ],
    },
    {
        "input_series": [{"series": "carnumber_redis_up", "values": "1 0x10"}],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "CarnumberRedisDown",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            }
        ],
    },
]


@needs_promtool
def test_promtool_checks_config_and_rules() -> None:
    for argv in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        done = subprocess.run([PROMTOOL, *argv], cwd=OPS, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alerts_fire_exactly_when_expected(tmp_path: Path) -> None:
    # Annotations are prose (checked above); promtool compares them verbatim, so drop them here.
    doc = yaml.safe_load((OPS / "alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    tests = [{"interval": "1m", **scenario} for scenario in SCENARIOS]
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
