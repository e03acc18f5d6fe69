"""Fixtures of the cluster cron's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tests.scheduler.registries import PROBE_TABLE
from tests.support import empty_database, query
from tests.support.claims import Sessions


@pytest.fixture
def cron_db(postgres_url: str) -> Iterator[str]:
    """A migrated database of the test's own, with the probe table."""
    from tandem.core.migrations import upgrade_to_head

    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        query(url, PROBE_TABLE)
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the module's database."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    yield conn
    await conn.close()


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    """Instances made by the test, each holding a database session until the test ends."""
    held = Sessions(asyncpg_dsn(database_url))
    yield held
    await held.close()
