"""The cron's failures in the change stream (a real PostgreSQL, the scheduler's statements
driven by hand): a run that fails, times out or is lost writes its event in the statement
that ends it; the last attempt of a retried task adds task.run.exhausted; a success writes
none."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import asyncpg

from tandem.scheduler import repository
from tests.support.claims import Sessions, claim, new_task

TASK_EVENTS = """
SELECT type, data FROM events
WHERE type LIKE 'task.run.%' AND data->>'task' = $1 ORDER BY id
"""


async def events_of(db: asyncpg.Connection, name: str) -> list[tuple[str, dict[str, Any]]]:
    return [(r["type"], json.loads(r["data"])) for r in await db.fetch(TASK_EVENTS, name)]


async def test_a_failed_run_writes_its_event_and_a_success_none(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    task_id, name = await new_task(db)
    instance = await sessions.new_instance(db)
    run = await claim(db, instance)
    assert run is not None
    assert await repository.complete_run(db, task_id, run.fence, "failed", "boom")
    await db.execute("UPDATE tasks SET next_run_at = clock_timestamp() WHERE id = $1", task_id)
    again = await claim(db, instance)
    assert again is not None
    assert await repository.complete_run(db, task_id, again.fence, "succeeded", None)
    found = await events_of(db, name)
    assert [t for t, _ in found] == ["task.run.failed"]
    data = found[0][1]
    assert (data["attempt"], data["maxAttempts"], data["error"], data["instanceId"]) == (
        1,
        1,
        "boom",
        instance,
    )


async def test_the_last_attempt_of_a_retried_task_is_exhausted(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    task_id, name = await new_task(db)
    await db.execute("UPDATE tasks SET max_attempts = 2 WHERE id = $1", task_id)
    instance = await sessions.new_instance(db)
    first = await claim(db, instance)
    assert first is not None
    retry = repository.Retry(timedelta(0), first.scheduled_for, 1)
    assert await repository.complete_run(db, task_id, first.fence, "timed_out", "slow", retry=retry)
    second = await claim(db, instance)
    assert second is not None
    assert second.attempt == 2
    assert await repository.complete_run(db, task_id, second.fence, "failed", "still")
    found = await events_of(db, name)
    assert [(t, d["attempt"]) for t, d in found] == [
        ("task.run.timed_out", 1),
        ("task.run.failed", 2),
        ("task.run.exhausted", 2),
    ]


async def test_a_lost_run_writes_its_event_when_swept(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    _, name = await new_task(db)
    instance = await sessions.new_instance(db)
    run = await claim(db, instance, lease=0.2)
    assert run is not None
    await asyncio.sleep(0.4)
    assert await repository.sweep_expired(db) == 1
    found = await events_of(db, name)
    assert [t for t, _ in found] == ["task.run.lost"]
    assert "lease expired" in found[0][1]["error"]
