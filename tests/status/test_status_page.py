"""The status page at ``/``: what one instance renders (escaping, no scheduler) with the app in
process; what a cluster shows (running tasks on their instances, lost runs) against real server
processes on one database, in compressed time, over HTTP and rendered by a headless Chromium
(live refresh, a screenshot)."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from markupsafe import escape

from tandem.status.page import format_due, format_duration
from tests.support import (
    LEASE,
    REPO,
    Server,
    app_settings,
    fetch,
    http_get,
    in_process_client,
    query,
    signed_in,
    start_servers,
    until,
    wait_for,
)
from tests.support.registries import (
    HOSTILE_ERROR,
    HOSTILE_NAME,
    scheduler_env,
    scheduler_settings,
)

ALWAYS_RUNNING = "ReindexSearch"
# Showcase tasks whose runs last long enough to be killed mid-run (seconds >= 1.5).
LONG_RUNS = ["SendDigests", "SyncInventory", "RebuildReports", "PurgeAuditLog", "ExportLedger"]
SCREENSHOT = REPO / "docs" / "status-page.png"


# --- reading the page -------------------------------------------------------------------


@dataclass
class Row:
    classes: set[str]
    cells: list[str] = field(default_factory=list)
    titles: list[str | None] = field(default_factory=list)
    links: list[str] = field(default_factory=list)


class Page(HTMLParser):
    """The rows of each section's table (cell text unescaped, as a browser shows it), the
    attributes of every element with an id, and the count of script elements."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: dict[str, list[Row]] = {}
        self.ids: dict[str, dict[str, str | None]] = {}
        self.scripts = 0
        self._section: str | None = None
        self._row: Row | None = None
        self._cell: list[str] | None = None
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids[str(a["id"])] = a
        if tag == "script":
            self.scripts += 1
        elif tag == "section":
            self._section = str(a["id"])
            self.sections[self._section] = []
        elif tag == "tr" and self._section is not None:
            self._row = Row(set((a.get("class") or "").split()))
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row.titles.append(a.get("title"))
        elif tag == "a" and self._row is not None:
            self._row.links.append(str(a["href"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.cells.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row.cells and self._section is not None and "empty" not in self._row.classes:
                self.sections[self._section].append(self._row)
            self._row = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def column(self, section: str, index: int) -> list[str]:
        return [row.cells[index] for row in self.sections[section]]

    def instance_ids(self) -> list[str]:
        # The first word: the serving instance's cell also says "this page".
        return [cell.split()[0] for cell in self.column("instances", 0)]


def get_page(server: Server, path: str = "/") -> tuple[httpx.Response, Page]:
    return read_page(http_get(f"{server.url}{path}", timeout=10))


def read_page(response: httpx.Response) -> tuple[httpx.Response, Page]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    return response, Page(response.text)


def running_task(server: Server, name: str) -> str:
    """Wait until GET /tasks shows ``name`` running; its instance id."""
    found: list[str] = []

    def running() -> bool:
        for task in http_get(f"{server.url}/tasks").json()["tasks"]:
            if task["name"] == name and task["is_running"]:
                found.append(task["running_instance"])
                return True
        return False

    wait_for(running, 15)
    return found[-1]


# --- servers ------------------------------------------------------------------------------


def start_instances(url: str, log_dir: Path, registry: str, n: int) -> list[Server]:
    return start_servers(url, log_dir, n, extra_env=scheduler_env(registry))


@pytest.fixture(scope="module")
def cluster(database_url: str, log_dir: Path) -> Iterator[list[Server]]:
    """Three instances running the showcase tasks on the module's database."""
    servers = start_instances(database_url, log_dir, "showcase", 3)
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


# --- over HTTP ------------------------------------------------------------------------------


def test_page_shows_running_task_on_its_instance(cluster: list[Server]) -> None:
    """GET / is complete HTML, without JavaScript: the task /tasks shows running is in the
    running table, with the instance that runs it; links to the API; a CSP that allows only
    the page's script. (A JS-off browser check cannot be done: Chromium's --dump-dom reads the
    DOM with JavaScript, and prints nothing when scripts are disabled.)"""
    server = cluster[0]
    instance = running_task(server, ALWAYS_RUNNING)
    response, page = get_page(server)
    assert set(page.sections) == {"running", "pending", "instances", "schedules", "history"}
    assert '<noscript><meta http-equiv="refresh"' in response.text
    rows = {row.cells[0]: row for row in page.sections["running"]}
    assert rows[ALWAYS_RUNNING].cells[1] == instance
    assert rows[ALWAYS_RUNNING].links == [f"tasks/{ALWAYS_RUNNING}/history"]
    assert instance in page.instance_ids()
    assert page.ids["live"]["data-refreshed"] == "0"
    assert page.scripts == 1
    for link in ('href="docs"', 'href="tasks"', 'href="instances"'):
        assert link in response.text
    csp = response.headers["content-security-policy"]
    assert "script-src 'sha256-" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["cache-control"] == "no-store"


def test_fragment_is_the_live_part(cluster: list[Server]) -> None:
    """GET /status/fragment has the same sections without the page around them (no script)."""
    server = cluster[1]
    instance = running_task(server, ALWAYS_RUNNING)
    response, page = get_page(server, "/status/fragment")
    assert "<html" not in response.text
    assert page.scripts == 0
    assert set(page.sections) == {"running", "pending", "instances", "schedules", "history"}
    rows = {row.cells[0]: row.cells[1] for row in page.sections["running"]}
    assert rows[ALWAYS_RUNNING] == instance


def test_page_agrees_with_itself(cluster: list[Server]) -> None:
    """One snapshot per render: each live instance's running count equals its rows in the
    running table, every running row's instance is listed, no task is running and pending."""
    server = cluster[2]
    running_task(server, ALWAYS_RUNNING)
    for _ in range(20):
        _, page = get_page(server)
        running = page.column("running", 1)
        counts = dict(zip(page.instance_ids(), page.column("instances", 3), strict=True))
        assert set(running) <= set(counts)
        assert all(int(count) == running.count(i) for i, count in counts.items())
        assert not set(page.column("running", 0)) & set(page.column("pending", 0))


def test_page_marks_the_instance_that_served_it(cluster: list[Server]) -> None:
    """Each instance marks its own row (the X-Instance-Id of the response)."""
    for server in cluster:
        response, page = get_page(server)
        (mine,) = [row for row in page.sections["instances"] if "this page" in row.cells[0]]
        assert mine.cells[0].startswith(response.headers["x-instance-id"])


def test_failed_and_lost_runs_are_marked(
    cluster: list[Server], database_url: str, log_dir: Path
) -> None:
    """A task that raised shows as a failed row with its error; a SIGKILLed instance's run,
    once swept, as a lost row with its instance; both carry their status class."""
    (victim,) = start_instances(database_url, log_dir, "showcase", 1)
    try:
        victim_id = http_get(f"{victim.url}/health/live").headers["x-instance-id"]
        # Kill it within a second of a claim of a run that lasts longer: the run is in progress.
        wait_for(
            lambda: query(
                database_url,
                "SELECT 1 FROM tasks WHERE is_running AND running_instance = $1 "
                "AND name = ANY($2) AND started_at > clock_timestamp() - interval '1 s'",
                victim_id,
                LONG_RUNS,
            ),
            30,
            step=0.05,
        )
    finally:
        victim.stop(signal.SIGKILL)

    def marked() -> bool:
        _, page = get_page(cluster[0])
        rows = page.sections["history"]
        lost = [r for r in rows if "status-lost" in r.classes and r.cells[1] == victim_id]
        failed = [r for r in rows if "status-failed" in r.classes]
        return bool(lost and failed)

    wait_for(marked, 2 * LEASE + 10)
    _, page = get_page(cluster[0])
    for row in page.sections["history"]:
        if "status-failed" in row.classes:
            assert row.cells[0] == "ImportPartnerFeed"
            assert row.cells[2] == "failed"
            assert row.cells[5] == "ConnectionError: partner feed answered 503 Service Unavailable"
        if "status-lost" in row.classes:
            assert row.cells[1] == victim_id
            assert victim_id in row.cells[5]
    # Gone from the live instances once its heartbeat is older than the lease.
    wait_for(lambda: victim_id not in get_page(cluster[0])[1].instance_ids(), LEASE + 5)


async def test_page_escapes_task_names_and_errors(own_database_url: str) -> None:
    """Markup in a task name and in an exception's message reaches the page as text: escaped
    in the HTML (element text, attributes, the link), never as elements."""
    url = own_database_url
    settings = app_settings(url, **scheduler_settings("hostile"))
    async with in_process_client(settings) as client:

        async def failed_once() -> bool:
            return bool(await fetch(url, "SELECT 1 FROM task_history WHERE status = 'failed'"))

        await until(failed_once, 15)
        for path in ("/", "/status/fragment"):
            response, page = read_page(await client.get(path))
            text = response.text
            assert HOSTILE_ERROR not in text
            assert HOSTILE_NAME not in text
            assert escape(HOSTILE_ERROR) in text
            assert escape(HOSTILE_NAME) in text
            assert "<img" not in text
            assert page.scripts == (1 if path == "/" else 0)
            failed = [r for r in page.sections["history"] if "status-failed" in r.classes]
            assert failed
            error = f"ConnectionError: {HOSTILE_ERROR}"
            for row in failed:
                # Parsed back, the cell and its title are exactly the original text.
                assert (row.cells[0], row.cells[5], row.titles[5]) == (
                    HOSTILE_NAME,
                    error,
                    error,
                )
                assert row.links == [f"tasks/{quote(HOSTILE_NAME, safe='')}/history"]
        # The link leads to the task's history.
        history = await client.get(f"/tasks/{quote(HOSTILE_NAME, safe='')}/history")
        assert history.json()["name"] == HOSTILE_NAME


async def test_page_lists_schedules_with_source_version_and_note(own_database_url: str) -> None:
    """The schedules section: code and API schedules with their task, source, version and
    state, and the note (a paused one's: its pause note), markup shown as text."""
    settings = app_settings(own_database_url, **scheduler_settings("catalog"))
    async with in_process_client(settings) as client:
        made = await client.post(
            "/schedules",
            json={
                "name": "nightly-7",
                "task": "probe.label",
                "params": {"label": "x"},
                "every": 3600,
                "note": "<b>the</b> report",
            },
        )
        assert made.status_code == 201, made.text
        changed = await client.patch(
            "/schedules/nightly-7", json={"params": {"label": "y"}}, headers={"If-Match": "1"}
        )
        assert changed.status_code == 200, changed.text
        paused = await client.post("/schedules/probe.coded/pause", json={"note": "on hold"})
        assert paused.status_code == 200, paused.text
        response, page = read_page(await client.get("/"))
    rows = {row.cells[0]: row.cells[1:] for row in page.sections["schedules"]}
    assert rows["nightly-7"] == ["probe.label", "api", "2", "active", "<b>the</b> report"]
    assert rows["probe.coded"] == ["probe.coded", "code", "1", "paused", "on hold"]
    assert "<b>the</b>" not in response.text


async def test_page_on_an_instance_without_scheduler(own_database_url: str) -> None:
    """An instance with the scheduler off, on a database no scheduler ever used, still serves
    the page: every section, each saying it is empty."""
    async with in_process_client(app_settings(own_database_url)) as client:
        response, page = read_page(await client.get("/"))
    assert all(
        page.sections[s] == [] for s in ("running", "pending", "instances", "history", "schedules")
    )
    assert "No task is running." in response.text
    assert response.headers["x-instance-id"] in response.text  # "served by"


def test_durations_read_as_people_write_them() -> None:
    """Durations and due times: a decimal under 10 s, whole units above, two units at most."""
    assert [format_duration(s) for s in (0.04, 9.94, 12.7, 60, 185, 3600, 7322, 90061)] == [
        "0.0 s",
        "9.9 s",
        "12 s",
        "1 min",
        "3 min 5 s",
        "1 h",
        "2 h 2 min",
        "1 d 1 h",
    ]
    assert [format_due(s) for s in (12.3, 0.0, -0.5, -75)] == [
        "in 12 s",
        "due now",
        "due now",
        "overdue 1 min 15 s",
    ]


# --- in a browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> str:
    """Chromium's path. Missing: skipped, unless CI is set (CI installs it): failed.
    Module-scoped and requested first, so a skip comes before any server starts."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    message = "no chromium on PATH (Debian: apt-get install chromium)"
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{message}; CI installs it, so this is a broken CI image")
    pytest.skip(f"{message}; the browser tests are skipped (with CI set they fail)")


def run_chromium(browser: str, url: str, *args: str, budget_ms: int) -> str:
    """Headless Chromium on ``url`` for ``budget_ms`` of virtual time (timers fast-forward,
    network waits are real); its stdout."""
    with tempfile.TemporaryDirectory(prefix="tandem-chromium-") as profile:
        result = subprocess.run(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}",
                *args,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_browser_refreshes_running_tasks_live(browser: str, cluster: list[Server]) -> None:
    """In Chromium the script swaps in fresh fragments (the CSP lets it run): after at least
    one swap the DOM's running table still shows the running task and its instance."""
    server = cluster[0]
    instance = running_task(server, ALWAYS_RUNNING)
    with signed_in(server.url) as url:
        dom = run_chromium(browser, f"{url}/", "--dump-dom", budget_ms=5000)
    page = Page(dom)
    assert int(page.ids["live"]["data-refreshed"] or 0) >= 1
    assert '<body class="stale"' not in dom  # no refresh failed
    rows = {row.cells[0]: row.cells[1] for row in page.sections["running"]}
    assert rows[ALWAYS_RUNNING] == instance


def test_browser_screenshot(browser: str, cluster: list[Server], tmp_path: Path) -> None:
    """A 1280x900 screenshot of the live page, a real PNG. Written to docs/status-page.png
    when TANDEM_UPDATE_SCREENSHOT=1, otherwise to a temporary folder (the repo is untouched)."""
    server = cluster[0]
    running_task(server, ALWAYS_RUNNING)
    update = os.environ.get("TANDEM_UPDATE_SCREENSHOT") == "1"
    target = SCREENSHOT if update else tmp_path / "status-page.png"
    target.unlink(missing_ok=True)
    if update:
        # For the docs, a moment with several runs in progress.
        wait_for(
            lambda: (
                sum(t["is_running"] for t in http_get(f"{server.url}/tasks").json()["tasks"]) >= 3
            ),
            30,
        )
    with signed_in(server.url) as url:
        run_chromium(
            browser,
            f"{url}/",
            "--hide-scrollbars",
            "--window-size=1280,900",
            f"--screenshot={target}",
            # The first render: what the page showed a moment after the wait above.
            budget_ms=500,
        )
    data = target.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    assert (width, height) == (1280, 900)
    assert len(data) > 20_000  # a rendered page, not a blank one
