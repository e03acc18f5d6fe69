"""Fixtures (a real PostgreSQL server for the session, fresh databases, the app in process, real
server processes) and the tiers of the suite.

Tiers. A test that starts a process (a `tandem` instance, nginx, Prometheus, a browser, a
PostgreSQL of its own, a tool's run) is marked ``slow``; one that runs a container (podman) is
marked ``container`` as well. Nobody marks tests by hand: ``pytest_collection_modifyitems``
marks each test from what its code and its fixtures' code reach (tests/support/tiers.py says
how it reads them): a test whose fixtures start a server is slow by its fixtures, one that
calls ``start_server`` (or a helper of its own module that does) by its code.
``make test-fast`` runs ``-m "not slow and not container"`` with TANDEM_TEST_NO_PROCESSES=1,
under which starting any process inside a test (its fixtures included; the session's shared
PostgreSQL excepted) raises ProcessForbiddenError: a test the reading missed fails in the fast
tier instead of passing slowly, and the fix is to reach the process through a function the
reading can follow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tandem.core.database import Database
from tandem.core.embedded import EmbeddedPostgres
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tests.support import (
    API_KEY,
    AUTH,
    NO_PROCESSES_ENV,
    Server,
    allow_processes,
    app_settings,
    forbid_processes,
    fresh_database,
    in_process,
    install_process_guard,
    start_server,
)
from tests.support.processes import machine_lock
from tests.support.tiers import Reader, tier_markers

# Inherited by every process the suite starts: each registers the suite's key at start.
os.environ["TANDEM_API_KEY"] = API_KEY

__all__ = ["in_process"]  # kept importable from here for the modules that still do


# --- the tiers ---------------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    reader = Reader()
    for item in items:
        if isinstance(item, pytest.Function):
            for marker in sorted(tier_markers(item, reader)):
                item.add_marker(marker)
    items.sort(key=_file_weight(items))


# What a test of each tier costs, roughly, in seconds: a container test builds or starts
# images, a slow one starts processes and waits on their timers, a fast one is a statement or
# a request in process.
_TIER_SECONDS = {"container": 20.0, "slow": 5.0}
_FAST_SECONDS = 0.1


def _file_weight(items: list[pytest.Item]) -> Callable[[pytest.Item], float]:
    """Heaviest files first. The whole suite hands files to its xdist workers in collection
    order, one file at a time as a worker frees up (`--dist loadfile --no-loadscope-reorder`
    in the Makefile): started first, the long files of containers, faults and clusters end
    while the many short files fill the other worker's gaps, instead of one long file
    starting last while the other worker idles. (xdist's own order, by number of tests,
    puts the one-test fault files last.) A stable sort: a file's tests keep their order."""
    weights: dict[str, float] = {}
    for item in items:
        cost = max(
            (_TIER_SECONDS[m.name] for m in item.iter_markers() if m.name in _TIER_SECONDS),
            default=_FAST_SECONDS,
        )
        weights[item.path.as_posix()] = weights.get(item.path.as_posix(), 0.0) + cost
    return lambda item: -weights[item.path.as_posix()]


if os.environ.get(NO_PROCESSES_ENV) == "1":
    install_process_guard()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
        with forbid_processes(item.nodeid):
            return (yield)


# --- PostgreSQL --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres | None]:
    """The embedded throwaway server, unless TANDEM_TEST_DATABASE_URL names one (then None).
    One per session (with pytest-xdist, one per worker: each worker is a session)."""
    if os.environ.get("TANDEM_TEST_DATABASE_URL"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
    # Started one at a time across the xdist workers of a machine: as root, pgserver creates
    # its system user when it is missing, and two workers doing that at once fail (useradd).
    with machine_lock("tandem-embedded-start"), allow_processes():
        server = EmbeddedPostgres(folder, cleanup=None)
    try:
        yield server
    finally:
        with allow_processes():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(embedded_postgres: EmbeddedPostgres | None) -> str:
    """The server the suite uses: TANDEM_TEST_DATABASE_URL, or the embedded one."""
    if embedded_postgres is None:
        return os.environ["TANDEM_TEST_DATABASE_URL"]
    return embedded_postgres.url


@pytest.fixture(scope="module")
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database shared by one test module."""
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture
def own_database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database of the test's own."""
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


# --- Tandem ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(database_url: str, log_dir: Path) -> Iterator[Server]:
    """A real `tandem serve` process."""
    srv = start_server(database_url, log_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
async def transport(database_url: str) -> AsyncIterator[httpx.ASGITransport]:
    async with in_process(app_settings(database_url)) as started:
        yield started


@pytest.fixture(scope="module")
async def client(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    """The in-process app with the suite's key: the fast layer for API tests, against the
    real database."""
    async with httpx.AsyncClient(
        transport=transport, base_url="http://tandem.test", headers=AUTH
    ) as c:
        yield c


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """The service's Database object, opened on the module's database."""
    db = Database(Settings(database_url=database_url))
    await db.open()
    yield db
    await db.close()


@pytest.fixture
def pool(database: Database) -> ConnectionPool:
    """The requests' pool the service uses, on the module's database."""
    return database.pool
