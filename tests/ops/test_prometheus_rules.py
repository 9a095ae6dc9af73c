"""deploy/prometheus and deploy/grafana: valid, tested by promtool, and true to the code.

The rules and the dashboard name metrics and labels as strings; these tests scrape
a real server so that a renamed metric or label cannot leave an alert that never
fires. Every alert has a promtool case that fires it and one that does not.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gen.expense.auth.v1.auth_pb import GetSessionRequest
from tests.conftest import require_tool, server_env
from tests.interop.tools import REPO
from tests.support.client import Session
from tests.support.clock import FileClock
from tests.support.google import FakeGoogle
from tests.support.http import connect_post
from tests.support.promql import Exported, scrape, selectors, unknown
from tests.support.server import start_server

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "expense-auth.rules.yml"
RULE_CASES = [
    PROMETHEUS_DIR / "expense-auth.rules.test.yml",
    PROMETHEUS_DIR / "expense-auth.rules.hours.test.yml",
]
DASHBOARD = REPO / "deploy" / "grafana" / "expense-auth.json"
SIGN_IN = "/expense.auth.v1.AuthService/SignIn"

# What Grafana substitutes in the dashboard's queries before Prometheus sees them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$job": "expense-auth"}


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


ALERTS = [rule["alert"] for rule in rules() if "alert" in rule]
RECORDED = [rule["record"] for rule in rules() if "record" in rule]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, replacement)
            queries.append(expr)
    return queries


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool(shutil.which("promtool"), "promtool (Debian package prometheus)")


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


# --- promtool ------------------------------------------------------------------------------


def test_rules_are_valid(promtool: str) -> None:
    result = run_promtool(promtool, "check", "rules", RULES.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS) + len(RECORDED)} rules found" in result.stdout


def test_rule_cases_pass(promtool: str) -> None:
    names = [path.name for path in RULE_CASES]
    result = run_promtool(promtool, "test", "rules", *names, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(names)


def test_the_example_scrape_config_is_valid(promtool: str, tmp_path: Path) -> None:
    example = (PROMETHEUS_DIR / "prometheus.example.yml").read_text()
    installed = "/etc/prometheus/rules/expense-auth.rules.yml"
    assert installed in example
    shutil.copy(RULES, tmp_path / RULES.name)
    (tmp_path / "prometheus.yml").write_text(example.replace(installed, RULES.name))
    result = run_promtool(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "job_name: expense-auth" in example  # the job the rules select


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_CASES:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert fired == set(ALERTS), set(ALERTS) ^ fired
    assert silent == set(ALERTS), set(ALERTS) ^ silent


@pytest.mark.parametrize("alert", ALERTS)
def test_an_alert_that_never_fires_fails_its_cases(
    promtool: str, tmp_path: Path, alert: str
) -> None:
    document = yaml.safe_load(RULES.read_text())
    broken = copy.deepcopy(document)
    for group in broken["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) == 0"
    (tmp_path / RULES.name).write_text(yaml.safe_dump(broken, sort_keys=False))
    for path in RULE_CASES:
        shutil.copy(path, tmp_path / path.name)
    names = [path.name for path in RULE_CASES]
    result = run_promtool(promtool, "test", "rules", *names, cwd=tmp_path)
    assert result.returncode != 0, f"{alert} never fires, yet its cases pass"
    assert f"alertname: {alert}," in result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    as_rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    (tmp_path / "dashboard.rules.yml").write_text(yaml.safe_dump(as_rules))
    result = run_promtool(promtool, "check", "rules", "dashboard.rules.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_panels_fit_the_grid_without_overlapping() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    cells: dict[tuple[int, int], str] = {}
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]


# --- the names are the server's ------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, google: FakeGoogle) -> Iterator[Exported]:
    """Everything a real server exports once it has served an ok, a failed and a refused call.

    Labelled series only appear once observed: one sign-in passes, the next is refused
    by the per-address limit, a call without a session fails.
    """
    tmp = tmp_path_factory.mktemp("exported")
    running = start_server(
        tmp,
        server_env(google, RATE_LIMIT_SIGNIN_PER_IP="1/minute"),
        clock=FileClock(tmp / "now").freeze(),  # no minute's edge between the two sign-ins
    )
    try:
        device = Session(running.url)
        device.sign_in(google.token(sub="rules-1", email="rules-1@example.com"))
        device.call(device.auth.get_session, GetSessionRequest())
        refused = connect_post(running.url, SIGN_IN, {"googleIdToken": google.token(sub="r2")})
        assert refused.status == 429, refused.body
        assert connect_post(running.url, "/expense.auth.v1.AuthService/GetSession", {}).status
        yield scrape(running.admin_url)
    finally:
        assert running.stop() == 0, running.logs()


@pytest.mark.parametrize(
    "rule", [r.get("alert") or r["record"] for r in rules()], ids=lambda name: str(name)
)
def test_rules_use_only_what_the_server_exports(exported: Exported, rule: str) -> None:
    (expr,) = [r["expr"] for r in rules() if rule in (r.get("alert"), r.get("record"))]
    assert unknown(expr, exported, recorded=RECORDED) == []


def test_dashboard_uses_only_what_the_server_exports(exported: Exported) -> None:
    problems = {expr: unknown(expr, exported) for expr in dashboard_queries()}
    assert {expr: found for expr, found in problems.items() if found} == {}


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(expense_auth_sign_in_total[5m])", "expense_auth_sign_in_total is not exported"),
        ('expense_auth_sign_ins_total{reason="ok"}', "has no label 'reason'"),
        ('expense_auth_readiness_check{check="keys"} == 0', "{check='keys'} is never exported"),
    ],
)
def test_a_wrong_name_label_or_value_is_caught(exported: Exported, expr: str, problem: str) -> None:
    assert any(problem in found for found in unknown(expr, exported)), unknown(expr, exported)


def test_every_rule_uses_some_metric() -> None:
    for rule in rules():
        assert selectors(rule["expr"]), rule
