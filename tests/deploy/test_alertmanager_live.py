"""An alert that reaches someone, end to end with the real programs: a `tandem serve` whose
ledger no longer adds up, the real Prometheus with the deployment's settings and alerts.yml
(TandemLedgerMismatch fires on the first evaluation that sees the mismatch), Debian's
Alertmanager with the shipped routing tree, and a webhook that the test listens on.

What differs from the deployment, and nothing else:
- Prometheus: as in test_prometheus_live.py (static targets instead of Docker's DNS), and it
  sends to this Alertmanager's address instead of `alertmanager:9093`;
- Alertmanager: the config is written by the shipped entrypoint.sh, as in the container,
  with ALERTMANAGER_WEBHOOK_URL pointing at the test's webhook; in that copy the test then
  shortens every route's `group_wait` to 1 s (10 s for critical alerts as shipped), so the
  first notification comes within the test's time. Routes, matchers, grouping, receivers and
  the other intervals are the shipped ones.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

from tandem.maintenance import VERIFY_LEDGER_TASK
from tests.deploy.observability import (
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_ENTRYPOINT,
    SCHEDULER_ENV,
    WEBHOOK_URL_VARIABLE,
    Daemon,
    alert_rules,
    load_yaml,
    start_daemon,
    start_prometheus,
)
from tests.support import AUTH, free_port, http_post, query, require_tool, start_server, wait_for

ALERT = "TandemLedgerMismatch"
WEBHOOK_PATH = "/tandem-alerts"
# From the broken ledger to the webhook: a verification, a scrape (5 s), an evaluation (5 s)
# and group_wait (1 s here).
DELIVERY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Delivery:
    path: str
    content_type: str
    body: dict[str, Any]


class Webhook:
    """A local HTTP endpoint that records what Alertmanager posts to it."""

    def __init__(self) -> None:
        self.received: queue.Queue[Delivery] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length))
                received.put(Delivery(self.path, self.headers.get("Content-Type", ""), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}{WEBHOOK_PATH}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def alertmanager_config(folder: Path, webhook_url: str) -> Path:
    """The shipped config as the container's entry point writes it, with the webhook's URL;
    then every route's group_wait shortened to 1 s."""
    rendered = folder / "rendered.yml"
    clean = {k: v for k, v in os.environ.items() if k != WEBHOOK_URL_VARIABLE}
    subprocess.run(
        ["/bin/sh", ALERTMANAGER_ENTRYPOINT, ALERTMANAGER_CONFIG, rendered, "true"],
        env={**clean, WEBHOOK_URL_VARIABLE: webhook_url},
        check=True,
        timeout=30,
    )
    config = load_yaml(rendered)
    routes = [config["route"]]
    while routes:
        route = routes.pop()
        if "group_wait" in route:
            route["group_wait"] = "1s"
        routes.extend(route.get("routes", []))
    path = folder / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _ready(daemon: Daemon) -> bool:
    try:
        return httpx.get(f"{daemon.url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Delivered:
    prometheus: str
    notification: Delivery


@pytest.fixture(scope="module")
def delivered(
    database_url: str, log_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Delivered]:
    """The first notification the webhook gets after a balance is changed behind the
    journal's back and the ledger verified."""
    prometheus_binary = require_tool("prometheus")
    alertmanager_binary = require_tool("prometheus-alertmanager")
    folder = tmp_path_factory.mktemp("alerting")
    webhook = Webhook()
    daemons: list[Daemon] = []
    server = None
    try:
        address = f"127.0.0.1:{free_port()}"
        alertmanager = start_daemon(
            [
                alertmanager_binary,
                f"--config.file={alertmanager_config(folder, webhook.url)}",
                f"--storage.path={folder / 'alertmanager'}",
                f"--web.listen-address={address}",
                # As in compose.yaml: one Alertmanager, no gossip.
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            f"http://{address}",
            folder / "alertmanager.log",
        )
        daemons.append(alertmanager)
        # Housekeeping only: the verification is the task that matters here.
        env = {
            **SCHEDULER_ENV,
            "TANDEM_SCHEDULER_TASKS": "tests.deploy.observability:housekeeping_only",
            "TANDEM_MAINTENANCE_ENABLED": "true",
        }
        server = start_server(database_url, log_dir, extra_env=env)
        prometheus = start_prometheus(
            prometheus_binary, folder, [f"127.0.0.1:{server.port}"], alertmanager=address
        )
        daemons.append(prometheus)
        alertmanager.wait_until(lambda: _ready(alertmanager), 15, "Alertmanager ready")
        prometheus.wait_until(lambda: _ready(prometheus), 15, "Prometheus ready")

        # A balance the journal does not explain, then a verification.
        with httpx.Client(base_url=server.url, timeout=10, headers=AUTH) as client:
            created = client.post("/users", json={"balance": 100})
            assert created.status_code == 201, created.text
        user = created.json()["userId"]
        query(database_url, "UPDATE users SET balance = balance + 1 WHERE id = $1", user)
        run = f"{server.url}/tasks/{VERIFY_LEDGER_TASK}/run"
        wait_for(lambda: http_post(run).status_code == 200, 15, "verification registered")

        try:
            notification = webhook.received.get(timeout=DELIVERY_TIMEOUT)
        except queue.Empty:
            logs = "\n".join(f"{d.log_path.name}:\n{d.log()[-2000:]}" for d in daemons)
            raise AssertionError(f"no notification in {DELIVERY_TIMEOUT} s\n{logs}") from None
        yield Delivered(prometheus.url, notification)
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        if server is not None:
            server.stop()
        webhook.close()


def _rule(name: str) -> dict[str, Any]:
    return next(rule for rule in alert_rules() if rule["alert"] == name)


def test_the_alert_reaches_the_receiver_of_its_severity(delivered: Delivered) -> None:
    """The webhook at ALERTMANAGER_WEBHOOK_URL (its path included) gets Alertmanager's JSON:
    TandemLedgerMismatch firing, from receiver tandem-critical, the route of its severity."""
    notification = delivered.notification
    assert notification.path == WEBHOOK_PATH
    assert notification.content_type == "application/json"
    body = notification.body
    assert body["version"] == "4"
    assert (body["status"], body["receiver"]) == ("firing", "tandem-critical")
    assert [alert["status"] for alert in body["alerts"]] == ["firing"]
    assert _rule(ALERT)["labels"]["severity"] == "critical"


def test_the_alert_carries_the_rules_labels_and_text(delivered: Delivered) -> None:
    """The alert holds exactly the labels of the rule in alerts.yml (its name and severity: the
    expression aggregates the instances away), its summary, and a description that counts the
    one mismatch; it links back to the Prometheus that evaluated it, and to the rule's
    expression (Prometheus names itself by host name: only the port is compared)."""
    (alert,) = delivered.notification.body["alerts"]
    rule = _rule(ALERT)
    assert alert["labels"] == {"alertname": ALERT, **rule["labels"]}
    assert alert["annotations"]["summary"] == rule["annotations"]["summary"]
    assert alert["annotations"]["description"].startswith("1 ledger invariants are broken")
    link = urlsplit(alert["generatorURL"])
    assert (link.port, link.path) == (urlsplit(delivered.prometheus).port, "/graph")
    assert parse_qs(link.query)["g0.expr"] == [rule["expr"]]


def test_notifications_are_grouped_as_shipped(delivered: Delivered) -> None:
    """The group is the alert name (the shipped group_by is alertname and task; this alert
    has no task), and the group key names the critical route's matcher."""
    body = delivered.notification.body
    assert body["groupLabels"] == {"alertname": ALERT}
    assert body["commonLabels"] == body["alerts"][0]["labels"]
    assert 'severity="critical"' in body["groupKey"], body["groupKey"]
