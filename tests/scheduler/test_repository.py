"""The scheduler's statements against a real PostgreSQL: the claim race, the database's own
refusals, fencing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import httpx
import pytest

from tandem.core import locks
from tandem.core.database import asyncpg_dsn
from tandem.scheduler import repository
from tandem.scheduler.functions import CLAIM_ROW_V1
from tandem.scheduler.runner import task_row
from tests.scheduler.registries import definition
from tests.support.claims import DEFINITIONS, Sessions, claim, claim_batch, new_task


async def test_claim_race_has_one_winner(db: asyncpg.Connection, sessions: Sessions) -> None:
    """50 instances claim one due task at once, 20 times over: exactly one wins each time
    (each claims on its own session's connection, through the whole claim function)."""
    instances = [await sessions.new_instance(db) for _ in range(50)]
    task_id, _ = await new_task(db)
    for _ in range(20):
        # The 50 claims queue on the claim lock one after another: on a loaded machine the
        # last can wait longer than the runner's 1 s lock timeout and fail lock_not_available
        # (a likely cause of failures seen with several suites at once on one machine). The
        # property is one winner, not the wait.
        claims = await asyncio.gather(
            *(claim(sessions.conns[i], i, steal_after=2, lock_timeout=60) for i in instances)
        )
        winners = [c for c in claims if c is not None]
        assert len(winners) == 1
        assert await repository.complete_run(db, task_id, winners[0].fence, "succeeded", None)
        await db.execute("UPDATE tasks SET next_run_at = clock_timestamp() WHERE id = $1", task_id)
    runs = await db.fetchval("SELECT count(*) FROM task_history WHERE task_id = $1", task_id)
    assert runs == 20


# The claim's row-level statement alone, as tandem_claim_run_v1 calls it once fair share has
# allowed the claim: no advisory lock, no liveness check.
CLAIM_ROW = f"""
SELECT * FROM {CLAIM_ROW_V1.name}(
    p_instance => $1, p_lease => interval '30 seconds', p_fair => true, p_fair_fresh => true,
    p_steal_after => interval '0', p_known => $2)
"""


async def test_claim_row_guards_alone_let_one_winner_through(
    db: asyncpg.Connection, database_url: str
) -> None:
    """With the cluster-wide claim lock held by another session all along (so no claim could
    be serialised by it), 50 connections run the claim's row-level statement on one due task
    at once, 20 times over: exactly one takes it each time, none fails. Without the row
    guards (SKIP LOCKED, NOT is_running re-checked under the row lock) several would take it,
    or fail on the history's constraints."""
    task_id, name = await new_task(db)
    dsn = asyncpg_dsn(database_url)
    conns = [await asyncpg.connect(dsn) for _ in range(50)]
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", locks.CLAIM)
        for conn in conns:
            # Were the statement to wait on the claim lock, it would fail, not hang.
            await conn.execute("SET lock_timeout = '5s'")
        for round_ in range(20):
            rows = await asyncio.gather(
                *(
                    conn.fetch(CLAIM_ROW, f"racer-{round_}-{n}", [name])
                    for n, conn in enumerate(conns)
                )
            )
            winners = [row for claimed in rows for row in claimed]
            assert len(winners) == 1, winners
            assert await repository.complete_run(
                db, task_id, winners[0]["fence"], "succeeded", None
            )
            await db.execute(
                "UPDATE tasks SET next_run_at = clock_timestamp() WHERE id = $1", task_id
            )
        assert (
            await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objid = $1 AND pid = pg_backend_pid()",
                locks.CLAIM,
            )
            == 1
        ), "the claim lock was held throughout"
    finally:
        await holder.close()
        for conn in conns:
            await conn.close()
    runs = await db.fetchval("SELECT count(*) FROM task_history WHERE task_id = $1", task_id)
    assert runs == 20


async def test_database_refuses_overlap(db: asyncpg.Connection) -> None:
    """Two runs of one task overlapping in time, or a second running row, are refused by the
    exclusion constraint ex_task_history_no_overlap; a slot's attempt run twice, by the unique
    key uq_task_history_task_slot_attempt."""
    task_id, _ = await new_task(db)
    insert = (
        "INSERT INTO task_history (task_id, instance_id, fence, scheduled_for, started_at, "
        "finished_at, status) VALUES ($1, 'x', $2, $3, $4, $5, $6)"
    )
    now = await db.fetchval("SELECT clock_timestamp()")
    s = timedelta(seconds=1)
    await db.execute(insert, task_id, 1, now, now, now + 10 * s, "succeeded")
    with pytest.raises(asyncpg.ExclusionViolationError) as overlap:
        await db.execute(insert, task_id, 2, now + s, now + 5 * s, now + 20 * s, "succeeded")
    assert overlap.value.constraint_name == "ex_task_history_no_overlap"
    with pytest.raises(asyncpg.UniqueViolationError) as twice:
        await db.execute(insert, task_id, 3, now, now + 30 * s, now + 40 * s, "succeeded")
    assert twice.value.constraint_name == "uq_task_history_task_slot_attempt"
    await db.execute(insert, task_id, 4, now + 2 * s, now + 50 * s, None, "running")
    with pytest.raises(asyncpg.ExclusionViolationError) as second_running:
        await db.execute(insert, task_id, 5, now + 3 * s, now + 60 * s, None, "running")
    assert second_running.value.constraint_name == "ex_task_history_no_overlap"


async def test_fenced_out_completion_changes_nothing(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """A run whose lease expired is recorded lost and its slot retried at once; when its old
    owner finishes later, its write is refused and the new owner's run is untouched."""
    task_id, _ = await new_task(db)
    a, b = await sessions.new_instance(db), await sessions.new_instance(db)
    first = await claim(db, a, lease=0.2)
    assert first is not None
    await asyncio.sleep(0.4)
    assert await repository.sweep_expired(db) == 1
    second = await claim(db, b)
    assert second is not None
    assert second.fence == first.fence + 1
    # The lost run's slot is retried at once, as its next attempt.
    assert (second.scheduled_for, second.attempt) == (first.scheduled_for, 2)
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


async def test_missed_slots_coalesce_into_one_run(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """A task overdue by many intervals runs once, and its next slot is on its grid, after
    now (no burst of catch-up runs)."""
    task_id, _ = await new_task(db, interval=10)
    await db.execute(
        "UPDATE tasks SET next_run_at = clock_timestamp() - interval '1 hour 3 seconds' "
        "WHERE id = $1",
        task_id,
    )
    instance = await sessions.new_instance(db)
    claimed = await claim(db, instance)
    assert claimed is not None
    assert await repository.complete_run(db, task_id, claimed.fence, "succeeded", None)
    again = await claim(db, instance)
    assert again is None
    row = await db.fetchrow(
        "SELECT next_run_at, clock_timestamp() AS now FROM tasks WHERE id = $1", task_id
    )
    assert timedelta(0) < row["next_run_at"] - row["now"] <= timedelta(seconds=10)
    offset = (row["next_run_at"] - claimed.scheduled_for).total_seconds()
    assert offset % 10 == pytest.approx(0, abs=1e-3)


async def test_fair_share_keeps_claims_close(db: asyncpg.Connection, sessions: Sessions) -> None:
    """Two live instances taking turns at twelve due tasks, one claim at a time: all twelve
    are claimed, and neither ends more than the slack (+1) ahead of the other."""
    # Only this test's instances are live and nothing else runs.
    await db.execute("UPDATE instances SET status = 'stopped'")
    ids = [(await new_task(db))[0] for _ in range(12)]
    await db.execute("UPDATE tasks SET enabled = (id = ANY($1))", ids)
    a, b = await sessions.new_instance(db), await sessions.new_instance(db)
    held = {a: 0, b: 0}
    for _ in range(6):
        for instance in (a, b):
            while await claim(db, instance, steal_after=60):
                held[instance] += 1
    assert held[a] + held[b] == 12
    assert abs(held[a] - held[b]) <= repository.FAIR_SLACK + 1


async def test_a_batch_takes_its_share_of_what_is_due(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """Three live instances, thirty due tasks, batches of up to fifty: the first call takes
    the due runs' share per instance (ten) plus the slack, not all thirty; the others take
    theirs; every task is claimed once, and the counts end within the slack (+1)."""
    await db.execute("UPDATE instances SET status = 'stopped'")
    ids = [(await new_task(db))[0] for _ in range(30)]
    await db.execute("UPDATE tasks SET enabled = (id = ANY($1))", ids)
    instances = [await sessions.new_instance(db) for _ in range(3)]
    first = await claim_batch(db, instances[0], 50, steal_after=60)
    assert len(first) == 10 + repository.FAIR_SLACK
    held = {instances[0]: len(first), instances[1]: 0, instances[2]: 0}
    for _ in range(5):
        for instance in instances:
            held[instance] += len(await claim_batch(db, instance, 50, steal_after=60))
    assert sum(held.values()) == 30
    assert max(held.values()) - min(held.values()) <= repository.FAIR_SLACK + 1
    fences = await db.fetch("SELECT fence FROM tasks WHERE id = ANY($1)", ids)
    assert {f["fence"] for f in fences} == {1}


async def test_instance_claims_only_tasks_it_has_code_for(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """During a rolling deploy an instance without a task's code never claims it."""
    _, name = await new_task(db)
    instance = await sessions.new_instance(db)
    assert await claim(db, instance, known=["SomethingElse"]) is None
    claimed = await claim(db, instance, known=[name])
    assert claimed is not None
    assert claimed.name == name


async def test_ended_session_is_swept_at_once(db: asyncpg.Connection, sessions: Sessions) -> None:
    """The run of an instance whose database session ended (its process was killed) is
    recorded lost by the next sweep, long before its lease would expire; a live instance's
    run is left alone."""
    task_id, _ = await new_task(db)
    gone, alive = await sessions.new_instance(db), await sessions.new_instance(db)
    run = await claim(db, gone, lease=3600)
    assert run is not None
    running = "SELECT is_running FROM tasks WHERE id = $1"
    await repository.sweep_expired(db)
    assert await db.fetchval(running, task_id)
    await sessions.end(gone)
    await repository.sweep_expired(db)
    assert not await db.fetchval(running, task_id)
    row = await db.fetchrow(
        "SELECT status, error FROM task_history WHERE task_id = $1 AND fence = $2",
        task_id,
        run.fence,
    )
    assert row["status"] == "lost"
    assert row["error"].startswith(f"session ended: instance {gone}")
    again = await claim(db, alive, lease=3600)
    assert again is not None
    assert again.recovers
    await repository.sweep_expired(db)
    assert await db.fetchval(running, task_id)


async def test_no_claim_without_a_session(db: asyncpg.Connection, sessions: Sessions) -> None:
    """An instance whose session is gone claims nothing (the sweep would take it back at
    once); with a new session it claims again."""
    await new_task(db)
    instance = await sessions.new_instance(db)
    await sessions.end(instance)
    assert await claim(db, instance) is None
    conn = await asyncpg.connect(sessions.dsn)
    sessions.conns[instance] = conn
    assert await repository.open_session(conn, instance, 30) is not None
    assert await claim(db, instance) is not None


async def test_claim_gives_up_on_a_held_claim_lock(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """A session sitting on the cluster-wide claim lock (what a claimer cut off mid-transaction
    used to do) holds a claim up for lock_timeout, not forever."""
    await new_task(db)
    instance = await sessions.new_instance(db)
    holder = await asyncpg.connect(sessions.dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", repository.CLAIM_LOCK_ID)
        key = await db.fetchval("SELECT session_key FROM instances WHERE id = $1", instance)
        with pytest.raises(asyncpg.LockNotAvailableError):
            await repository.claim_due_task(
                db,
                repository.ClaimParams(
                    instance,
                    key,
                    lease=30,
                    live_window=30,
                    steal_after=0,
                    fresh_window=30,
                    lock_timeout=0.2,
                ),
            )
    finally:
        await holder.close()
    assert await claim(db, instance) is not None


async def heartbeat(
    sessions: Sessions,
    instance: str,
    held: list[tuple[int, int]],
    *,
    late_by: float = 0.0,
    lease: float = 30,
    conn: asyncpg.Connection | None = None,
) -> repository.Heartbeat:
    """A heartbeat on the instance's session, anchored on the database clock now; ``late_by``
    makes it arrive that long after its validity ended."""
    conn = conn or sessions.conns[instance]
    key = await conn.fetchval("SELECT session_key FROM instances WHERE id = $1", instance)
    anchor = await conn.fetchval("SELECT clock_timestamp()")
    if late_by:
        anchor -= timedelta(seconds=late_by + 1.0)
    return await repository.heartbeat(conn, instance, key, lease, held, anchor, 1.0, 30)


async def test_heartbeat_renews_only_what_is_still_held(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """A heartbeat renews a held lease; not one that has expired (even before any sweep), nor
    one taken over; nothing at all when it arrives later than its validity or on a connection
    that does not hold the session lock."""
    task_id, _ = await new_task(db)
    a, b = await sessions.new_instance(db), await sessions.new_instance(db)
    first = await claim(db, a, lease=0.5)
    assert first is not None
    held = [(task_id, first.fence)]
    lease_of = "SELECT lease_until FROM tasks WHERE id = $1"
    before = await db.fetchval(lease_of, task_id)
    for beat in [
        await heartbeat(sessions, a, held, late_by=0.1),
        await heartbeat(sessions, a, held, conn=db),
    ]:
        assert beat.renewed == set()
        assert await db.fetchval(lease_of, task_id) == before
    assert [
        (await heartbeat(sessions, a, held, late_by=0.1)).outcome,
        (await heartbeat(sessions, a, held, conn=db)).outcome,
    ] == ["stale", "no_session"]
    beat = await heartbeat(sessions, a, held, lease=0.5)
    assert (beat.outcome, beat.renewed) == ("renewed", {task_id})
    assert await db.fetchval(lease_of, task_id) > before
    await asyncio.sleep(0.7)
    assert (await heartbeat(sessions, a, held)).renewed == set()
    await repository.sweep_expired(db)
    second = await claim(db, b)
    assert second is not None
    assert (await heartbeat(sessions, a, held)).renewed == set()
    assert (await heartbeat(sessions, b, [(task_id, second.fence)])).renewed == {task_id}


async def test_overdue_task_goes_to_the_least_served_fresh_instance(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """With the least-served instance stalled (its heartbeat stale, its session alive), a
    task is not claimed by the others until the steal delay, and then by the least-served of
    those whose heartbeat is fresh, not by whichever polls first."""
    await db.execute("UPDATE instances SET status = 'stopped'")
    task_id, _ = await new_task(db)
    stalled, busy, idle = [await sessions.new_instance(db) for _ in range(3)]
    await db.execute(
        "UPDATE instances SET claims = $2, heartbeat_at = clock_timestamp() - $3::interval "
        "WHERE id = $1",
        stalled,
        0,
        timedelta(seconds=5),
    )
    await db.execute("UPDATE instances SET claims = 9 WHERE id = $1", busy)
    await db.execute("UPDATE instances SET claims = 5 WHERE id = $1", idle)
    overdue = "UPDATE tasks SET next_run_at = clock_timestamp() - $2::interval WHERE id = $1"
    await db.execute(overdue, task_id, timedelta(seconds=0.5))
    for instance in (busy, idle):
        assert await claim(db, instance, steal_after=2, fresh_window=1) is None
    await db.execute(overdue, task_id, timedelta(seconds=3))
    assert await claim(db, busy, steal_after=2, fresh_window=1) is None
    stolen = await claim(db, idle, steal_after=2, fresh_window=1)
    assert stolen is not None


async def test_an_overdue_task_is_not_held_up_by_a_least_served_instance_that_never_claims(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """The least-served fresh instance may be unable to claim (its pool broken, no code for
    the task): past twice the steal delay anyone takes the task."""
    await db.execute("UPDATE instances SET status = 'stopped'")
    task_id, _ = await new_task(db)
    await sessions.new_instance(db)  # the least-served, fresh, and never claiming
    busy = await sessions.new_instance(db)
    await db.execute("UPDATE instances SET claims = 9 WHERE id = $1", busy)
    overdue = "UPDATE tasks SET next_run_at = clock_timestamp() - $2::interval WHERE id = $1"
    await db.execute(overdue, task_id, timedelta(seconds=3))
    assert await claim(db, busy, steal_after=2, fresh_window=30) is None
    await db.execute(overdue, task_id, timedelta(seconds=5))
    assert await claim(db, busy, steal_after=2, fresh_window=30) is not None


async def test_a_renewal_waiting_on_a_row_lock_expires_with_its_validity(
    db: asyncpg.Connection, sessions: Sessions
) -> None:
    """A heartbeat that reaches the database in time but waits on a row lock past its
    validity renews nothing and answers stale (its lock wait is bounded by the validity
    left), instead of renewing late."""
    task_id, _ = await new_task(db)
    instance = await sessions.new_instance(db)
    run = await claim(db, instance)
    assert run is not None
    lease_of = "SELECT lease_until FROM tasks WHERE id = $1"
    before = await db.fetchval(lease_of, task_id)
    blocker = await asyncpg.connect(sessions.dsn)
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT FROM tasks WHERE id = $1 FOR UPDATE", task_id)
            beat = await heartbeat(sessions, instance, [(task_id, run.fence)])
    finally:
        await blocker.close()
    assert (beat.outcome, beat.renewed) == ("stale", set())
    assert await db.fetchval(lease_of, task_id) == before


async def test_a_task_without_a_next_slot_gets_one(
    db: asyncpg.Connection, client: httpx.AsyncClient
) -> None:
    """A task left with no next slot, no retry and no run (its claimer died before planning
    and a pause dropped the retry) is given its schedule's next slot by a resume, and by the
    next start's upsert of its definition."""
    task_id, name = await new_task(db, interval=60)
    stranded = "UPDATE tasks SET next_run_at = NULL WHERE id = $1"
    due = "SELECT next_run_at - clock_timestamp() AS due_in FROM tasks WHERE id = $1"
    await db.execute(stranded, task_id)
    assert (await client.post(f"/tasks/{name}/pause")).status_code == 200
    resumed = await client.post(f"/tasks/{name}/resume")
    assert resumed.status_code == 200
    assert resumed.json()["next_run_at"] is not None
    assert timedelta(0) < await db.fetchval(due, task_id) <= timedelta(seconds=60)
    await db.execute(stranded, task_id)
    now = await repository.database_now(db)
    await repository.upsert_task(db, task_row(DEFINITIONS[name], now))
    assert await db.fetchval(due, task_id) <= timedelta(0)  # an interval task: due at once


async def test_a_deploy_that_changes_a_code_schedule_replans_it(db: asyncpg.Connection) -> None:
    """A code schedule's interval shortened from an hour to a minute by a deploy: a new
    version, its next slot within the minute (not up to an hour later), and a pending retry
    of the old version dropped; the same definition again changes nothing."""
    task_id, name = await new_task(db, interval=3600)
    await db.execute(
        "UPDATE tasks SET next_run_at = clock_timestamp() + interval '1 hour', "
        "started_at = clock_timestamp(), retry_at = clock_timestamp() + interval '1 hour', "
        "retry_slot = clock_timestamp(), retry_attempt = 2 WHERE id = $1",
        task_id,
    )
    now = await repository.database_now(db)
    shorter = definition(name, timedelta(minutes=1))
    upserted = await repository.upsert_task(db, task_row(shorter, now))
    assert upserted == repository.Upserted(version=2, old_version=1, dropped_retry=True)
    row = await db.fetchrow(
        "SELECT next_run_at - clock_timestamp() AS due_in, retry_at FROM tasks WHERE id = $1",
        task_id,
    )
    assert row["due_in"] <= timedelta(minutes=1)
    assert row["retry_at"] is None
    again = await repository.upsert_task(db, task_row(shorter, now))
    assert again == repository.Upserted(version=2, old_version=2, dropped_retry=False)


async def test_an_api_schedule_keeps_its_name_from_a_code_schedule(db: asyncpg.Connection) -> None:
    """A code schedule whose name an API schedule holds is not written over it: the upsert
    changes nothing and says so (None)."""
    name = "api-held"
    await db.execute(
        'INSERT INTO tasks (name, task, source, "interval", function_name) '
        "VALUES ($1, 'other', 'api', '1 hour', 'x')",
        name,
    )
    now = await repository.database_now(db)
    assert await repository.upsert_task(db, task_row(definition(name, timedelta(1)), now)) is None
    assert await db.fetchval("SELECT source FROM tasks WHERE name = $1", name) == "api"
