"""The scheduler's statements driven by hand, as the runner drives them: instances with a
database session each, tasks made due, claims planned as the runner plans them."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg

from tandem.scheduler import repository
from tandem.scheduler.claims import plan_claim
from tandem.scheduler.registry import TaskDefinition
from tandem.scheduler.runner import task_row
from tests.scheduler.registries import definition

# The definitions of the tasks made here, as the runner holds them (it plans their next slots).
DEFINITIONS: dict[str, TaskDefinition] = {}


class Sessions:
    """Instances with a database session each (the connection holding their session lock),
    as the runner's heartbeat connection holds it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conns: dict[str, asyncpg.Connection] = {}

    async def new_instance(self, db: asyncpg.Connection) -> str:
        instance = uuid.uuid4().hex[:12]
        await repository.register_instance(db, instance, "test", 1)
        conn = await asyncpg.connect(self.dsn)
        self.conns[instance] = conn
        assert await repository.open_session(conn, instance, 30) is not None
        return instance

    async def end(self, instance: str) -> None:
        """The instance's session ends, as when its process is killed."""
        await self.conns.pop(instance).close()

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.close()


async def new_task(db: asyncpg.Connection, interval: float = 60.0) -> tuple[int, str]:
    """A task due now, the only one enabled (every other task of the database is parked)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    DEFINITIONS[name] = definition(name, timedelta(seconds=interval))
    now = await repository.database_now(db)
    await repository.upsert_task(db, task_row(DEFINITIONS[name], now))
    task_id = await db.fetchval("SELECT id FROM tasks WHERE name = $1", name)
    await db.execute("UPDATE tasks SET enabled = (id = $1)", task_id)
    return int(task_id), name


async def claim(
    db: asyncpg.Connection,
    instance: str,
    *,
    lease: float = 30,
    steal_after: float = 0,
    fresh_window: float = 30,
    known: list[str] | None = None,
    lock_timeout: float = 1.0,
) -> repository.ClaimedRun | None:
    """One claim of one run, as the runner makes it (a live window of 30 s), under the
    instance's current session, with its slot planned (PLAN_RUN) as the runner plans it."""
    claimed = await claim_batch(
        db,
        instance,
        1,
        lease=lease,
        steal_after=steal_after,
        fresh_window=fresh_window,
        known=known,
        lock_timeout=lock_timeout,
    )
    return claimed[0] if claimed else None


async def claim_batch(
    db: asyncpg.Connection,
    instance: str,
    limit: int,
    *,
    lease: float = 30,
    steal_after: float = 0,
    fresh_window: float = 30,
    known: list[str] | None = None,
    lock_timeout: float = 1.0,
) -> list[repository.ClaimedRun]:
    """One claim call of up to ``limit`` runs (claim's, for a batch), each slot planned."""
    key = await db.fetchval("SELECT session_key FROM instances WHERE id = $1", instance)
    claimed = await repository.claim_due_runs(
        db,
        repository.ClaimParams(
            instance,
            key,
            lease=lease,
            live_window=30,
            steal_after=steal_after,
            fresh_window=fresh_window,
            lock_timeout=lock_timeout,
            known=known,
        ),
        limit,
    )
    for run in claimed:
        planned = plan_claim(run, DEFINITIONS.get(run.name))
        if planned is not None:
            assert planned.run_slot is not None
            await repository.plan_run(
                db, run.task_id, run.fence, planned.next_slot, planned.run_slot
            )
    return claimed
