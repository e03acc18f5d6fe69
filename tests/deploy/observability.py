"""Helpers for the checks of deploy/prometheus, deploy/alertmanager and deploy/grafana: the
real Prometheus tools (and a live Prometheus with the deployed settings),
the PromQL the alerts and dashboards hold, a best-effort reader of the metric and label names
in it, and a task registry for the servers these tests start.

The servers import this module (TANDEM_SCHEDULER_TASKS points at ``registry`` below), so it
only imports what a server can import too.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tandem.scheduler.registry import Registry, TaskContext
from tests.support import AUTH, REPO, Server, free_port, http_get

DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "tandem.yml"
COMPOSE = DEPLOY / "compose.yaml"
ALERTMANAGER_DIR = DEPLOY / "alertmanager"
ALERTMANAGER_CONFIG = ALERTMANAGER_DIR / "alertmanager.yml"
# The alertmanager container's entry point: the webhook URL from the environment into a copy.
ALERTMANAGER_ENTRYPOINT = ALERTMANAGER_DIR / "entrypoint.sh"
WEBHOOK_URL_VARIABLE = "ALERTMANAGER_WEBHOOK_URL"

# Labels Prometheus adds to every scraped series (the job's name and the target's address).
TARGET_LABELS = frozenset({"job", "instance"})
# Series Prometheus makes itself for every target, with the labels they carry.
PROMETHEUS_MADE: dict[str, frozenset[str]] = {
    "up": TARGET_LABELS,
    "scrape_duration_seconds": TARGET_LABELS,
    "scrape_samples_scraped": TARGET_LABELS,
}


# --- the real tools ---------------------------------------------------------------------


def run_tool(*args: str | Path, cwd: Path | None = None) -> str:
    """Run a tool to completion; fail the test with its output unless it exits 0."""
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, (
        f"{' '.join(map(str, args))} exited {result.returncode}:\n{output}"
    )
    return output


@dataclass
class Daemon:
    """A real long-running tool (Prometheus, Alertmanager) started by a test, logging to a
    file."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``predicate``; fail with the tool's log if it exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_daemon(args: list[str | Path], url: str, log_path: Path) -> Daemon:
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(arg) for arg in args], stdout=log, stderr=subprocess.STDOUT)
    return Daemon(url, process, log_path)


def start_prometheus(
    binary: str, folder: Path, targets: list[str], alertmanager: str | None = None
) -> Daemon:
    """The real Prometheus on a free port with live_prometheus_config(...) (its data in
    ``folder``); not waited for."""
    address = f"127.0.0.1:{free_port()}"
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump(live_prometheus_config(targets, address, alertmanager)))
    return start_daemon(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address={address}",
            "--log.level=warn",
        ],
        f"http://{address}",
        folder / "prometheus.log",
    )


def live_prometheus_config(
    targets: list[str], own_address: str, alertmanager: str | None = None
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with static targets instead of Docker's DNS, the
    repository's alerts.yml by absolute path, and the Alertmanager at ``alertmanager``
    instead of the compose service (none at all when None); every other setting as
    deployed."""
    config: dict[str, Any] = load_yaml(PROMETHEUS_CONFIG)
    for job in config["scrape_configs"]:
        if job["job_name"] == "tandem":
            discovery = {key for key in job if key.endswith("_sd_configs")}
            assert discovery == {"dns_sd_configs"}, "the test replaces exactly the DNS discovery"
            del job["dns_sd_configs"]
            job["static_configs"] = [{"targets": targets}]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [own_address]}]
    assert config["rule_files"] == [ALERTS.name]
    config["rule_files"] = [str(ALERTS)]
    (sender,) = config["alerting"]["alertmanagers"]
    assert set(sender) == {"static_configs"}, "the test replaces exactly the one target"
    if alertmanager is None:
        del config["alerting"]
    else:
        sender["static_configs"] = [{"targets": [alertmanager]}]
    return config


# --- the files --------------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file, by file name."""
    return {
        path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def iter_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The dashboard's panels, with those folded into collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


@dataclass(frozen=True)
class Query:
    """One PromQL expression from the deployment, and where it is."""

    where: str
    expr: str


def dashboard_queries() -> list[Query]:
    return [
        Query(f"{name} / {panel['title']} / {target['refId']}", target["expr"])
        for name, board in dashboards().items()
        for panel in iter_panels(board)
        for target in panel.get("targets", [])
        if "expr" in target
    ]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alerts.yml / {rule['alert']}", rule["expr"]) for rule in alert_rules()]


# Grafana's built-in variables, as plain PromQL for checking and for querying Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1m",
}


def grafana_to_promql(expr: str) -> str:
    """The expression with Grafana's variables replaced; an unknown variable is an error (a
    dashboard variable would need a value here before its panels can be checked)."""
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    leftover = re.search(r"\$\{?\w+", expr)
    if leftover is not None:
        raise ValueError(f"unknown Grafana variable {leftover.group()} in {expr!r}")
    return expr


def mounted_source(service: dict[str, Any], path: PurePosixPath) -> Path | None:
    """The repository file a compose service sees at ``path``, through its bind mounts
    (relative sources are relative to deploy/); None when no bind mount covers it."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        if not source.startswith((".", "/")):
            continue  # a named volume
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return (DEPLOY / source / path.relative_to(target)).resolve()
    return None


# --- reading metric and label names out of PromQL ---------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(),{}@])
  | (?P<space>\s+)
    """,
    re.VERBOSE,
)
_AGGREGATORS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    }
)
_GROUPING = frozenset({"by", "without"})
_MATCHING = frozenset({"on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _GROUPING | _MATCHING | {"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"}


@dataclass
class PromqlNames:
    """What an expression reads: metric names, the labels its selectors match on, and the
    labels each aggregation groups by (with the metrics it aggregates)."""

    metrics: set[str] = field(default_factory=set)
    selector_labels: dict[str, set[str]] = field(default_factory=dict)
    groupings: list[tuple[frozenset[str], frozenset[str]]] = field(default_factory=list)


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read {expr[position:]!r} in {expr!r}")
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def _closing(tokens: list[tuple[str, str]], start: int) -> int:
    """Index of the bracket closing the one at ``start``."""
    pairs = {"(": ")", "{": "}"}
    opening, depth = tokens[start][1], 0
    for index in range(start, len(tokens)):
        text = tokens[index][1]
        if tokens[index][0] != "op":
            continue
        if text == opening:
            depth += 1
        elif text == pairs[opening]:
            depth -= 1
            if depth == 0:
                return index
    raise ValueError(f"unbalanced {opening!r}")


def _label_list(tokens: list[tuple[str, str]], start: int) -> tuple[frozenset[str], int]:
    """The labels in ``( a, b )`` starting at ``start``, and the index after ``)``."""
    end = _closing(tokens, start)
    labels = frozenset(text for kind, text in tokens[start + 1 : end] if kind == "ident")
    return labels, end + 1


def read_names(expr: str) -> PromqlNames:
    """Best effort, but never silent: syntax it cannot read raises ValueError. Validity is
    left to the real parser (promtool); this only finds the names."""
    tokens = _tokens(expr)
    names = PromqlNames()
    selectors: list[tuple[int, str]] = []  # (token index, metric name)
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in _KEYWORDS:
            if text.lower() in _GROUPING | _MATCHING and following == "(":
                _labels, index = _label_list(tokens, index + 1)
                continue
        elif kind == "ident" and following == "(":
            pass  # a function or an aggregation
        elif kind == "ident" and text not in _AGGREGATORS:
            names.metrics.add(text)
            selectors.append((index, text))
            matched = names.selector_labels.setdefault(text, set())
            if following == "{":
                end = _closing(tokens, index + 1)
                for position in range(index + 2, end):
                    if tokens[position][0] == "ident" and tokens[position + 1][1] in (
                        "=",
                        "!=",
                        "=~",
                        "!~",
                    ):
                        matched.add(tokens[position][1])
                index = end
        elif text == "{":
            raise ValueError(f"a selector without a metric name cannot be checked: {expr!r}")
        index += 1

    for index, (kind, text) in enumerate(tokens):
        if kind != "ident" or text not in _AGGREGATORS:
            continue
        position = index + 1
        grouping: frozenset[str] | None = None
        if position < len(tokens) and tokens[position][1].lower() in _GROUPING:
            grouping, position = _label_list(tokens, position + 1)
        if position >= len(tokens) or tokens[position][1] != "(":
            continue  # a metric that happens to be called like an aggregation
        end = _closing(tokens, position)
        if grouping is None and end + 1 < len(tokens) and tokens[end + 1][1].lower() in _GROUPING:
            grouping, _after = _label_list(tokens, end + 2)
        if grouping:
            inside = frozenset(name for at, name in selectors if position < at < end)
            names.groupings.append((grouping, inside))
    return names


# --- checking names against a real /metrics page ----------------------------------------


def exposed_labels(exposition: Iterable[str]) -> dict[str, set[str]]:
    """Sample name -> the label names seen on it, over one or more /metrics pages."""
    seen: dict[str, set[str]] = {}
    for text in exposition:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                seen.setdefault(sample.name, set()).update(sample.labels)
    return seen


def name_problems(query: Query, exposed: dict[str, set[str]]) -> list[str]:
    """What ``query`` reads that the exposed samples do not have: unknown metric names (a
    histogram is read through its _bucket, _sum and _count samples) and labels its selectors
    or aggregations use that the metric lacks. Prometheus' target labels are always there."""
    names = read_names(grafana_to_promql(query.expr))
    problems = []

    def labels_of(metric: str) -> set[str] | None:
        if metric.startswith("tandem_"):
            found = exposed.get(metric)
            return None if found is None else found | TARGET_LABELS
        made = PROMETHEUS_MADE.get(metric)
        return None if made is None else set(made)

    for metric in sorted(names.metrics):
        if labels_of(metric) is None:
            problems.append(f"{query.where}: no sample named {metric}")
    for metric, matched in sorted(names.selector_labels.items()):
        have = labels_of(metric)
        if have is not None:
            for label in sorted(matched - have - {"__name__"}):
                problems.append(f"{query.where}: {metric} has no label {label!r}")
    for grouping, metrics in names.groupings:
        for metric in sorted(metrics):
            have = labels_of(metric)
            if have is not None:
                for label in sorted(grouping - have):
                    problems.append(f"{query.where}: aggregates {metric} by missing {label!r}")
    return problems


# --- servers with a scheduler -----------------------------------------------------------

# Compressed like tests/scheduler/test_cluster.py: a lease lasts 3 s, not 10.
SCHEDULER_ENV = {
    "TANDEM_SCHEDULER_ENABLED": "true",
    "TANDEM_SCHEDULER_TASKS": "tests.deploy.observability:registry",
    "TANDEM_SCHEDULER_POLL_INTERVAL": "0.2",
    "TANDEM_SCHEDULER_HEARTBEAT_INTERVAL": "0.5",
    "TANDEM_SCHEDULER_LEASE": "3.0",
    "TANDEM_SCHEDULER_SELF_FENCE_AFTER": "2.0",
    "TANDEM_SCHEDULER_STEAL_AFTER": "1.0",
}


async def _busy(ctx: TaskContext, seconds: float) -> None:
    await ctx.sleep(seconds)


registry = Registry()


@registry.task("Quick", timedelta(seconds=1))
async def quick(ctx: TaskContext) -> None:
    """Succeeds every second: runs, durations, start lags and last successes."""
    await _busy(ctx, 0.1)


@registry.task("Long", timedelta(seconds=0.5))
async def long(ctx: TaskContext) -> None:
    """Outlasts any test: one instance holds it, so pausing that one forces a failover."""
    await _busy(ctx, 60.0)


@registry.task("Housekeeping", timedelta(hours=1), watched=True)
async def housekeeping(ctx: TaskContext) -> None:
    """A watched task, paused by the tests: its paused-since gauge is exported."""
    await _busy(ctx, 0.1)


# No task of its own: with TANDEM_MAINTENANCE_ENABLED the server runs only the housekeeping
# tasks (tandem/maintenance.py), and has no run in progress to drain when stopped.
housekeeping_only = Registry()


def scrape(server: Server) -> str:
    return http_get(f"{server.url}/metrics", timeout=10).text


def make_wallet_traffic(server: Server) -> None:
    """Every wallet outcome the dashboards show: created, ok, replayed, refused, not found,
    invalid."""
    with httpx.Client(base_url=server.url, timeout=10, headers=AUTH) as client:
        created = client.post("/users", json={"balance": 100})
        assert created.status_code == 201, created.text
        user = created.json()["userId"]
        update = {"userId": user, "amount": -10}
        assert client.post("/balance/update", json=update).status_code == 200
        key = {"Idempotency-Key": f"deploy-test-{server.port}"}
        assert client.post("/balance/update", json=update, headers=key).status_code == 200
        replay = client.post("/balance/update", json=update, headers=key)
        assert replay.headers.get("Idempotent-Replayed") == "true"
        refused = client.post("/balance/update", json={"userId": user, "amount": -1000})
        assert refused.status_code == 409, refused.text
        missing = client.post("/balance/update", json={"userId": 2**62, "amount": 1})
        assert missing.status_code == 404, missing.text
        malformed = client.post(
            "/balance/update", content=b"{", headers={"content-type": "application/json"}
        )
        assert malformed.status_code == 422, malformed.text
        assert client.get(f"/balance/{user}").json()["balance"] == 80
