"""Task registries for the cluster tests (loaded by real server processes through
TANDEM_SCHEDULER_TASKS). Each run writes a probe row with its real start and end, taken
from the database clock by the task body itself, independent of the scheduler's history."""

from __future__ import annotations

import os
from datetime import timedelta

import asyncpg

from tandem.core.database import asyncpg_dsn
from tandem.scheduler.registry import Registry, TaskContext, TaskFunction

PROBE_TABLE = """
CREATE TABLE IF NOT EXISTS probe (
    task text NOT NULL, instance text NOT NULL, fence bigint NOT NULL,
    started timestamptz NOT NULL, finished timestamptz
)
"""


_pool: asyncpg.Pool | None = None


async def _probe_start(ctx: TaskContext) -> asyncpg.Pool:
    """One small pool per server process, opened on first use (a connection per run would
    cost more than the runs)."""
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(
            asyncpg_dsn(os.environ["TANDEM_DATABASE_URL"]), min_size=1, max_size=4
        )
    conn = _pool
    await conn.execute(
        "INSERT INTO probe (task, instance, fence, started) VALUES ($1, $2, $3, clock_timestamp())",
        ctx.name,
        ctx.instance_id,
        ctx.fence,
    )
    return conn


async def _probe_end(pool: asyncpg.Pool, ctx: TaskContext) -> None:
    await pool.execute(
        "UPDATE probe SET finished = clock_timestamp() WHERE task = $1 AND fence = $2",
        ctx.name,
        ctx.fence,
    )


def _probed(seconds: float) -> TaskFunction:
    async def body(ctx: TaskContext) -> None:
        conn = await _probe_start(ctx)
        try:
            await ctx.sleep(seconds)
        finally:
            await _probe_end(conn, ctx)

    return body


# 40 equal tasks, each due every 2 s and busy 1 s: ~20 runs a second over the cluster,
# enough samples for a distribution test in seconds.
equal = Registry()
for i in range(1, 41):
    equal.task(f"Equal{i:02d}", timedelta(seconds=2))(_probed(1.0))

# One task whose run outlasts its interval by far: for crash, zombie and shutdown tests.
long = Registry()
long.task("Long", timedelta(seconds=0.5))(_probed(60.0))

# One short task every second: for the downtime test.
quick = Registry()
quick.task("Quick", timedelta(seconds=1))(_probed(0.1))

# Runs three times longer than their interval: the next slot is always due while a run is
# still going, so any lapse in exclusivity would show as overlapping probe rows.
overrun = Registry()
for i in range(1, 6):
    overrun.task(f"Overrun{i}", timedelta(seconds=0.3))(_probed(1.0))
