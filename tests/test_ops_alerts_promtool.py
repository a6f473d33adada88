"""ops/prometheus/alerts_test.yml: ``promtool test rules`` passes, with exact labels and rendered
annotations, and every alert of alerts.yml has a case where it fires and one where it does not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

OPS = Path(__file__).resolve().parents[1] / "ops" / "prometheus"
PROMTOOL = shutil.which("promtool")


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    alerts = {
        r["alert"] for g in yaml.safe_load((OPS / "alerts.yml").read_text())["groups"] for r in g["rules"]
    }
    spec = yaml.safe_load((OPS / "alerts_test.yml").read_text())
    assert spec["rule_files"] == ["alerts.yml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in spec["tests"]:
        for case in test["alert_rule_test"]:
            (fires if case["exp_alerts"] else quiet).add(case["alertname"])
            for alert in case["exp_alerts"]:
                assert set(alert["exp_annotations"]) == {"summary", "description"}, case
    assert fires == alerts, alerts ^ fires
    assert quiet == alerts, alerts ^ quiet


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_runs_the_alert_unit_tests() -> None:
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=OPS, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
