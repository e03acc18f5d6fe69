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
from tandem.core.settings import Settings
from tandem.scheduler.registry import Registry, TaskContext
from tandem.scheduler.runner import Runner
from tests.support import eventually

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
