"""The sweep against a real PostgreSQL: a lost run is recorded as ending when it was lost
(its lease's end, or its owner's last sign of life), not when a sweep noticed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.scheduler import repository
from tandem.scheduler.claims import plan_claim
from tandem.scheduler.runner import task_row
from tests.scheduler.registries import definition


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    yield conn
    await conn.close()


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[dict[str, asyncpg.Connection]]:
    """Instance id -> the connection holding its session lock (closing it ends the session,
    as the death of its process does)."""
    held: dict[str, asyncpg.Connection] = {}
    yield held
    for conn in held.values():
        await conn.close()


async def new_instance(
    db: asyncpg.Connection, sessions: dict[str, asyncpg.Connection], dsn: str
) -> str:
    instance = uuid.uuid4().hex[:12]
    await repository.register_instance(db, instance, "test", 1)
    conn = await asyncpg.connect(dsn)
    sessions[instance] = conn
    assert await repository.open_session(conn, instance, 30) is not None
    return instance


async def claim_new_task(db: asyncpg.Connection, instance: str, lease: float) -> int:
    """A new task of a minute, due now and the only one enabled, claimed (and planned, as
    the runner does) by ``instance``; its id."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    task = definition(name, timedelta(seconds=60))
    now = await repository.database_now(db)
    await repository.upsert_task(db, task_row(task, now))
    task_id = await db.fetchval("SELECT id FROM tasks WHERE name = $1", name)
    await db.execute("UPDATE tasks SET enabled = (id = $1)", task_id)
    key = await db.fetchval("SELECT session_key FROM instances WHERE id = $1", instance)
    claimed = await repository.claim_due_task(
        db,
        repository.ClaimParams(
            instance,
            key,
            lease=lease,
            live_window=30,
            steal_after=0,
            fresh_window=30,
            lock_timeout=1.0,
        ),
    )
    assert claimed is not None
    assert claimed.task_id == task_id
    planned = plan_claim(claimed, task)
    assert planned is not None
    assert planned.run_slot is not None
    await repository.plan_run(db, task_id, claimed.fence, planned.next_slot, planned.run_slot)
    return int(task_id)


async def heartbeat(db: asyncpg.Connection, instance: str, conn: asyncpg.Connection) -> None:
    """One heartbeat of ``instance`` on its session's connection, renewing nothing."""
    key = await db.fetchval("SELECT session_key FROM instances WHERE id = $1", instance)
    now = await repository.database_now(conn)
    beat = await repository.heartbeat(conn, instance, key, 30, [], now, 10, 30)
    assert beat.outcome == "renewed"


async def sweep_once(db: asyncpg.Connection) -> datetime:
    """Sweep; returns the database time just before it."""
    before = await repository.database_now(db)
    assert await repository.sweep_expired(db) >= 1
    return before


async def lost_row(db: asyncpg.Connection, task_id: int) -> asyncpg.Record:
    row = await db.fetchrow(
        "SELECT h.status, h.started_at, h.finished_at, t.last_finished_at, t.retry_at "
        "FROM task_history h JOIN tasks t ON t.id = h.task_id WHERE h.task_id = $1",
        task_id,
    )
    assert row is not None
    assert row["status"] == "lost"
    # The task's row says the same, and the slot is retried now, not at the loss.
    assert row["last_finished_at"] == row["finished_at"]
    return row


async def test_an_expired_lease_ends_the_run_at_its_end(
    db: asyncpg.Connection, sessions: dict[str, asyncpg.Connection], database_url: str
) -> None:
    """An instance that stopped renewing (alive, its session held): its run is lost when
    its lease ran out, however long after that a sweep comes."""
    instance = await new_instance(db, sessions, asyncpg_dsn(database_url))
    task_id = await claim_new_task(db, instance, lease=0.2)
    lease_until = await db.fetchval("SELECT lease_until FROM tasks WHERE id = $1", task_id)
    await asyncio.sleep(0.6)  # the sweep comes well after the lease's end
    swept = await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["finished_at"] == lease_until
    assert swept - row["finished_at"] >= timedelta(seconds=0.3)
    assert row["retry_at"] >= swept


async def test_an_ended_session_ends_the_run_at_the_last_heartbeat(
    db: asyncpg.Connection, sessions: dict[str, asyncpg.Connection], database_url: str
) -> None:
    """A killed instance: its session ended some time after its last heartbeat, the last
    moment it is known to have held the run; the run ends there, not at the sweep (nor at its
    lease, which was still far off)."""
    instance = await new_instance(db, sessions, asyncpg_dsn(database_url))
    task_id = await claim_new_task(db, instance, lease=3600)
    await asyncio.sleep(0.1)
    await heartbeat(db, instance, sessions[instance])
    last_beat = await db.fetchval("SELECT heartbeat_at FROM instances WHERE id = $1", instance)
    await sessions.pop(instance).close()
    await asyncio.sleep(0.5)
    swept = await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["started_at"] < last_beat
    assert row["finished_at"] == last_beat
    assert swept - row["finished_at"] >= timedelta(seconds=0.4)


async def test_a_run_left_by_a_stopped_cluster_ends_at_its_owner_stop(
    db: asyncpg.Connection, sessions: dict[str, asyncpg.Connection], database_url: str
) -> None:
    """An instance that left the membership list (its stop) and exited with its run still
    recorded running, then a downtime: the next sweep records the run as ending at the stop,
    not with a duration of the whole downtime."""
    instance = await new_instance(db, sessions, asyncpg_dsn(database_url))
    task_id = await claim_new_task(db, instance, lease=3600)
    await asyncio.sleep(0.1)
    await repository.stop_instance(db, instance)
    stopped_at = await db.fetchval("SELECT heartbeat_at FROM instances WHERE id = $1", instance)
    await sessions.pop(instance).close()
    await asyncio.sleep(1.0)  # the downtime
    swept = await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["started_at"] < stopped_at
    assert row["finished_at"] == stopped_at
    assert swept - row["finished_at"] >= timedelta(seconds=1.0)  # none of it in the run


async def test_a_lost_run_never_ends_before_its_start(
    db: asyncpg.Connection, sessions: dict[str, asyncpg.Connection], database_url: str
) -> None:
    """The owner's last heartbeat came before its claim (it died between them): the run is
    recorded as ending at its start, never before it."""
    instance = await new_instance(db, sessions, asyncpg_dsn(database_url))
    await heartbeat(db, instance, sessions[instance])
    await asyncio.sleep(0.1)
    task_id = await claim_new_task(db, instance, lease=3600)
    await sessions.pop(instance).close()
    await asyncio.sleep(0.3)
    await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["finished_at"] == row["started_at"]
