"""The runner in process against the real database: its database session, its self-fencing
timer, and the arithmetic its settings must satisfy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
from pydantic import ValidationError

from tandem.core.database import Database, asyncpg_dsn
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tandem.scheduler import repository
from tandem.scheduler.registry import Registry, TaskContext
from tandem.scheduler.runner import Runner
from tandem.scheduler.runs import RELEASED_UNSTARTED, LocalRuns
from tests.support import eventually
from tests.support.claims import DEFINITIONS, Sessions, claim, new_task

TIMINGS = {
    "scheduler_poll_interval": 0.1,
    "scheduler_heartbeat_interval": 0.5,
    "scheduler_lease": 3.0,
    "scheduler_self_fence_after": 2.0,
    "scheduler_steal_after": 0.5,
}


@pytest.fixture
async def runner(database_url: str) -> AsyncIterator[Runner]:
    """A runner of one never-ending task, claimed soon after start."""
    registry = Registry()
    name = f"Forever-{uuid.uuid4().hex[:8]}"

    @registry.task(name, timedelta(seconds=1))
    async def forever(ctx: TaskContext) -> None:
        await asyncio.sleep(3600)

    settings = Settings(database_url=database_url, **TIMINGS)
    database = Database(settings)
    runner = Runner(settings, registry, database, uuid.uuid4().hex[:12])
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()
        await database.close()


async def history(url: str, instance: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(
            "SELECT status, error FROM task_history WHERE instance_id = $1 ORDER BY fence",
            instance,
        )
    finally:
        await conn.close()


async def test_a_lost_session_stops_every_run_at_once(database_url: str, runner: Runner) -> None:
    """The server ends the instance's heartbeat session (as a restart or an administrator
    does): its lock is gone, so others may sweep its runs now. The run stops at once, long
    before its lease, and is released (recorded cancelled, not lost); a new session follows
    and the task is claimed again."""
    await eventually(lambda: runner.running, 10)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        ended = await conn.fetchval(
            "SELECT pg_terminate_backend(s.pid) FROM instances i "
            "JOIN instance_sessions s ON s.session_key = i.session_key WHERE i.id = $1",
            runner.instance_id,
        )
        assert ended
        await eventually(lambda: not runner.running, 5)
        await eventually(lambda: runner.running, 10)
    finally:
        await conn.close()
    rows = await history(database_url, runner.instance_id)
    # Stopped because the session ended (not by its timer), and released by the runner.
    assert (rows[0]["status"], rows[0]["error"]) == ("cancelled", "cancelled: session_lost")
    assert rows[-1]["status"] == "running"


async def test_a_claim_coming_back_after_the_drain_began_is_released_unstarted(
    database_url: str,
) -> None:
    """The drain begins while a claim is on its way (held up by the cluster-wide claim lock,
    which the test holds): the claim is not cancelled but comes back, is never started (its
    body does not run) and is released at once with its fence, recorded cancelled, and its
    slot is due again at once as the next attempt, which another instance then runs."""
    registry = Registry()
    name = f"Due-{uuid.uuid4().hex[:8]}"
    bodies: list[tuple[str, int]] = []

    @registry.task(name, timedelta(hours=1))
    async def body(ctx: TaskContext) -> None:
        bodies.append((ctx.instance_id, ctx.attempt))
        await ctx.sleep(3600)

    # The claim waits for the lock far longer than the test holds it.
    settings = Settings(database_url=database_url, **TIMINGS, scheduler_claim_lock_timeout=30)
    database, database_b = Database(settings), Database(settings)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    blocker = await asyncpg.connect(asyncpg_dsn(database_url))
    stopping = first = second = None
    try:
        first = Runner(settings, registry, database, f"a-{uuid.uuid4().hex[:10]}")
        async with blocker.transaction():
            await blocker.execute("SELECT pg_advisory_xact_lock($1)", repository.CLAIM_LOCK_ID)
            await first.start()
            waiting = (
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND "
                "database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            async with asyncio.timeout(10):
                # (A lock wait announces nothing to wait on: polled.)
                while not await conn.fetchval(waiting):  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            stopping = asyncio.create_task(first.stop())
            await eventually(lambda: first.draining, 1)
            assert not stopping.done()
        # The lock is released: the claim goes through after the drain began.
        await asyncio.wait_for(stopping, 15)
        rows = await conn.fetch(
            "SELECT h.instance_id, h.attempt, h.status, h.error, h.scheduled_for "
            "FROM task_history h JOIN tasks t ON t.id = h.task_id WHERE t.name = $1",
            name,
        )
        assert [(r["instance_id"], r["attempt"], r["status"], r["error"]) for r in rows] == [
            (first.instance_id, 1, "cancelled", RELEASED_UNSTARTED)
        ]
        task = await conn.fetchrow(
            "SELECT is_running, retry_attempt, retry_slot, retry_at <= clock_timestamp() AS due "
            "FROM tasks WHERE name = $1",
            name,
        )
        assert (task["is_running"], task["retry_attempt"], task["due"]) == (False, 2, True)
        assert task["retry_slot"] == rows[0]["scheduled_for"]
        assert bodies == []

        second = Runner(settings, registry, database_b, f"b-{uuid.uuid4().hex[:10]}")
        await second.start()
        await eventually(lambda: bodies, 10)
        assert bodies == [(second.instance_id, 2)]
    finally:
        if stopping is None and first is not None:
            await first.stop()
        if second is not None:
            await second.stop()
        await database_b.close()
        await database.close()
        await blocker.close()
        await conn.close()


def test_settings_refuse_timings_that_break_self_fencing() -> None:
    """A margin of zero, or heartbeats too sparse to renew before the deadline, fail at start;
    the defaults and the tests' compressed timings pass."""
    Settings()
    Settings(**TIMINGS)
    with pytest.raises(ValidationError, match="shorter than scheduler_lease"):
        Settings(scheduler_lease=7.0)
    with pytest.raises(ValidationError, match="must not exceed scheduler_self_fence_after"):
        Settings(scheduler_heartbeat_interval=3.5)
    with pytest.raises(ValidationError, match="must not exceed scheduler_self_fence_after"):
        Settings(**{**TIMINGS, "scheduler_renewal_validity": 1.5})


async def test_a_run_stopped_before_its_task_began_is_still_completed(
    database_url: str, db: asyncpg.Connection, sessions: Sessions, pool: ConnectionPool
) -> None:
    """A run stopped in the same tick it was started (its task not begun: a task cancelled
    then never runs its coroutine) still ends in the database: cancelled, not left running."""
    task_id, name = await new_task(db)
    instance = await sessions.new_instance(db)
    claimed = await claim(db, instance)
    assert claimed is not None
    runs = LocalRuns(Settings(database_url=database_url, **TIMINGS), instance, pool)
    sent = asyncio.get_running_loop().time()
    run = runs.start(claimed, sent, DEFINITIONS[name], claimed.scheduled_for, None)
    assert run is not None
    assert run.task is not None
    runs.stop(run, "drained")
    await asyncio.wait_for(run.task, 10)
    row = await db.fetchrow(
        "SELECT status, error FROM task_history WHERE task_id = $1 AND fence = $2",
        task_id,
        claimed.fence,
    )
    assert row is not None
    assert (row["status"], row["error"]) == ("cancelled", "cancelled: drained")
    assert not await db.fetchval("SELECT is_running FROM tasks WHERE id = $1", task_id)
