"""deploy/alertmanager, checked by Alertmanager's own amtool: the configuration, the receiver
each alert of alerts.yml is routed to, and the container's entry point (the webhook URL from
the environment), run for real."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.observability import (
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_ENTRYPOINT,
    WEBHOOK_URL_VARIABLE,
    alert_rules,
    load_yaml,
    run_tool,
)
from tests.support import require_tool

# The receiver each severity of alerts.yml reaches (the payload's `receiver` field).
SEVERITY_RECEIVERS = {"critical": "tandem-critical", "warning": "tandem-warning"}
PLACEHOLDER = "https://tandem-alert-webhook.invalid/"
# Everything a URL may hold that sed, awk or YAML could take for syntax.
AWKWARD_URL = "https://hooks.example.com/a|b/c\\d?token=x&y='1'#%20:frag"


def _webhooks(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [hook for receiver in config["receivers"] for hook in receiver["webhook_configs"]]


def _routes(route: dict[str, Any]) -> list[dict[str, Any]]:
    """The route and every route below it."""
    return [route, *(r for child in route.get("routes", []) for r in _routes(child))]


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)([smh])", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_config_is_valid() -> None:
    """`amtool check-config` accepts alertmanager.yml as shipped (with its placeholder URL)."""
    output = run_tool(require_tool("amtool"), "check-config", ALERTMANAGER_CONFIG)
    assert "SUCCESS" in output, output
    assert f"{len(SEVERITY_RECEIVERS)} receivers" in output, output


def test_every_alert_reaches_the_receiver_of_its_severity() -> None:
    """amtool routes each alert of alerts.yml, with its own labels, to the receiver named
    after its severity, and to that one only."""
    amtool = require_tool("amtool")
    for rule in alert_rules():
        labels = {"alertname": rule["alert"], **rule["labels"]}
        expected = SEVERITY_RECEIVERS[labels["severity"]]
        output = run_tool(
            amtool,
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"--verify.receivers={expected}",
            *(f"{name}={value}" for name, value in labels.items()),
        )
        assert output.splitlines()[0] == expected, (rule["alert"], output)


def test_grouping_and_timing_suit_production() -> None:
    """Notifications are grouped by alert name and task; the first waits for the rest of its
    group (10 s to a minute), changes are reported at most every minute or more, and a firing
    alert is repeated hourly or less often, a critical one at least as often as a warning."""
    route = load_yaml(ALERTMANAGER_CONFIG)["route"]
    assert route["group_by"] == ["alertname", "task"]
    for node in _routes(route):
        assert "group_by" not in node or node is route, "one grouping for every route"
        effective = {key: node.get(key, route[key]) for key in ("group_wait", "group_interval")}
        assert 10 <= _seconds(effective["group_wait"]) <= 60, node
        assert _seconds(effective["group_interval"]) >= 60, node
        assert _seconds(node.get("repeat_interval", route["repeat_interval"])) >= 3600, node
    by_receiver = {node["receiver"]: node for node in route["routes"]}
    assert _seconds(by_receiver["tandem-critical"]["repeat_interval"]) <= _seconds(
        by_receiver["tandem-warning"]["repeat_interval"]
    )


def test_receivers_post_to_the_webhook_placeholder() -> None:
    """Every receiver is the webhook, resolved alerts included, at the placeholder the entry
    point replaces (a `.invalid` name: the file as it stands delivers nowhere); every route
    names a receiver that exists, and the inhibition names alerts that exist."""
    config = load_yaml(ALERTMANAGER_CONFIG)
    names = [receiver["name"] for receiver in config["receivers"]]
    assert sorted(names) == sorted(SEVERITY_RECEIVERS.values())
    for receiver in config["receivers"]:
        assert set(receiver) == {"name", "webhook_configs"}, receiver["name"]
    for hook in _webhooks(config):
        assert hook == {"url": PLACEHOLDER, "send_resolved": True}
    assert {node["receiver"] for node in _routes(config["route"])} <= set(names)
    alerts = {rule["alert"] for rule in alert_rules()}
    for rule in config["inhibit_rules"]:
        named = " ".join(rule["source_matchers"] + rule["target_matchers"])
        assert set(re.findall(r"Tandem\w+", named)) <= alerts, rule


def render(tmp_path: Path, env: dict[str, str], *command: str | Path) -> subprocess.Popen[str]:
    """entrypoint.sh on the shipped config, run by /bin/sh as the container runs it."""
    clean = {k: v for k, v in os.environ.items() if k != WEBHOOK_URL_VARIABLE}
    return subprocess.Popen(
        [
            "/bin/sh",
            str(ALERTMANAGER_ENTRYPOINT),
            str(ALERTMANAGER_CONFIG),
            str(tmp_path / "rendered.yml"),
            *map(str, command),
        ],
        env={**clean, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_entry_point_writes_the_url_and_runs_the_command(tmp_path: Path) -> None:
    """The entry point writes ALERTMANAGER_WEBHOOK_URL, however awkward its characters, into
    every webhook of a copy that is otherwise the shipped config, readable by its owner only;
    then it runs the command it was given (here amtool, which accepts the copy)."""
    amtool = require_tool("amtool")
    rendered = tmp_path / "rendered.yml"
    env = {WEBHOOK_URL_VARIABLE: AWKWARD_URL}
    process = render(tmp_path, env, amtool, "check-config", rendered)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert f"Checking '{rendered}'  SUCCESS" in output, output
    assert rendered.stat().st_mode & 0o077 == 0, oct(rendered.stat().st_mode)
    copy = load_yaml(rendered)
    assert [hook["url"] for hook in _webhooks(copy)] == [AWKWARD_URL] * len(SEVERITY_RECEIVERS)
    shipped = load_yaml(ALERTMANAGER_CONFIG)
    for hook in _webhooks(shipped):
        hook["url"] = AWKWARD_URL
    assert copy == shipped


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({}, f"set {WEBHOOK_URL_VARIABLE}"),
        ({WEBHOOK_URL_VARIABLE: ""}, f"set {WEBHOOK_URL_VARIABLE}"),
        ({WEBHOOK_URL_VARIABLE: "https://a.example/x\n  y: 1"}, "whitespace"),
    ],
    ids=["unset", "empty", "multi-line"],
)
def test_entry_point_refuses_a_missing_or_broken_url(
    tmp_path: Path, env: dict[str, str], complaint: str
) -> None:
    """Without a URL, or with one that could break out of its YAML string, the entry point
    says why and exits non-zero without running Alertmanager."""
    ran = tmp_path / "ran"
    process = render(tmp_path, env, "/bin/sh", "-c", f"touch {ran}")
    output, _ = process.communicate(timeout=30)
    assert process.returncode != 0
    assert complaint in output, output
    assert not ran.exists()
