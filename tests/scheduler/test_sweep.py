"""The sweep against a real PostgreSQL: a lost run is recorded as ending when it was lost
(its lease's end, or its owner's last sign of life), not when a sweep noticed."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg

from tandem.scheduler import repository
from tests.support.claims import Sessions, claim, new_task


async def claim_new_task(db: asyncpg.Connection, instance: str, lease: float) -> int:
    """A new task of a minute, due now and the only one enabled, claimed (and planned, as
    the runner does) by ``instance``; its id."""
    task_id, _ = await new_task(db)
    claimed = await claim(db, instance, lease=lease)
    assert claimed is not None
    assert claimed.task_id == task_id
    return task_id


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
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """An instance that stopped renewing (alive, its session held): its run is lost when
    its lease ran out, however long after that a sweep comes."""
    instance = await sessions.new_instance(db)
    task_id = await claim_new_task(db, instance, lease=0.2)
    lease_until = await db.fetchval("SELECT lease_until FROM tasks WHERE id = $1", task_id)
    await asyncio.sleep(0.6)  # the sweep comes well after the lease's end
    swept = await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["finished_at"] == lease_until
    assert swept - row["finished_at"] >= timedelta(seconds=0.3)
    assert row["retry_at"] >= swept


async def test_an_ended_session_ends_the_run_at_the_last_heartbeat(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """A killed instance: its session ended some time after its last heartbeat, the last
    moment it is known to have held the run; the run ends there, not at the sweep (nor at its
    lease, which was still far off)."""
    instance = await sessions.new_instance(db)
    task_id = await claim_new_task(db, instance, lease=3600)
    await asyncio.sleep(0.1)
    await heartbeat(db, instance, sessions.conns[instance])
    last_beat = await db.fetchval("SELECT heartbeat_at FROM instances WHERE id = $1", instance)
    await sessions.end(instance)
    await asyncio.sleep(0.5)
    swept = await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["started_at"] < last_beat
    assert row["finished_at"] == last_beat
    assert swept - row["finished_at"] >= timedelta(seconds=0.4)


async def test_a_run_left_by_a_stopped_cluster_ends_at_its_owner_stop(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """An instance that left the membership list (its stop) and exited with its run still
    recorded running, then a downtime: the next sweep records the run as ending at the stop,
    not with a duration of the whole downtime."""
    instance = await sessions.new_instance(db)
    task_id = await claim_new_task(db, instance, lease=3600)
    await asyncio.sleep(0.1)
    await repository.stop_instance(db, instance)
    stopped_at = await db.fetchval("SELECT heartbeat_at FROM instances WHERE id = $1", instance)
    await sessions.end(instance)
    await asyncio.sleep(1.0)  # the downtime
    swept = await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["started_at"] < stopped_at
    assert row["finished_at"] == stopped_at
    assert swept - row["finished_at"] >= timedelta(seconds=1.0)  # none of it in the run


async def test_a_lost_run_never_ends_before_its_start(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """The owner's last heartbeat came before its claim (it died between them): the run is
    recorded as ending at its start, never before it."""
    instance = await sessions.new_instance(db)
    await heartbeat(db, instance, sessions.conns[instance])
    await asyncio.sleep(0.1)
    task_id = await claim_new_task(db, instance, lease=3600)
    await sessions.end(instance)
    await asyncio.sleep(0.3)
    await sweep_once(db)
    row = await lost_row(db, task_id)
    assert row["finished_at"] == row["started_at"]
