"""Fixtures: a real PostgreSQL server for the session, fresh databases, real server processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tandem.core.database import Database
from tandem.core.embedded import EmbeddedPostgres
from tandem.core.hotpool import HotPool
from tandem.core.settings import Settings
from tandem.main import create_asgi_app
from tests.support import API_KEY, AUTH, Server, fresh_database, start_server

# Inherited by every process the suite starts: each registers the suite's key at start.
os.environ["TANDEM_API_KEY"] = API_KEY


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres | None]:
    """The embedded throwaway server, unless TANDEM_TEST_DATABASE_URL names one (then None)."""
    if os.environ.get("TANDEM_TEST_DATABASE_URL"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
    server = EmbeddedPostgres(folder, cleanup=None)
    try:
        yield server
    finally:
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


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def server(database_url: str, log_dir: Path) -> Iterator[Server]:
    """A real `tandem serve` process."""
    srv = start_server(database_url, log_dir)
    yield srv
    srv.stop()


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[httpx.ASGITransport]:
    """The app in this process, as uvicorn runs it (metrics, access, lean path, FastAPI) but
    without a socket or a subprocess, started and stopped by its lifespan."""
    async with LifespanManager(create_asgi_app(settings)) as manager:
        yield httpx.ASGITransport(app=manager.app)


@pytest.fixture(scope="module")
async def transport(database_url: str) -> AsyncIterator[httpx.ASGITransport]:
    # Keys made by a test are loaded within 0.1 s (tests/access/keys.make_key waits).
    settings = Settings(
        database_url=database_url,
        scheduler_enabled=False,
        maintenance_enabled=False,
        auth_cache_ttl=0.1,
    )
    async with in_process(settings) as started:
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
def pool(database: Database) -> HotPool:
    """The hot-path pool the service uses, on the module's database."""
    return database.hot
