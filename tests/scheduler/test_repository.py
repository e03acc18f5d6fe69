"""The scheduler's statements against a real PostgreSQL: the claim race, the database's own
refusals, fencing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.scheduler import repository


async def claim_in_transaction(
    db: asyncpg.Connection, *args: Any, **kwargs: Any
) -> repository.ClaimedRun | None:
    """One claim in its own transaction, as the runner makes it."""
    async with db.transaction():
        return await repository.claim_due_task(db, *args, **kwargs)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    yield conn
    await conn.close()


async def new_task(db: asyncpg.Connection, interval: float = 60.0) -> tuple[int, str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    await repository.upsert_task(db, name, timedelta(seconds=interval), "tests.noop")
    task_id = await db.fetchval("SELECT id FROM tasks WHERE name = $1", name)
    # Only this task is due: park every other task of the module.
    await db.execute("UPDATE tasks SET enabled = (id = $1)", task_id)
    return int(task_id), name


async def new_instance(db: asyncpg.Connection) -> str:
    instance = uuid.uuid4().hex[:12]
    await repository.register_instance(db, instance, "test", 1)
    return instance


async def test_claim_race_has_one_winner(database_url: str, db: asyncpg.Connection) -> None:
    """50 instances claim one due task at once, 20 times over: exactly one wins each time."""
    dsn = asyncpg_dsn(database_url)
    conns = [await asyncpg.connect(dsn) for _ in range(50)]
    try:
        instances = [await new_instance(db) for _ in conns]
        task_id, _ = await new_task(db)
        for _ in range(20):
            claims = await asyncio.gather(
                *(
                    claim_in_transaction(c, i, lease=30, live_window=30, steal_after=2)
                    for c, i in zip(conns, instances, strict=True)
                )
            )
            winners = [c for c in claims if c is not None]
            assert len(winners) == 1
            assert await repository.complete_run(db, task_id, winners[0].fence, "succeeded", None)
            await db.execute(
                "UPDATE tasks SET next_run_at = clock_timestamp() WHERE id = $1", task_id
            )
        runs = await db.fetchval("SELECT count(*) FROM task_history WHERE task_id = $1", task_id)
        assert runs == 20
    finally:
        for c in conns:
            await c.close()


async def test_database_refuses_overlap(db: asyncpg.Connection) -> None:
    """Two runs of one task overlapping in time, a second running row, or a slot run twice:
    the database itself refuses each."""
    task_id, _ = await new_task(db)
    insert = (
        "INSERT INTO task_history (task_id, instance_id, fence, scheduled_for, started_at, "
        "finished_at, status) VALUES ($1, 'x', $2, $3, $4, $5, $6)"
    )
    now = await db.fetchval("SELECT clock_timestamp()")
    s = timedelta(seconds=1)
    await db.execute(insert, task_id, 1, now, now, now + 10 * s, "succeeded")
    with pytest.raises(asyncpg.ExclusionViolationError):
        await db.execute(insert, task_id, 2, now + s, now + 5 * s, now + 20 * s, "succeeded")
    with pytest.raises(asyncpg.UniqueViolationError):
        await db.execute(insert, task_id, 3, now, now + 30 * s, now + 40 * s, "succeeded")
    await db.execute(insert, task_id, 4, now + 2 * s, now + 50 * s, None, "running")
    with pytest.raises((asyncpg.UniqueViolationError, asyncpg.ExclusionViolationError)):
        await db.execute(insert, task_id, 5, now + 3 * s, now + 60 * s, None, "running")


async def test_fenced_out_completion_changes_nothing(db: asyncpg.Connection) -> None:
    """A run whose lease expired is recorded lost; when its old owner finishes later, its
    write is refused and the new owner's run is untouched."""
    task_id, _ = await new_task(db)
    a, b = await new_instance(db), await new_instance(db)
    first = await claim_in_transaction(db, a, lease=0.2, live_window=30, steal_after=0)
    assert first is not None
    await asyncio.sleep(0.4)
    assert await repository.sweep_expired(db) == 1
    second = await claim_in_transaction(db, b, lease=30, live_window=30, steal_after=0)
    assert second is not None
    assert second.fence == first.fence + 1
    assert not await repository.complete_run(db, task_id, first.fence, "succeeded", None)
    rows = await db.fetch(
        "SELECT fence, instance_id, status, error FROM task_history WHERE task_id = $1 "
        "ORDER BY fence",
        task_id,
    )
    assert [(r["fence"], r["instance_id"], r["status"]) for r in rows] == [
        (first.fence, a, "lost"),
        (second.fence, b, "running"),
    ]
    assert "stopped renewing" in rows[0]["error"]
    task = await db.fetchrow(
        "SELECT is_running, running_instance, fence FROM tasks WHERE id = $1", task_id
    )
    assert (task["is_running"], task["running_instance"], task["fence"]) == (True, b, second.fence)


async def test_renewal_drops_taken_over_runs(db: asyncpg.Connection) -> None:
    """Renewing leases answers only the runs still held: a taken-over run is left out."""
    task_id, _ = await new_task(db)
    a, b = await new_instance(db), await new_instance(db)
    first = await claim_in_transaction(db, a, lease=0.2, live_window=30, steal_after=0)
    assert first is not None
    assert await repository.renew_leases(db, a, 0.2, [(task_id, first.fence)]) == {task_id}
    await asyncio.sleep(0.4)
    await repository.sweep_expired(db)
    second = await claim_in_transaction(db, b, lease=30, live_window=30, steal_after=0)
    assert second is not None
    assert await repository.renew_leases(db, a, 30, [(task_id, first.fence)]) == set()


async def test_missed_slots_coalesce_into_one_run(db: asyncpg.Connection) -> None:
    """A task overdue by many intervals runs once, and its next slot is on its grid, after
    now (no burst of catch-up runs)."""
    task_id, _ = await new_task(db, interval=10)
    await db.execute(
        "UPDATE tasks SET next_run_at = clock_timestamp() - interval '1 hour 3 seconds' "
        "WHERE id = $1",
        task_id,
    )
    instance = await new_instance(db)
    claim = await claim_in_transaction(db, instance, lease=30, live_window=30, steal_after=0)
    assert claim is not None
    assert await repository.complete_run(db, task_id, claim.fence, "succeeded", None)
    again = await claim_in_transaction(db, instance, lease=30, live_window=30, steal_after=0)
    assert again is None
    row = await db.fetchrow(
        "SELECT next_run_at, clock_timestamp() AS now FROM tasks WHERE id = $1", task_id
    )
    assert timedelta(0) < row["next_run_at"] - row["now"] <= timedelta(seconds=10)
    offset = (row["next_run_at"] - claim.scheduled_for).total_seconds()
    assert offset % 10 == pytest.approx(0, abs=1e-3)


async def test_fair_share_keeps_claims_close(db: asyncpg.Connection) -> None:
    """Two live instances taking turns at twelve due tasks: neither gets more than the slack
    (+1) claims ahead of the other, and all twelve are claimed."""
    # Only this test's instances are live and nothing else runs.
    await db.execute("UPDATE instances SET status = 'stopped'")
    ids = [(await new_task(db))[0] for _ in range(12)]
    await db.execute("UPDATE tasks SET enabled = (id = ANY($1))", ids)
    a, b = await new_instance(db), await new_instance(db)
    held = {a: 0, b: 0}
    for _ in range(6):
        for instance in (a, b):
            while await claim_in_transaction(
                db, instance, lease=30, live_window=30, steal_after=60
            ):
                held[instance] += 1
                assert abs(held[a] - held[b]) <= repository.FAIR_SLACK + 1
    assert held[a] + held[b] == 12


async def test_instance_claims_only_tasks_it_has_code_for(db: asyncpg.Connection) -> None:
    """During a rolling deploy an instance without a task's code never claims it."""
    _, name = await new_task(db)
    instance = await new_instance(db)
    assert (
        await claim_in_transaction(
            db, instance, lease=30, live_window=30, steal_after=0, known=["SomethingElse"]
        )
        is None
    )
    claim = await claim_in_transaction(
        db, instance, lease=30, live_window=30, steal_after=0, known=[name]
    )
    assert claim is not None
    assert claim.name == name
