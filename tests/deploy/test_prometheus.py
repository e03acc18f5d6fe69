"""deploy/prometheus, checked by Prometheus' own promtool: the configuration, the alert rules
and their unit tests; and the properties the deployment relies on, read off the files."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from tests.deploy.observability import (
    ALERT_TESTS,
    ALERTS,
    COMPOSE,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    alert_rules,
    load_yaml,
    mounted_source,
    run_tool,
)
from tests.support import require_tool

SEVERITIES = {"critical", "warning", "info"}


def test_config_is_valid() -> None:
    """`promtool check config` accepts prometheus.yml and finds the rule file beside it."""
    output = run_tool(require_tool("promtool"), "check", "config", PROMETHEUS_CONFIG)
    assert "1 rule files found" in output, output


def test_alert_rules_are_valid() -> None:
    """`promtool check rules` accepts alerts.yml."""
    run_tool(require_tool("promtool"), "check", "rules", ALERTS)


def test_alert_unit_tests_pass() -> None:
    """`promtool test rules alerts.test.yml` passes (fired alerts with exact labels and
    annotations, quiet cases quiet)."""
    run_tool(require_tool("promtool"), "test", "rules", ALERT_TESTS.name, cwd=PROMETHEUS_DIR)


def _cases() -> list[dict[str, Any]]:
    return [
        case for test in load_yaml(ALERT_TESTS)["tests"] for case in test.get("alert_rule_test", [])
    ]


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """Each alert in alerts.yml has a promtool case expecting it to fire (with its labels and
    annotations spelled out) and one expecting it to stay quiet; no case names an alert that
    does not exist."""
    alerts = {rule["alert"] for rule in alert_rules()}
    firing, quiet = set(), set()
    for case in _cases():
        if case.get("exp_alerts"):
            for expected in case["exp_alerts"]:
                assert expected.get("exp_labels"), case
                assert expected.get("exp_annotations"), case
            firing.add(case["alertname"])
        else:
            quiet.add(case["alertname"])
    assert alerts - firing == set(), "never tested firing"
    assert alerts - quiet == set(), "never tested quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


def test_the_tests_read_the_deployed_rules() -> None:
    """The unit tests load alerts.yml itself, not a copy."""
    assert load_yaml(ALERT_TESTS)["rule_files"] == [ALERTS.name]


def test_every_alert_has_severity_and_text() -> None:
    """Every alert carries a severity label and summary and description annotations; names
    are unique."""
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    for rule in rules:
        assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), rule["alert"]
        assert annotations.get("description"), rule["alert"]


def test_alerts_the_deployment_promises() -> None:
    """The alerts the deployment is built around exist (a rename would quietly break
    silences and links to them)."""
    assert {rule["alert"] for rule in alert_rules()} >= {
        "TandemInstanceDown",
        "TandemTaskNotSucceeding",
        "TandemLeasesLost",
        "TandemHigh5xxRate",
    }


def test_every_replica_is_scraped_directly() -> None:
    """Job `tandem` finds the replicas through DNS (name `app`, A records, port 8000, a
    refresh within seconds) and scrapes each every 5 s; nothing is scraped through nginx."""
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    tandem = jobs["tandem"]
    assert tandem.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"
    assert tandem.get("metrics_path", "/metrics") == "/metrics"
    assert tandem["dns_sd_configs"] == [
        {"names": ["app"], "type": "A", "port": 8000, "refresh_interval": "10s"}
    ]
    assert "static_configs" not in tandem
    assert "prometheus" in jobs, "Prometheus should scrape itself"
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            assert not any("nginx" in target for target in static["targets"]), job


def test_rules_are_loaded_and_evaluated_often() -> None:
    """prometheus.yml loads alerts.yml by a relative path and evaluates rules more often
    than the shortest `for:` of any alert."""
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    assert config["global"]["evaluation_interval"] == "5s"


def test_compose_mounts_the_files_prometheus_reads() -> None:
    """In deploy/compose.yaml, the `prometheus` service runs with the config file this
    directory holds, and its rule file (relative to the config) is mounted next to it."""
    compose = load_yaml(COMPOSE)
    service = compose["services"]["prometheus"]
    assert "app" in compose["services"], "the scrape config resolves the service name `app`"
    flag = next(a for a in service["command"] if a.startswith("--config.file="))
    config_in_container = PurePosixPath(flag.split("=", 1)[1])
    assert mounted_source(service, config_in_container) == PROMETHEUS_CONFIG
    rules_in_container = config_in_container.parent / "alerts.yml"
    assert mounted_source(service, rules_in_container) == ALERTS
