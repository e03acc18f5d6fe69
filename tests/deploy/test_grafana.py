"""deploy/grafana without a Grafana: the dashboards' structure and layout, every query
through Prometheus' own parser (promtool), and the provisioning files against the dashboards,
the Prometheus configuration and the compose file's mounts."""

from __future__ import annotations

import itertools
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.deploy.observability import (
    COMPOSE,
    DASHBOARD_PROVIDERS,
    DASHBOARDS_DIR,
    DATASOURCES,
    GRAFANA_DIR,
    PROMETHEUS_CONFIG,
    dashboard_queries,
    dashboards,
    grafana_to_promql,
    iter_panels,
    load_yaml,
    mounted_source,
    run_tool,
)
from tests.support import require_tool

GRID_COLUMNS = 24
# Grafana 11 (the compose file's image) reads schema versions up to 40 and migrates older ones.
SCHEMA_VERSIONS = range(36, 41)
PANEL_TYPES = {"timeseries", "stat", "table", "bargauge", "gauge", "row", "text", "heatmap"}
NAMES = sorted(path.name for path in DASHBOARDS_DIR.glob("*.json"))


def provisioned_datasource() -> dict[str, Any]:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert isinstance(source, dict)
    return source


def datasource_ref() -> dict[str, str]:
    source = provisioned_datasource()
    return {"type": source["type"], "uid": source["uid"]}


def test_the_two_dashboards_exist() -> None:
    """The wallet and scheduler dashboards are there (and nothing else is half-written)."""
    assert NAMES == ["scheduler.json", "wallet.json"]


@pytest.mark.parametrize("name", NAMES)
def test_dashboard_top_level(name: str) -> None:
    """A fixed uid, a title, tags, a time range, a 5 s refresh, a known schema version and no
    numeric id (provisioning assigns it; a fixed one collides across Grafana instances)."""
    board = dashboards()[name]
    assert re.fullmatch(r"[a-z0-9-]{1,40}", board["uid"]), board.get("uid")
    assert board["title"].strip()
    assert "tandem" in board["tags"]
    assert board["time"]["from"].startswith("now-")
    assert board["time"]["to"] == "now"
    assert board["refresh"] == "5s"
    assert board["schemaVersion"] in SCHEMA_VERSIONS
    assert board.get("id") is None
    assert board["panels"]


def test_dashboard_uids_and_titles_are_unique() -> None:
    """No two dashboards share a uid or a title (Grafana would load only one)."""
    boards = dashboards().values()
    assert len({b["uid"] for b in boards}) == len(boards)
    assert len({b["title"] for b in boards}) == len(boards)


@pytest.mark.parametrize("name", NAMES)
def test_panel_ids_are_unique(name: str) -> None:
    """Every panel has an integer id, unique in its dashboard (Grafana keys links and
    state by it)."""
    ids = [panel.get("id") for panel in iter_panels(dashboards()[name])]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(ids) == len(set(ids)), ids


def _cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
    pos = panel["gridPos"]
    return {
        (x, y)
        for x in range(pos["x"], pos["x"] + pos["w"])
        for y in range(pos["y"], pos["y"] + pos["h"])
    }


@pytest.mark.parametrize("name", NAMES)
def test_panels_fit_the_grid_without_overlap(name: str) -> None:
    """Every panel has a gridPos inside the 24 columns; no two panels share a cell."""
    panels = list(iter_panels(dashboards()[name]))
    for panel in panels:
        pos = panel.get("gridPos")
        assert pos is not None, panel["title"]
        assert all(isinstance(pos.get(k), int) for k in ("x", "y", "w", "h")), pos
        assert min(pos["x"], pos["y"]) >= 0, pos
        assert min(pos["w"], pos["h"]) >= 1, pos
        assert pos["x"] + pos["w"] <= GRID_COLUMNS, (panel["title"], pos)
    for a, b in itertools.combinations(panels, 2):
        assert not _cells(a) & _cells(b), f"{a['title']!r} overlaps {b['title']!r}"


@pytest.mark.parametrize("name", NAMES)
def test_panels_query_the_provisioned_datasource(name: str) -> None:
    """Every panel and every query names the provisioned Prometheus by its fixed uid (a
    name or a missing datasource breaks when the dashboard is imported elsewhere)."""
    expected = datasource_ref()
    for panel in iter_panels(dashboards()[name]):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        if panel["type"] in ("row", "text"):
            continue
        assert panel["title"].strip()
        assert panel.get("datasource") == expected, panel["title"]
        targets = panel.get("targets", [])
        assert targets, f"{panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target.get("datasource") == expected, (panel["title"], target["refId"])
            assert target.get("expr", "").strip(), (panel["title"], target["refId"])


def _check_as_rules(queries: list[tuple[str, str]], folder: Path) -> None:
    """promtool parses each expression as the expression of a recording rule."""
    groups = [
        {"name": where, "rules": [{"record": "dashboard:query", "expr": expr}]}
        for where, expr in queries
    ]
    rules = folder / "queries.rules.yml"
    rules.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    run_tool(require_tool("promtool"), "check", "rules", rules)


def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query parses with Prometheus' own parser (promtool check rules), once
    Grafana's variables ($__rate_interval, ...) have a value."""
    queries = [(q.where, grafana_to_promql(q.expr)) for q in dashboard_queries()]
    assert len(queries) >= 20, "fewer queries than the dashboards should hold"
    _check_as_rules(queries, tmp_path)


def test_the_promql_check_rejects_bad_queries(tmp_path: Path) -> None:
    """The check above can fail: an unbalanced parenthesis and an unknown function are
    refused."""
    for bad in ("sum(rate(tandem_http_requests_total[1m])", "rat(tandem_http_requests_total[1m])"):
        with pytest.raises(AssertionError, match="exited 1"):
            _check_as_rules([("bad", bad)], tmp_path)


def test_datasource_is_the_compose_prometheus() -> None:
    """One Prometheus data source, the default, at the compose service's address, with the
    scrape interval as its time interval (so $__rate_interval spans at least 4 scrapes)."""
    source = provisioned_datasource()
    assert source["type"] == "prometheus"
    assert source["uid"] == "tandem-prometheus"
    assert source["isDefault"] is True
    assert source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in load_yaml(COMPOSE)["services"]
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval


def test_dashboards_are_provisioned_from_the_mounted_folder() -> None:
    """The provider reads the folder the compose file mounts deploy/grafana/dashboards at,
    and the provisioning folder is mounted where Grafana looks for it."""
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    folder = PurePosixPath(provider["options"]["path"])
    assert mounted_source(grafana, folder) == DASHBOARDS_DIR
    provisioning = PurePosixPath("/etc/grafana/provisioning")
    assert mounted_source(grafana, provisioning) == GRAFANA_DIR / "provisioning"
    for name in NAMES:
        assert (mounted_source(grafana, folder / name) or Path()).is_file()


def test_home_dashboard_is_a_provisioned_one() -> None:
    """When the compose file sets Grafana's home dashboard, it is one of these files."""
    grafana = load_yaml(COMPOSE)["services"]["grafana"]
    environment = grafana.get("environment", {})
    if isinstance(environment, list):  # the `- KEY=value` form
        environment = dict(item.split("=", 1) for item in environment)
    home = environment.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home is None:
        pytest.skip("the compose file sets no home dashboard")
    path = mounted_source(grafana, PurePosixPath(home))
    assert path is not None, home
    assert path.parent == DASHBOARDS_DIR, home
    assert path.name in NAMES, home
