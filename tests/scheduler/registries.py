"""Task registries for the cluster tests (loaded by real server processes through
TANDEM_SCHEDULER_TASKS). Each run writes a probe row with its real start and end, taken
from the database clock by the task body itself, independent of the scheduler's history."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from tandem.core.database import asyncpg_dsn
from tandem.scheduler.registry import Registry, TaskContext, TaskDefinition, TaskFunction

MIX_TASK = "mix.noop"

PROBE_TABLE = """
CREATE TABLE IF NOT EXISTS probe (
    task text NOT NULL, instance text NOT NULL, fence bigint NOT NULL,
    started timestamptz NOT NULL, finished timestamptz
)
"""


_pool: asyncpg.Pool | None = None


async def noop(ctx: TaskContext) -> None:
    """A body for definitions whose runs the test makes itself."""


def definition(name: str, every: timedelta | None = None, **options: Any) -> TaskDefinition:
    """One task's definition, validated as Registry.task validates it."""
    registry = Registry()
    registry.task(name, every, **options)(noop)
    found = registry.get(name)
    assert found is not None
    return found


async def _probe_pool() -> asyncpg.Pool:
    """One small pool per server process, opened on first use (a connection per run would
    cost more than the runs)."""
    global _pool
    if _pool is None:
        _pool = await asyncpg.create_pool(
            asyncpg_dsn(os.environ["TANDEM_DATABASE_URL"]), min_size=1, max_size=4
        )
    return _pool


async def _end_probe(pool: asyncpg.Pool, started: asyncio.Future[str], ctx: TaskContext) -> None:
    await asyncio.wait([started])
    if not started.cancelled() and started.exception() is None:
        await pool.execute(
            "UPDATE probe SET finished = clock_timestamp() WHERE task = $1 AND fence = $2",
            ctx.name,
            ctx.fence,
        )


def _probed(seconds: float) -> TaskFunction:
    async def body(ctx: TaskContext) -> None:
        pool = await _probe_pool()
        # The start row is written by a task of its own, shielded from the run's cancellation:
        # a drain that cancelled the run while the INSERT was in flight left a row committed
        # but never ended, which reads as a run lasting forever (an overlap that was none).
        started = asyncio.ensure_future(
            pool.execute(
                "INSERT INTO probe (task, instance, fence, started) "
                "VALUES ($1, $2, $3, clock_timestamp())",
                ctx.name,
                ctx.instance_id,
                ctx.fence,
            )
        )
        try:
            await asyncio.shield(started)
            await ctx.sleep(seconds)
        finally:
            ended = asyncio.ensure_future(_end_probe(pool, started, ctx))
            # The body ends once its end row is written, even when cancelled again meanwhile
            # (a drain, then its self-fencing timer): else the row would land after the
            # successor's start, an overlap of writes, not of runs.
            while not ended.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(ended)

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

# One short task that touches no table of its own: for tests that take the database away.
plain = Registry()


@plain.task("Tick", timedelta(seconds=0.5))
async def _tick(ctx: TaskContext) -> None:
    await ctx.sleep(0.2)


# One task whose run never ends by itself and makes an effect outside the database every
# 0.2 s: a line (wall clock, instance, fence) appended to a file of its process's own under
# TANDEM_TEST_EFFECTS. What no fence can take back, so what a partition test counts.
effects = Registry()


@effects.task("Effect", timedelta(seconds=0.5))
async def _effect(ctx: TaskContext) -> None:
    path = Path(os.environ["TANDEM_TEST_EFFECTS"]) / f"{os.getpid()}.log"
    with path.open("a", buffering=1) as out:
        while True:
            ctx.check()  # as a careful author does right before each outside effect
            out.write(f"{time.time():.6f} {ctx.instance_id} {ctx.fence}\n")
            await asyncio.sleep(0.2)


class MixParams(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    n: int


async def _mixed(ctx: TaskContext) -> None:
    await ctx.sleep(0.05)


# The task of the thousand API schedules some fault tests add to the mix
# (cluster.add_api_schedules): a short body, params, no code schedule.
for _registry in (long, overrun, effects):
    _registry.task(MIX_TASK, params=MixParams)(_mixed)


# One task per missed-slot policy, each due every second, and a cron task in a zone that does
# not come due during a test: for the downtime test and GET /tasks.
missed = Registry()
missed.task("Coalesce", timedelta(seconds=1), missed="coalesce")(_probed(0.05))
missed.task("Skip", timedelta(seconds=1), missed="skip", grace=timedelta(seconds=0.5))(
    _probed(0.05)
)
missed.task("CatchUp", timedelta(seconds=1), missed="catch_up", catch_up_limit=5)(_probed(0.05))
missed.task("Nightly", cron="30 2 * * *", tz="Europe/Berlin")(_probed(0.05))

# Tasks whose first run (due at start; the next slot is an hour away) needs retries: three
# that outlast their timeout every time, one that fails on its first two attempts.
RETRY_BACKOFF = timedelta(seconds=0.4)
TIMEOUT = timedelta(seconds=0.5)
retrying = Registry()
for i in range(1, 4):
    retrying.task(
        f"Stuck{i}",
        timedelta(hours=1),
        timeout=TIMEOUT,
        max_attempts=3,
        retry_backoff=RETRY_BACKOFF,
    )(_probed(30.0))


@retrying.task("Flaky", timedelta(hours=1), max_attempts=3, retry_backoff=RETRY_BACKOFF)
async def _flaky(ctx: TaskContext) -> None:
    if ctx.attempt < 3:
        raise RuntimeError(f"attempt {ctx.attempt} fails")


# A nightly job in a zone with daylight saving: for the DST tests (a database with a fake clock).
nightly = Registry()
nightly.task("Nightly", cron="30 2 * * *", tz="Europe/Berlin")(_probed(0.05))


# Said by a body first thing (at level info), so a server's log shows when each body began
# relative to the runner's own lines (its drain, say).
BODY_STARTED = "body started"


def _announced(seconds: float) -> TaskFunction:
    probed = _probed(seconds)

    async def body(ctx: TaskContext) -> None:
        ctx.log.info(BODY_STARTED)
        await probed(ctx)

    return body


# Thirty tasks due every second and busy half of it: at any moment runs are going on every
# instance and others are due, so a stop always finds both runs to drain and claims on
# their way. For the whole-cluster stop test.
stopping = Registry()
for i in range(1, 31):
    stopping.task(f"Busy{i:02d}", timedelta(seconds=1))(_announced(0.5))
