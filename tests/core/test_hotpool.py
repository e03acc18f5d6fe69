"""The hot-path pool against a real PostgreSQL: hand-off order, deadlines, and recovery from
lost connections, cancellations and abandoned transactions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.core.hotpool import HotPool, PoolClosedError


@pytest.fixture
async def small_pool(database_url: str) -> AsyncIterator[HotPool]:
    dsn = asyncpg_dsn(database_url)
    p = await HotPool.open(lambda: asyncpg.connect(dsn), size=2, acquire_timeout=2)
    yield p
    await p.close()


async def wait_until_full(pool: HotPool) -> None:
    """Poll: replacements connect in the background and announce nothing."""
    async with asyncio.timeout(10):
        while pool.idle < pool.size:  # noqa: ASYNC110  (no event to wait on, by design)
            await asyncio.sleep(0.02)


async def test_waiters_are_served_in_arrival_order(database_url: str) -> None:
    """When the connection is busy, waiters get it first come, first served."""
    dsn = asyncpg_dsn(database_url)
    pool = await HotPool.open(lambda: asyncpg.connect(dsn), size=1, acquire_timeout=5)
    served: list[int] = []

    async def query(i: int) -> None:
        await pool.fetchval("SELECT $1::int", i)
        served.append(i)

    try:
        async with pool.acquire():
            tasks = []
            for i in range(6):
                tasks.append(asyncio.create_task(query(i)))
                await asyncio.sleep(0.01)  # arrive in order
            assert pool.waiting == 6
        await asyncio.gather(*tasks)
    finally:
        await pool.close()
    assert served == list(range(6))


async def test_acquire_deadline_raises_timeout(small_pool: HotPool) -> None:
    """A request that waits longer than the deadline gets TimeoutError (answered as 503)."""
    async with small_pool.acquire(), small_pool.acquire():
        with pytest.raises(TimeoutError):
            await small_pool.fetchval("SELECT 1")
    assert await small_pool.fetchval("SELECT 1") == 1


async def test_lost_connection_is_replaced(small_pool: HotPool, database_url: str) -> None:
    """A connection the server dropped fails its query once, then the pool is whole again."""
    pids = {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", list(pids)
        )
    finally:
        await admin.close()
    # Some drops are noticed while idle (skipped at acquire), others only by the next query.
    failures = 0
    for _ in range(4):
        try:
            await small_pool.fetchval("SELECT 1")
        except (
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
            asyncpg.PostgresError,
            OSError,
        ):
            failures += 1
    assert failures <= 2
    await wait_until_full(small_pool)
    new_pids = {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
    assert not new_pids & pids


async def test_cancelled_queries_leak_no_connection(small_pool: HotPool) -> None:
    """Cancelling requests mid-query and mid-wait leaves every connection usable."""
    tasks = [asyncio.create_task(small_pool.fetchval("SELECT pg_sleep(5)")) for _ in range(6)]
    await asyncio.sleep(0.2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_until_full(small_pool)
    results = await asyncio.gather(*(small_pool.fetchval("SELECT 7") for _ in range(10)))
    assert results == [7] * 10


async def test_abandoned_transaction_is_not_reused(small_pool: HotPool) -> None:
    """A connection handed back inside a transaction is discarded, never given out again."""
    async with small_pool.acquire() as conn:
        await conn.execute("BEGIN")
        abandoned = await conn.fetchval("SELECT pg_backend_pid()")
    await wait_until_full(small_pool)
    for _ in range(4):
        async with small_pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT pg_backend_pid()") != abandoned


async def test_server_error_keeps_connection(small_pool: HotPool) -> None:
    """A plain SQL error leaves the connection in the pool (no reconnect churn)."""
    pids = {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
    with pytest.raises(asyncpg.PostgresError):
        await small_pool.fetchval("SELECT 1/0")
    assert small_pool.idle == small_pool.size
    assert {await small_pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)} == pids


async def test_close_fails_waiters(small_pool: HotPool) -> None:
    """Closing the pool fails whoever still waits, instead of leaving them hanging."""
    async with small_pool.acquire(), small_pool.acquire():
        waiter = asyncio.create_task(small_pool.fetchval("SELECT 1"))
        await asyncio.sleep(0.05)
        await small_pool.close()
    with pytest.raises(PoolClosedError):
        await waiter
