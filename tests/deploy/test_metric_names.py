"""Every metric and label the alerts and dashboards read exists on a real `tandem serve`:
two instances with the scheduler on, wallet traffic of every outcome, finished runs and one
failover (the owner of a long run paused past its lease), so that even the series that only
appear after an incident are there."""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.observability import (
    SCHEDULER_ENV,
    Query,
    alert_queries,
    dashboard_queries,
    exposed_labels,
    grafana_to_promql,
    make_wallet_traffic,
    name_problems,
    read_names,
    scrape,
)
from tests.support import (
    free_port,
    http_post,
    sample_sum,
    start_servers,
    task_owner,
    wait_for,
)

TANDEM_NAME = re.compile(r"\btandem_[a-z0-9_]+")


@pytest.fixture(scope="module")
def exposition(database_url: str, log_dir: Path) -> Iterator[list[str]]:
    """The /metrics pages of two instances after traffic, finished runs and a failover."""
    # Housekeeping on: the change stream's delivery worker runs, and an endpoint that refuses
    # every connection gives it a lag and failed deliveries to export.
    env = {**SCHEDULER_ENV, "TANDEM_MAINTENANCE_ENABLED": "true"}
    servers = start_servers(
        database_url, log_dir, 2, extra_env={**env, "TANDEM_WEBHOOKS_ALLOW_PRIVATE": "true"}
    )
    try:
        hook = {"url": f"http://127.0.0.1:{free_port()}/closed"}
        assert http_post(f"{servers[0].url}/webhook-endpoints", json=hook).status_code == 201
        for server in servers:
            make_wallet_traffic(server)
        wait_for(
            lambda: any(
                sample_sum(scrape(s), "tandem_events_lag_seconds")
                and sample_sum(scrape(s), "tandem_webhook_deliveries_total", outcome="failed")
                for s in servers
            ),
            30,
            "the delivery worker exported the endpoint's lag",
        )
        wait_for(
            lambda: any(
                sample_sum(scrape(s), "tandem_scheduler_runs_total", status="succeeded")
                for s in servers
            ),
            15,
            "a run succeeded",
        )
        wait_for(lambda: task_owner(servers, "Long"), 15, "Long runs")
        owner = task_owner(servers, "Long")
        assert owner is not None
        (other,) = (s for s in servers if s is not owner)
        owner.process.send_signal(signal.SIGSTOP)
        try:
            wait_for(
                lambda: sample_sum(scrape(other), "tandem_scheduler_recoveries_total", task="Long"),
                20,
                "the other instance recovered Long",
            )
        finally:
            owner.process.send_signal(signal.SIGCONT)
        wait_for(
            lambda: sample_sum(scrape(owner), "tandem_scheduler_fenced_out_total"),
            15,
            "the paused owner fenced its stale run out",
        )
        assert http_post(f"{servers[0].url}/tasks/Housekeeping/pause").status_code == 200
        wait_for(
            lambda: all(
                sample_sum(scrape(s), "tandem_scheduler_task_interval_seconds", task="Quick")
                and sample_sum(
                    scrape(s), "tandem_scheduler_task_paused_timestamp_seconds", task="Housekeeping"
                )
                for s in servers
            ),
            15,
            "the task gauges are exported",
        )
        yield [scrape(server) for server in servers]
    finally:
        for server in servers:
            server.process.send_signal(signal.SIGCONT)
            server.stop()


def test_reader_finds_names_and_labels() -> None:
    """The PromQL reader finds metric names, selector labels and grouping labels, and not
    functions, keywords, strings or durations."""
    names = read_names(
        'histogram_quantile(0.9, sum by (le, route) (rate(a_bucket{status=~"5..", x="y"}[5m])))'
        " / on () group_left max(b offset 1m) > bool 3 and count(c) without (z) or vector(0)"
    )
    assert names.metrics == {"a_bucket", "b", "c"}
    assert names.selector_labels == {"a_bucket": {"status", "x"}, "b": set(), "c": set()}
    assert names.groupings == [
        (frozenset({"le", "route"}), frozenset({"a_bucket"})),
        (frozenset({"z"}), frozenset({"c"})),
    ]
    with pytest.raises(ValueError, match="without a metric name"):
        read_names('{__name__=~"tandem_.*"}')


def test_name_check_reports_what_is_missing() -> None:
    """The check fails on an unknown name, a histogram read without its suffix, a selector
    label and a grouping label the metric lacks; it accepts target labels and `up`."""
    page = (
        "# TYPE tandem_x_seconds histogram\n"
        'tandem_x_seconds_bucket{task="t",le="1.0"} 1\n'
        'tandem_x_seconds_bucket{task="t",le="+Inf"} 1\n'
        'tandem_x_seconds_count{task="t"} 1\n'
        'tandem_x_seconds_sum{task="t"} 0.5\n'
    )
    exposed = exposed_labels([page])

    def problems(expr: str) -> list[str]:
        return name_problems(Query("q", expr), exposed)

    assert problems("sum by (le, task, instance) (tandem_x_seconds_bucket{job='tandem'})") == []
    assert problems('count(up{job="tandem"} == 1)') == []
    assert problems("tandem_x_seconds") == ["q: no sample named tandem_x_seconds"]
    assert problems("tandem_nope_total") == ["q: no sample named tandem_nope_total"]
    assert problems("not_ours") == ["q: no sample named not_ours"]
    assert problems('tandem_x_seconds_count{route="/"}') == [
        "q: tandem_x_seconds_count has no label 'route'"
    ]
    assert problems("max by (route) (tandem_x_seconds_sum)") == [
        "q: aggregates tandem_x_seconds_sum by missing 'route'"
    ]


def test_reader_misses_no_tandem_name() -> None:
    """Every tandem_* token in the deployment's queries is read as a metric name (so the
    checks below cover them all)."""
    for query in alert_queries() + dashboard_queries():
        expr = grafana_to_promql(query.expr)
        assert set(TANDEM_NAME.findall(expr)) <= read_names(expr).metrics, query.where


def test_alerts_read_only_exposed_names(exposition: list[str]) -> None:
    """Each metric in alerts.yml exists as a sample on the instances, with the labels the
    rules select and group by."""
    exposed = exposed_labels(exposition)
    problems = [p for query in alert_queries() for p in name_problems(query, exposed)]
    assert problems == []


def test_dashboards_read_only_exposed_names(exposition: list[str]) -> None:
    """Each metric in the dashboards' queries exists as a sample on the instances (histograms
    through _bucket/_sum/_count), with the labels the queries select and group by."""
    exposed = exposed_labels(exposition)
    problems = [p for query in dashboard_queries() for p in name_problems(query, exposed)]
    assert problems == []


def test_every_tandem_metric_is_on_a_dashboard(exposition: list[str]) -> None:
    """The other direction: every tandem_* metric an instance exposes is read by at least
    one dashboard query (a metric nobody can see is a metric nobody watches). The client
    library's *_created timestamps are bookkeeping, not metrics."""
    families: dict[str, set[str]] = {}
    for text in exposition:
        for family in text_string_to_metric_families(text):
            if family.name.startswith("tandem_") and not family.name.endswith("_created"):
                families.setdefault(family.name, set()).update(s.name for s in family.samples)
    shown = {m for q in dashboard_queries() for m in read_names(grafana_to_promql(q.expr)).metrics}
    unseen = sorted(name for name, samples in families.items() if not samples & shown)
    assert unseen == []
