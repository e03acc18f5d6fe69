"""Fixtures: a real PostgreSQL server for the session, fresh databases, real server processes."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.core.embedded import EmbeddedPostgres
from tandem.core.hotpool import HotPool
from tests.support import Server, fresh_database, start_server


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


@pytest.fixture(scope="module", params=["lean", "framework"])
def server(request: pytest.FixtureRequest, database_url: str, log_dir: Path) -> Iterator[Server]:
    """A real `tandem serve` process, once with the wallet's lean path and once through
    FastAPI's routes: every API test must hold for both."""
    srv = start_server(database_url, log_dir, fast_path=request.param == "lean")
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[HotPool]:
    """The hot-path pool the service uses, on the module's database."""
    dsn = asyncpg_dsn(database_url)
    p = await HotPool.open(lambda: asyncpg.connect(dsn), size=10, acquire_timeout=30)
    yield p
    await p.close()
