"""deploy/prometheus/alerts.yml and deploy/grafana/lmserve.json: promtool checks the rules and runs their unit
tests, and every lmserve metric the alerts and the dashboard name is on a real server's /metrics."""
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml


DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "lmserve.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (.ci/run installs Debian's prometheus package, which ships it)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def test_promtool_checks_the_rules():
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_rule_unit_tests_fire_each_alert_and_keep_it_quiet_when_healthy():
    out = subprocess.run([promtool(), "test", "rules", str(ALERTS.with_name("alerts_test.yml"))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(ALERTS.with_name("alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert alerts == tested


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\blmserve_[a-z_]+", expr))


def alert_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return exprs + [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]


def test_dashboard_is_grafana_json_with_a_query_per_panel():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "lmserve" and dash["panels"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"


def test_every_metric_the_alerts_and_dashboard_name_is_served(served_metrics):
    for expr in alert_exprs() + dashboard_exprs():
        missing = named_metrics(expr) - served_metrics
        assert not missing, f"{sorted(missing)} (in {expr.strip()!r}) is not on /metrics"
    assert len(set().union(*map(named_metrics, alert_exprs() + dashboard_exprs()))) >= 15
