"""The real Prometheus (the `prometheus` binary) with the deployment's scrape settings and
alert rules, scraping two real `tandem serve` instances: the targets come up, the rules
evaluate without error, and every dashboard and alert query runs, with data where the
traffic and runs made some.

Only service discovery differs from deploy/prometheus/prometheus.yml: Docker's DNS name
`app` becomes a static list of the two local ports; and there is no Alertmanager to send to
(test_alertmanager_live.py has one).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.deploy.observability import (
    SCHEDULER_ENV,
    Daemon,
    Query,
    alert_queries,
    alert_rules,
    dashboard_queries,
    grafana_to_promql,
    make_wallet_traffic,
    start_prometheus,
)
from tests.support import (
    Server,
    free_port,
    http_get,
    http_post,
    require_tool,
    start_servers,
    wait_for,
)

# Series that only exist after an incident (a failover, a fenced run, a server error): a
# query reading them may be empty here, unless it falls back to `or vector(0)`.
INCIDENT_ONLY = (
    "tandem_scheduler_recoveries_total",
    "tandem_scheduler_fenced_out_total",
    'status=~"5.."',
)
NEVER_EVALUATED = "0001-01-01T00:00:00Z"


def may_be_empty(expr: str) -> bool:
    return any(name in expr for name in INCIDENT_ONLY) and "or vector(0)" not in expr


@dataclass
class Observed:
    prometheus: str
    servers: list[Server]

    def api(self, path: str, **params: str) -> Any:
        response = http_get(f"{self.prometheus}/api/v1/{path}", params=params, timeout=10)
        # Until it has loaded its storage, Prometheus answers 503 in plain text.
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        assert not body.get("warnings"), body
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        data = self.api("query", query=expr)
        assert data["resultType"] in ("vector", "scalar"), data
        result = data["result"]
        # A scalar comes back as [time, "value"]: one value, never empty.
        return [result] if data["resultType"] == "scalar" else list(result)


def _scraping(observed: Observed) -> bool:
    """Two scrapes of each instance, and every rule evaluated."""
    try:
        scrapes = observed.query('count_over_time(up{job="tandem"}[1m]) >= 2')
        if len(scrapes) < len(observed.servers):
            return False
        rules = [r for g in observed.api("rules")["groups"] for r in g["rules"]]
        return bool(rules) and all(r["lastEvaluation"] != NEVER_EVALUATED for r in rules)
    except (httpx.HTTPError, AssertionError):
        return False


def _filled(observed: Observed) -> bool:
    """Data for every query that should have some (what the test then asserts)."""
    try:
        return all(
            observed.query(grafana_to_promql(q.expr))
            for q in dashboard_queries()
            if not may_be_empty(q.expr)
        )
    except (httpx.HTTPError, AssertionError):
        return False


@pytest.fixture(scope="module")
def observed(
    database_url: str, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Observed]:
    """Two instances with traffic and scheduled runs, scraped by a real Prometheus until
    every query that should have data has it (at the deployed 5 s interval: ~10 s), or 30 s
    after the first scrapes at most."""
    binary = require_tool("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    # The housekeeping tasks too: the hold gauges are the expiry task's readings.
    maintained = {
        **SCHEDULER_ENV,
        "TANDEM_MAINTENANCE_ENABLED": "true",
        "TANDEM_WEBHOOKS_ALLOW_PRIVATE": "true",
    }
    servers = start_servers(database_url, log_dir, 2, extra_env=maintained)
    prometheus: Daemon | None = None
    try:
        # A webhook endpoint that refuses every connection: the change stream's lag and its
        # failed deliveries have series.
        hook = {"url": f"http://127.0.0.1:{free_port()}/closed"}
        assert http_post(f"{servers[0].url}/webhook-endpoints", json=hook).status_code == 201
        for server in servers:
            make_wallet_traffic(server)
        # A paused housekeeping task: the dashboard's panel of them has a row.
        pause = f"{servers[0].url}/tasks/Housekeeping/pause"
        wait_for(lambda: http_post(pause).status_code == 200, 15, "Housekeeping registered")
        prometheus = start_prometheus(binary, folder, [f"127.0.0.1:{s.port}" for s in servers])
        result = Observed(prometheus.url, servers)
        prometheus.wait_until(lambda: _scraping(result), 60, "Prometheus scraping")
        # Rates need two samples in their window: give the queries a few scrapes to fill,
        # then let the tests say which stayed empty.
        deadline = time.monotonic() + 30
        while not _filled(result) and time.monotonic() < deadline:
            time.sleep(0.5)
        yield result
    finally:
        if prometheus is not None:
            prometheus.stop()
        for server in servers:
            server.stop()


def test_both_instances_are_scraped_as_deployed(observed: Observed) -> None:
    """Both instances are targets of job `tandem`, up, scraped at /metrics every 5 s."""
    targets = [t for t in observed.api("targets")["activeTargets"] if t["scrapePool"] == "tandem"]
    assert sorted(t["labels"]["instance"] for t in targets) == sorted(
        f"127.0.0.1:{s.port}" for s in observed.servers
    )
    for target in targets:
        assert target["health"] == "up", target
        assert target["scrapeUrl"].endswith("/metrics"), target
        assert target["scrapeInterval"] == "5s", target


def test_alert_rules_evaluate_without_error(observed: Observed) -> None:
    """Prometheus loaded every rule of alerts.yml and evaluates each without error on real
    series."""
    rules = [r for g in observed.api("rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in alert_rules())
    for rule in rules:
        assert (rule["health"], rule.get("lastError", "")) == ("ok", ""), rule


def test_alert_queries_run(observed: Observed) -> None:
    """Every alert's expression runs on the real series without error or warning."""
    for query in alert_queries():
        assert isinstance(observed.query(query.expr), list), query.where


def test_every_dashboard_query_has_data(observed: Observed) -> None:
    """Every dashboard query runs without error, and returns data unless it reads series
    that only an incident creates."""
    empty: list[Query] = []
    for query in dashboard_queries():
        if not observed.query(grafana_to_promql(query.expr)) and not may_be_empty(query.expr):
            empty.append(query)
    assert empty == []


def test_instance_table_names_each_target(observed: Observed) -> None:
    """The dashboards' instance table joins each scrape target to the instance id its
    server sends in X-Instance-Id."""
    rows = observed.query("max by (instance, instance_id) (tandem_instance_info)")
    found = {row["metric"]["instance"]: row["metric"]["instance_id"] for row in rows}
    expected = {
        f"127.0.0.1:{s.port}": http_get(f"{s.url}/health/live").headers["x-instance-id"]
        for s in observed.servers
    }
    assert found == expected
