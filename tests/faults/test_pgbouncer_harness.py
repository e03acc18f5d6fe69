"""What a transaction-mode PgBouncer (Debian 12's 1.18, as .ci/run installs it) does to asyncpg,
shown against the suite's PostgreSQL: the reasons behind TANDEM_DB_STATEMENT_CACHE=false and
behind moving session parameters out of the startup packet (docs/pooling.md).

- asyncpg's default statement cache names its prepared statements and reuses them in later
  transactions; PgBouncer may hand such a transaction to another server connection, where the
  name does not exist.
- statement_cache_size=0 makes asyncpg use the unnamed statement, parsed again in the same
  message batch as every execution, so nothing outlives one round trip.
- PgBouncer forwards only a few startup parameters (application_name, client_encoding,
  DateStyle, TimeZone, ...) and refuses the rest; a per-database default reaches every server
  connection instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.faults.pgbouncer import PgBouncer, pgbouncer
from tests.support import empty_database

CLIENTS = 10
ITERATIONS = 100
# Fewer server connections than clients, so consecutive transactions of one client meet
# different server connections (as they do in production, where replicas share the pool).
SERVER_POOL = 3
QUERY = "SELECT $1::bigint + 1"


@pytest.fixture(scope="module")
def bouncer(database_url: str) -> Iterator[PgBouncer]:
    with pgbouncer(database_url, default_pool_size=SERVER_POOL) as running:
        yield running


async def _load(dsn: str, *, statement_cache_size: int = 100) -> tuple[int, list[BaseException]]:
    """CLIENTS connections, each running QUERY ITERATIONS times at once: (successes, errors).
    100 is asyncpg's default cache size."""
    connections = [
        await asyncpg.connect(dsn, statement_cache_size=statement_cache_size)
        for _ in range(CLIENTS)
    ]
    errors: list[BaseException] = []
    successes = 0

    async def worker(conn: asyncpg.Connection) -> None:
        nonlocal successes
        for i in range(ITERATIONS):
            try:
                assert await conn.fetchval(QUERY, i) == i + 1
                successes += 1
            except asyncpg.PostgresError as error:
                errors.append(error)

    try:
        await asyncio.gather(*(worker(conn) for conn in connections))
    finally:
        await asyncio.gather(*(conn.close() for conn in connections))
    return successes, errors


async def test_default_statement_cache_breaks_behind_transaction_pooling(
    bouncer: PgBouncer,
) -> None:
    """With asyncpg's defaults, statements prepared on one server connection are executed on
    another: `prepared statement "__asyncpg_stmt_…__" does not exist`."""
    successes, errors = await _load(bouncer.url)
    assert errors, "no failure: was PgBouncer in transaction mode?"
    assert all(isinstance(e, asyncpg.InvalidSQLStatementNameError) for e in errors), {
        repr(e) for e in errors
    }
    assert 'prepared statement "__asyncpg_stmt_' in str(errors[0])
    assert "does not exist" in str(errors[0])
    assert successes + len(errors) == CLIENTS * ITERATIONS


async def test_statement_cache_off_survives_the_same_load(bouncer: PgBouncer) -> None:
    """statement_cache_size=0: the same load through the same PgBouncer, no error at all."""
    successes, errors = await _load(bouncer.url, statement_cache_size=0)
    assert errors == []
    assert successes == CLIENTS * ITERATIONS


async def test_sqlalchemy_engine_with_cache_off_survives(bouncer: PgBouncer) -> None:
    """The API's SQLAlchemy engine prepares every statement through asyncpg's prepare(); with
    asyncpg's cache off that too is the unnamed statement, re-parsed at each execution, so
    sessions (one transaction each) run cleanly through the pooler."""
    engine = create_async_engine(
        make_url(bouncer.url).set(drivername="postgresql+asyncpg"),
        pool_size=CLIENTS,
        max_overflow=0,
        connect_args={"statement_cache_size": 0},
    )

    async def session(i: int) -> int:
        async with engine.begin() as conn:
            value: int = (await conn.execute(text("SELECT :n + 1"), {"n": i})).scalar_one()
            return value

    try:
        results = await asyncio.gather(*(session(i) for i in range(CLIENTS * 20)))
    finally:
        await engine.dispose()
    assert results == [i + 1 for i in range(CLIENTS * 20)]


async def test_session_parameters_in_the_startup_packet_are_refused(bouncer: PgBouncer) -> None:
    """statement_timeout as a startup parameter ends the connection before it starts."""
    with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter"):
        await asyncpg.connect(
            bouncer.url, statement_cache_size=0, server_settings={"statement_timeout": "1000"}
        )
    assert "unsupported startup parameter" in bouncer.log()


async def test_application_name_is_forwarded(bouncer: PgBouncer) -> None:
    """application_name is one of the parameters PgBouncer tracks: accepted at startup and set
    on whichever server connection runs the client's transaction."""
    conn = await asyncpg.connect(
        bouncer.url, statement_cache_size=0, server_settings={"application_name": "tandem-x"}
    )
    try:
        for _ in range(5):
            assert await conn.fetchval("SELECT current_setting('application_name')") == "tandem-x"
    finally:
        await conn.close()


@pytest.fixture
def database_with_defaults(postgres_url: str) -> Iterator[str]:
    """An empty database whose default statement_timeout is 200 ms."""

    async def set_default(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            name = await conn.fetchval("SELECT current_database()")
            await conn.execute(f'ALTER DATABASE "{name}" SET statement_timeout = 200')
        finally:
            await conn.close()

    with empty_database(postgres_url) as url:
        asyncio.run(set_default(url))
        yield url


async def test_per_database_defaults_reach_pooled_connections(
    database_with_defaults: str,
) -> None:
    """What replaces the startup parameters: `ALTER DATABASE … SET`, which every new server
    connection PgBouncer opens to that database picks up."""
    with pgbouncer(database_with_defaults, default_pool_size=2) as running:
        conn = await asyncpg.connect(running.url, statement_cache_size=0)
        try:
            assert await conn.fetchval("SHOW statement_timeout") == "200ms"
            with pytest.raises(asyncpg.QueryCanceledError):
                await conn.execute("SELECT pg_sleep(5)")
        finally:
            await conn.close()
