"""The hot-path pool against a real PostgreSQL: hand-off order, deadlines, and recovery from
lost connections, cancellations and abandoned transactions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.core.errors import DatabaseUnavailableError, OutcomeUnknownError
from tandem.core.pool import ConnectionPool, PoolClosedError
from tests.support import eventually


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[ConnectionPool]:
    dsn = asyncpg_dsn(database_url)
    p = await ConnectionPool.open(lambda: asyncpg.connect(dsn), size=2, acquire_timeout=2)
    yield p
    await p.close()


async def wait_until_full(pool: ConnectionPool) -> None:
    """Poll: replacements connect in the background and announce nothing."""
    await eventually(lambda: pool.idle >= pool.size, 10)


async def test_waiters_are_served_in_arrival_order(database_url: str) -> None:
    """When the connection is busy, waiters get it first come, first served."""
    dsn = asyncpg_dsn(database_url)
    pool = await ConnectionPool.open(lambda: asyncpg.connect(dsn), size=1, acquire_timeout=5)
    served: list[int] = []

    async def query(i: int) -> None:
        await pool.fetchval("SELECT $1::int", i)
        served.append(i)

    try:
        async with pool.acquire():
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(query(i)))
                await eventually(lambda i=i: pool.waiting == i + 1, 5)  # arrive in order
            assert pool.waiting == 6
        await asyncio.gather(*tasks)
    finally:
        await pool.close()
    assert served == list(range(6))


async def test_acquire_deadline_raises_unavailable(small_pool: ConnectionPool) -> None:
    """A request that waits longer than the deadline is told nothing was applied (503)."""
    async with small_pool.acquire(), small_pool.acquire():
        with pytest.raises(DatabaseUnavailableError):
            await small_pool.fetchval("SELECT 1")
    assert await small_pool.fetchval("SELECT 1") == 1


async def _terminate(database_url: str, pids: set[int]) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", list(pids)
        )
    finally:
        await admin.close()


async def backends_running(database_url: str, pattern: str, count: int) -> set[int]:
    """The pids of the ``count`` backends whose statement is like ``pattern``, once that many
    are running it (a statement sent is not yet a statement running: polled)."""
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with asyncio.timeout(10):
            while True:
                pids = await admin.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 "
                    "AND state = 'active' AND pid <> pg_backend_pid()",
                    pattern,
                )
                if len(pids) >= count:
                    return {r["pid"] for r in pids}
                await asyncio.sleep(0.02)
    finally:
        await admin.close()


async def test_lost_connections_never_fail_a_read(
    small_pool: ConnectionPool, database_url: str
) -> None:
    """Connections the server dropped are skipped or retried once: no read fails, and the
    pool is whole again on new connections."""
    pids = {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
    await _terminate(database_url, pids)
    for _ in range(4):
        assert await small_pool.fetchval("SELECT 1", retry_safe=True) == 1
    await wait_until_full(small_pool)
    new_pids = {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
    assert not new_pids & pids


async def test_write_cut_mid_statement_is_outcome_unknown(
    small_pool: ConnectionPool, database_url: str
) -> None:
    """A write whose connection dies after it was sent is reported as outcome unknown (not as
    'nothing changed', and not as a 500), and that connection is never lent again."""
    write = asyncio.create_task(small_pool.fetchval("SELECT pg_backend_pid(), pg_sleep(5)"))
    (busy,) = await backends_running(database_url, "%pg_backend_pid(), pg_sleep(5)%", 1)
    await _terminate(database_url, {busy})
    with pytest.raises(OutcomeUnknownError):
        await write
    await wait_until_full(small_pool)
    pids = await asyncio.gather(
        *(small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(20))
    )
    assert busy not in pids


async def test_fatal_error_leaves_no_connection_in_two_hands(
    small_pool: ConnectionPool, database_url: str
) -> None:
    """After statements die with a FATAL (the server terminating their sessions), a burst of
    concurrent statements on the pool never finds a connection already in use (asyncpg's
    'another operation is in progress'): each either succeeds or is classified."""
    for _ in range(5):
        sleepers = [
            asyncio.create_task(small_pool.fetchval("SELECT pg_sleep(2)")) for _ in range(2)
        ]
        running = await backends_running(database_url, "SELECT pg_sleep(2)", 2)
        await _terminate(database_url, running)
        results = await asyncio.gather(
            *sleepers,
            *(small_pool.fetchval("SELECT 1", retry_safe=True) for _ in range(20)),
            return_exceptions=True,
        )
        for result in results:
            assert not isinstance(result, asyncpg.InternalClientError), result
            assert result in (1, None) or isinstance(result, OutcomeUnknownError), result


async def test_pool_answers_unavailable_at_once_when_no_connection_can_be_made() -> None:
    """With the database unreachable, a caller is told 'unavailable' at once instead of
    waiting out the acquire deadline (60 s by default)."""

    async def refuse() -> asyncpg.Connection:
        raise ConnectionRefusedError("nobody listens")

    pool = await ConnectionPool.open(refuse, size=2, acquire_timeout=60)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(DatabaseUnavailableError):
                await pool.fetchval("SELECT 1")
    finally:
        await pool.close()


async def test_cancelled_queries_leak_no_connection(small_pool: ConnectionPool) -> None:
    """Cancelling requests mid-query and mid-wait leaves every connection usable."""
    tasks = [asyncio.create_task(small_pool.fetchval("SELECT pg_sleep(5)")) for _ in range(6)]
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_until_full(small_pool)
    results = await asyncio.gather(*(small_pool.fetchval("SELECT 7") for _ in range(10)))
    assert results == [7] * 10


async def test_abandoned_transaction_is_not_reused(small_pool: ConnectionPool) -> None:
    """A connection handed back inside a transaction is discarded, never given out again."""
    async with small_pool.acquire() as conn:
        await conn.execute("BEGIN")
        abandoned = await conn.fetchval("SELECT pg_backend_pid()")
    await wait_until_full(small_pool)
    for _ in range(4):
        async with small_pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT pg_backend_pid()") != abandoned


async def test_server_error_keeps_connection(small_pool: ConnectionPool) -> None:
    """A plain SQL error leaves the connection in the pool (no reconnect churn)."""
    pids = {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
    with pytest.raises(asyncpg.PostgresError):
        await small_pool.fetchval("SELECT 1/0")
    assert small_pool.idle == small_pool.size
    assert {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)} == pids


async def test_close_fails_waiters(small_pool: ConnectionPool) -> None:
    """Closing the pool fails whoever still waits, instead of leaving them hanging."""
    async with small_pool.acquire(), small_pool.acquire():
        waiter = asyncio.create_task(small_pool.fetchval("SELECT 1"))
        await eventually(lambda: small_pool.waiting == 1, 5)
        await small_pool.close()
    with pytest.raises(PoolClosedError):
        await waiter


async def test_misuse_is_a_bug_not_a_database_failure(small_pool: ConnectionPool) -> None:
    """A call asyncpg refuses for the caller's own mistake (wrong argument count) stays the
    driver's error, a 500, instead of being dressed up as a 503 (and is not retried)."""
    with pytest.raises(asyncpg.InterfaceError):
        await small_pool.fetchval("SELECT $1::int", 1, 2, retry_safe=True)
    with pytest.raises(asyncpg.InterfaceError):
        await small_pool.fetchval("SELECT $1::int", 1, 2)
    await wait_until_full(small_pool)
    assert await small_pool.fetchval("SELECT 1") == 1


async def test_partly_failed_open_still_queues_callers(database_url: str) -> None:
    """A pool whose first connection failed to open but the others opened is not 'down':
    callers beyond the live connections wait their turn instead of being refused."""
    dsn = asyncpg_dsn(database_url)
    attempts = 0

    async def first_fails() -> asyncpg.Connection:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionRefusedError("the first one is refused")
        if attempts > 2:
            await asyncio.sleep(3600)  # the replacement never arrives: two stay alive
        return await asyncpg.connect(dsn)

    pool = await ConnectionPool.open(first_fails, size=2, acquire_timeout=10)
    try:
        results = await asyncio.gather(
            *(pool.fetchval("SELECT 1 FROM pg_sleep(0.01)", retry_safe=True) for _ in range(20))
        )
    finally:
        await pool.close()
    assert results == [1] * 20


async def test_pool_keeps_its_size_through_an_outage(database_url: str) -> None:
    """Connections made by callers while the database comes back take the place of the ones
    being replaced: afterwards the pool holds its size, never more."""
    dsn = asyncpg_dsn(database_url)
    refusing = True

    async def flaky() -> asyncpg.Connection:
        if refusing:
            raise ConnectionRefusedError("down")
        await asyncio.sleep(0.05)
        return await asyncpg.connect(dsn)

    pool = await ConnectionPool.open(flaky, size=3, acquire_timeout=10)
    try:
        # Reconnecting has failed long enough for the pool to call the database down.
        await eventually(lambda: pool._down, 10)
        with pytest.raises(DatabaseUnavailableError):
            await pool.fetchval("SELECT 1", retry_safe=True)
        refusing = False
        for _ in range(5):
            await asyncio.gather(
                *(pool.fetchval("SELECT 1", retry_safe=True) for _ in range(10)),
                return_exceptions=True,
            )
            await asyncio.sleep(0.5)
        assert await pool.fetchval("SELECT 1", retry_safe=True) == 1
        # Every background reconnect has finished: none can add a connection after the count.
        await eventually(lambda: not pool._replacing, 10)
        assert pool.alive == pool.size
    finally:
        await pool.close()


async def test_connection_to_a_read_only_server_is_replaced(database_url: str) -> None:
    """A write refused because the session is read-only (a standby after a failover) is 'not
    applied', and that connection is not lent again: a new one may reach the new primary."""
    dsn = asyncpg_dsn(database_url)
    pool = await ConnectionPool.open(lambda: asyncpg.connect(dsn), size=1, acquire_timeout=5)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            read_only_pid = await conn.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(DatabaseUnavailableError):
            await pool.fetchval("CREATE TEMPORARY TABLE t (x int)")
        await wait_until_full(pool)
        assert await pool.fetchval("SELECT pg_backend_pid()") != read_only_pid
    finally:
        await pool.close()
