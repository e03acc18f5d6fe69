"""The scheduler's SQL. Every timestamp comes from the database clock (``clock_timestamp()``,
not ``now()``: ``now()`` is the transaction's start and could precede the previous run's end).

Each statement is named, with the race it closes.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from tandem.core import locks
from tandem.core.database import rows_affected
from tandem.core.migrations import head_revision
from tandem.scheduler.functions import (
    CLAIM_RUNS_V1,
    HEARTBEAT_V1,
    OPEN_SESSION_V1,
    RECORD_TASK_ACTION_V2,
)

Db = asyncpg.Connection

# Re-exported for the tests that hold the claim lock (the table of namespaces is core.locks).
CLAIM_LOCK_ID = locks.CLAIM
FAIR_SLACK = 1

# A newcomer starts level with the least-served live instance (not at 0), so fairness does
# not hand it every due task until it has caught up with instances running for days. Its
# code's schema revision ($4) tells a contract migration whether an older release is live.
# Its task names ($5) say which schedules some live instance can run (the others are
# orphaned).
REGISTER_INSTANCE = """
INSERT INTO instances (id, hostname, pid, claims, revision, tasks)
VALUES ($1, $2, $3, coalesce((
    SELECT min(claims) FROM instances
    WHERE status = 'active' AND heartbeat_at > clock_timestamp() - interval '1 minute'), 0), $4,
    $5)
ON CONFLICT (id) DO UPDATE
    SET heartbeat_at = clock_timestamp(), status = 'active', revision = EXCLUDED.revision,
        tasks = EXCLUDED.tasks
"""

# A code schedule, from its definition at every start; runtime state (running, next run,
# fence, history) is never reset by a deploy. A new interval schedule is due at once, a new
# cron one at its first slot ($16, computed by the caller from the database clock). A change
# of its spec or policies is a new version; a change of its spec replans the next slot from
# the new spec: a new cron expression or zone, or a change between interval and cron, at its
# first slot after now; a new interval one interval after the last start (now if that is
# past: a deploy that shortens an hour to a minute runs within the minute, not up to an hour
# later); and drops a pending retry of the old version. A schedule left with no next slot and
# nothing that will plan one (no run, no retry: only a bug or a hand edit does that) gets
# one. An API schedule of the same name is left alone (no row returned: the caller says so).
SPEC_COLUMNS = (
    '"interval"',
    "schedule",
    "timezone",
    "missed",
    "timeout",
    "max_attempts",
    "grace",
    "catch_up_limit",
    "retry_backoff",
    "retry_backoff_max",
    "overlap",
    "task",
)
_OLD_SPEC = ", ".join(f"t.{c}" for c in SPEC_COLUMNS)
_NEW_SPEC = ", ".join(f"EXCLUDED.{c}" for c in SPEC_COLUMNS)
_CHANGED = f"({_OLD_SPEC}) IS DISTINCT FROM ({_NEW_SPEC})"
_REPLANNED = (
    '(t.schedule, t.timezone, t."interval") IS DISTINCT FROM '
    '(EXCLUDED.schedule, EXCLUDED.timezone, EXCLUDED."interval")'
)
UPSERT_TASK = f"""
WITH old AS (SELECT version, retry_at FROM tasks WHERE name = $1)
INSERT INTO tasks AS t (name, task, source, "interval", function_name, schedule, timezone,
                        missed, timeout, max_attempts, grace, catch_up_limit, retry_backoff,
                        retry_backoff_max, overlap, next_run_at)
VALUES ($1, $1, 'code', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13,
        coalesce($14, clock_timestamp()))
ON CONFLICT (name) DO UPDATE
SET "interval" = EXCLUDED."interval", function_name = EXCLUDED.function_name,
    schedule = EXCLUDED.schedule, timezone = EXCLUDED.timezone, missed = EXCLUDED.missed,
    timeout = EXCLUDED.timeout, max_attempts = EXCLUDED.max_attempts, grace = EXCLUDED.grace,
    catch_up_limit = EXCLUDED.catch_up_limit, retry_backoff = EXCLUDED.retry_backoff,
    retry_backoff_max = EXCLUDED.retry_backoff_max, overlap = EXCLUDED.overlap,
    task = EXCLUDED.task,
    version = t.version + CASE WHEN {_CHANGED} THEN 1 ELSE 0 END,
    updated_at = CASE WHEN {_CHANGED} THEN clock_timestamp() ELSE t.updated_at END,
    next_run_at = CASE
        WHEN {_REPLANNED} AND t.next_run_at IS NOT NULL
        THEN CASE WHEN EXCLUDED.schedule IS NULL
             THEN greatest(clock_timestamp(),
                           coalesce(t.started_at, clock_timestamp()) + EXCLUDED."interval")
             ELSE EXCLUDED.next_run_at END
        WHEN t.next_run_at IS NULL AND NOT t.is_running AND t.retry_at IS NULL
        THEN EXCLUDED.next_run_at
        ELSE t.next_run_at END,
    retry_at = CASE WHEN {_REPLANNED} THEN NULL ELSE t.retry_at END,
    retry_slot = CASE WHEN {_REPLANNED} THEN NULL ELSE t.retry_slot END,
    retry_attempt = CASE WHEN {_REPLANNED} THEN NULL ELSE t.retry_attempt END,
    retry_params = CASE WHEN {_REPLANNED} THEN NULL ELSE t.retry_params END
WHERE t.source = 'code'
RETURNING t.version, (SELECT version FROM old) AS old_version,
          (SELECT retry_at FROM old) IS NOT NULL AND t.retry_at IS NULL AS dropped_retry
"""

# The claim of up to $10 due runs this instance may take (fair share for the batch, steals,
# retries and manual runs first): one call of a server-side function
# (scheduler/sql/claim_runs_v1.sql says the races it closes), so the cluster-wide claim lock
# is held by no session that waits on its client. Named arguments: the call reads as
# ClaimParams does. Why fair share counts claims (the alternatives measured):
# docs/decisions.md.
CLAIM_DUE_RUNS = f"""
SELECT * FROM {CLAIM_RUNS_V1.name}(
    p_instance => $1, p_key => $2, p_lease => $3, p_live_window => $4, p_steal_after => $5,
    p_fresh_window => $6, p_slack => $7, p_known => $8, p_lock_timeout => $9, p_limit => $10)
"""

# The claimer's plan of the slot it claimed: the next slot (a run-now that came in between
# wins), and the slot this run stands for (catch-up and skip may run a later one than the
# oldest due; not one that already has this attempt). Fenced: only the run's holder plans
# it, and a claim taken over meanwhile changes nothing.
PLAN_RUN = """
WITH task AS (
    UPDATE tasks SET next_run_at = coalesce(next_run_at, $3)
    WHERE id = $1 AND fence = $2 AND is_running
    RETURNING id
)
UPDATE task_history h SET scheduled_for = $4
FROM task WHERE h.task_id = task.id AND h.fence = $2 AND h.status = 'running'
    AND h.scheduled_for <> $4
    AND NOT EXISTS (SELECT FROM task_history o
                    WHERE o.task_id = h.task_id AND o.scheduled_for = $4 AND o.attempt = h.attempt)
"""

# A new database session for the instance: a new key, its session-level advisory lock, and
# the server's patience with a silent client set to a lease (scheduler/sql/open_session_v1.sql).
OPEN_SESSION = f"SELECT * FROM {OPEN_SESSION_V1.name}($1, $2)"

# Membership, renewal of the (task, fence) pairs still held, and the live count, in one
# round trip; refused whole ('stale') if it reaches the server after $6 + $7, or
# ('no_session') on a connection that does not hold the instance's session lock.
HEARTBEAT = f"SELECT * FROM {HEARTBEAT_V1.name}($1, $2, $3, $4, $5, $6, $7, $8)"

# Fenced completion: only the holder of the current fence can finish the run. Zero rows means
# this instance was fenced out (its run was declared lost and maybe re-run): change nothing.
# $5: the next slot, if the claimer's plan never landed. $6 (an interval, NULL: none): the
# slot ($7) is retried as attempt $8 + 1 that long after now, by the database clock (0: a run
# released at shutdown or self-fenced, retried at once), with the params the attempt ran with
# ($9). A pending retry of an older slot gives way to it.
COMPLETE_RUN = """
WITH task AS (
    UPDATE tasks SET is_running = false, running_instance = NULL, lease_until = NULL,
        last_status = $3, last_finished_at = clock_timestamp(),
        last_succeeded_at = CASE WHEN $3 = 'succeeded' THEN clock_timestamp()
            ELSE last_succeeded_at END,
        next_run_at = coalesce(next_run_at, $5),
        retry_at = CASE WHEN $6::interval IS NULL THEN retry_at
            ELSE clock_timestamp() + $6::interval END,
        retry_slot = CASE WHEN $6::interval IS NULL THEN retry_slot ELSE $7 END,
        retry_attempt = CASE WHEN $6::interval IS NULL THEN retry_attempt ELSE $8 + 1 END,
        retry_params = CASE WHEN $6::interval IS NULL THEN retry_params ELSE $9::jsonb END
    WHERE id = $1 AND fence = $2 AND is_running
    RETURNING id, last_finished_at
)
UPDATE task_history h SET status = $3, finished_at = task.last_finished_at, error = $4
FROM task WHERE h.task_id = task.id AND h.fence = $2 AND h.status = 'running'
RETURNING h.id
"""

# Runs whose owner is gone: its database session ended (a crash: noticed within a poll), or
# its lease expired (it stopped renewing: paused, partitioned, or dead without closing its
# sockets). Recorded as lost, released, and its slot retried at once (the next attempt) so
# another instance runs it within a poll. SKIP LOCKED: concurrent sweepers split the work
# instead of queueing on it, and a task being claimed right now (row locked) is left to the
# next sweep. The run's end is when it was lost, not when a sweep noticed (which, after the
# whole cluster was down, can be hours later): its lease's end, or, its owner's session gone,
# the owner's last sign of life (its last heartbeat, or its stop), whichever came first; never
# before the run's start.
SWEEP_EXPIRED = """
WITH expired AS (
    SELECT t.id, t.fence, t.running_instance, t.lease_until < clock_timestamp() AS timed_out,
        greatest(t.started_at, least(clock_timestamp(), t.lease_until, (
            SELECT i.heartbeat_at FROM instances i
            WHERE i.id = t.running_instance AND NOT EXISTS (
                SELECT FROM instance_sessions s WHERE s.session_key = i.session_key)))) AS lost_at
    FROM tasks t
    WHERE t.is_running AND (t.lease_until < clock_timestamp() OR NOT EXISTS (
        SELECT FROM instances i JOIN instance_sessions s ON s.session_key = i.session_key
        WHERE i.id = t.running_instance))
    FOR UPDATE OF t SKIP LOCKED
), released AS (
    UPDATE tasks t SET is_running = false, running_instance = NULL, lease_until = NULL,
        last_status = 'lost', last_finished_at = e.lost_at,
        retry_at = clock_timestamp(), retry_slot = coalesce(h.scheduled_for, t.started_at),
        retry_attempt = coalesce(h.attempt, 1) + 1, retry_params = h.params
    FROM expired e
    LEFT JOIN task_history h ON h.task_id = e.id AND h.fence = e.fence AND h.status = 'running'
    WHERE t.id = e.id
    RETURNING t.id, e.fence, e.running_instance, e.timed_out, e.lost_at
)
UPDATE task_history h SET status = 'lost', finished_at = greatest(h.started_at, r.lost_at),
    error = CASE WHEN r.timed_out
        THEN 'lease expired: instance ' || r.running_instance || ' stopped renewing it'
        ELSE 'session ended: instance ' || r.running_instance
             || ' lost its database session (crashed or stopped)' END
FROM released r WHERE h.task_id = r.id AND h.fence = r.fence AND h.status = 'running'
RETURNING h.task_id
"""

# The runs of this instance ($1) whose schedule has a new run due (a slot, or one asked for)
# and whose overlap policy is cancel_other: their owner stops them, and the claim takes the new
# run once their fenced completion has landed (never two at once). Only pairs still held.
REPLACED_RUNS = """
SELECT t.id FROM tasks t
JOIN unnest($2::bigint[], $3::bigint[]) AS held(id, fence) ON t.id = held.id
WHERE t.fence = held.fence AND t.is_running AND t.running_instance = $1
  AND t.overlap = 'cancel_other' AND t.enabled
  AND least(t.next_run_at, t.manual_at) <= clock_timestamp()
"""

# Instances silent for a long time are forgotten (their runs were swept long before).
FORGET_INSTANCES = """
DELETE FROM instances WHERE heartbeat_at < clock_timestamp() - $1::interval
"""

STOP_INSTANCE = """
UPDATE instances SET status = 'stopped', heartbeat_at = clock_timestamp() WHERE id = $1
"""


class ClaimedRun(NamedTuple):
    """A claimed run, with the spec, params and policies read from the row the claim locked."""

    task_id: int
    # The schedule's name, and the task (code) it runs.
    name: str
    task: str
    fence: int
    scheduled_for: datetime
    started_at: datetime
    # The schedule's previous run was lost: this run is a failover.
    recovers: bool
    # 1 for a slot's first run, then its retries (after a failure, a timeout, or a loss).
    attempt: int
    # The claim cleared the schedule's next slot: the claimer plans it (PLAN_RUN).
    plan_next: bool
    # "schedule", "manual" or "retry".
    trigger: str = "schedule"
    version: int = 1
    params: dict[str, Any] | None = None
    # A regular slot that came due while the previous run was still going.
    overlapped: bool = False
    # The spec: the interval (nominal, for a cron schedule), the cron expression and zone.
    interval: timedelta = timedelta(seconds=60)
    schedule: str | None = None
    timezone: str | None = None
    missed: str = "coalesce"
    timeout: timedelta | None = None
    max_attempts: int = 1
    # NULL in the row: the defaults of registry.task.
    grace: timedelta | None = None
    catch_up_limit: int | None = None
    retry_backoff: timedelta | None = None
    retry_backoff_max: timedelta | None = None
    # What a slot or a manual run does while a run is still going (models.OVERLAP_POLICIES).
    overlap: str = "skip"


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


async def register_instance(
    db: Db, instance_id: str, hostname: str, pid: int, tasks: list[str] | None = None
) -> None:
    await db.execute(REGISTER_INSTANCE, instance_id, hostname, pid, head_revision(), tasks)


class TaskRow(NamedTuple):
    """A code schedule as the tasks table stores it."""

    name: str
    interval: timedelta
    function_name: str
    schedule: str | None
    timezone: str | None
    missed: str
    timeout: timedelta | None
    max_attempts: int
    grace: timedelta
    catch_up_limit: int
    retry_backoff: timedelta
    retry_backoff_max: timedelta
    overlap: str
    # A new or rescheduled cron schedule's first slot (None: an interval one, due at once).
    first_run: datetime | None


class Upserted(NamedTuple):
    version: int
    # None: the row is new.
    old_version: int | None
    dropped_retry: bool


async def upsert_task(db: Db, task: TaskRow) -> Upserted | None:
    """None: an API schedule holds the name (the code schedule is not written)."""
    row = await db.fetchrow(UPSERT_TASK, *task)
    return None if row is None else Upserted(*row)


async def database_now(db: Db) -> datetime:
    now: datetime = await db.fetchval(DATABASE_NOW)
    return now


async def plan_run(db: Db, task_id: int, fence: int, next_slot: datetime, slot: datetime) -> None:
    await db.execute(PLAN_RUN, task_id, fence, next_slot, slot)


class ClaimParams(NamedTuple):
    """What a claim needs to know: who claims, under which session, and the cluster's
    timings (seconds)."""

    instance_id: str
    # The instance's live session (its lock vouches for the claim's run).
    session_key: int
    # The claimed run's lease.
    lease: float
    # An instance counts toward fair share while its heartbeat is this recent
    # (Settings.scheduler_live_window).
    live_window: float
    # A task overdue this long goes to the least-served fresh instance; twice as long, to anyone.
    steal_after: float
    # Fresh enough to be given a steal.
    fresh_window: float
    # The longest wait for the cluster-wide claim lock.
    lock_timeout: float
    # The task names this instance has code for (None: any).
    known: list[str] | None = None


async def claim_due_runs(db: Db, params: ClaimParams, limit: int) -> list[ClaimedRun]:
    """Claim up to ``limit`` due runs this instance may take (fair share for the batch).
    Only while ``params.session_key`` is the instance's live session. One statement, outside
    any transaction of the caller's."""
    assert not db.is_in_transaction(), "the claim is one statement of its own"
    rows = await db.fetch(
        CLAIM_DUE_RUNS,
        params.instance_id,
        params.session_key,
        seconds(params.lease),
        seconds(params.live_window),
        seconds(params.steal_after),
        seconds(params.fresh_window),
        FAIR_SLACK,
        params.known,
        f"{max(int(params.lock_timeout * 1000), 1)}ms",
        limit,
    )
    return [ClaimedRun(*row)._replace(params=json.loads(row["params"])) for row in rows]


async def claim_due_task(db: Db, params: ClaimParams) -> ClaimedRun | None:
    """One claim of one run (claim_due_runs with a batch of one), or None."""
    claimed = await claim_due_runs(db, params, 1)
    return claimed[0] if claimed else None


class Session(NamedTuple):
    key: int
    db_now: datetime


async def open_session(db: Db, instance_id: str, lease: float) -> Session | None:
    """Take a new session lock for the instance on this connection (which must be direct:
    a transaction pooler would hand the lock to whichever server connection ran it). None:
    the instance is not registered."""
    row = await db.fetchrow(OPEN_SESSION, instance_id, seconds(lease))
    return None if row is None else Session(*row)


HOLDS_SESSION = """
SELECT EXISTS (SELECT FROM instance_sessions WHERE session_key = $1 AND pid = pg_backend_pid())
"""


async def holds_session(db: Db, session_key: int) -> bool:
    """The session lock is held by this very connection's backend (a second statement: behind
    a transaction pooler it would run on another server connection)."""
    held: bool = await db.fetchval(HOLDS_SESSION, session_key)
    return held


class Heartbeat(NamedTuple):
    # "renewed", "stale" (arrived too late: nothing done), "no_session" (this connection
    # does not hold the session lock), "unknown_instance" (not registered under this key).
    outcome: str
    renewed: set[int]
    live: int | None
    db_now: datetime


async def heartbeat(
    db: Db,
    instance_id: str,
    session_key: int,
    lease: float,
    held: list[tuple[int, int]],
    anchor: datetime,
    valid_for: float,
    live_window: float,
) -> Heartbeat:
    """Refresh membership and renew the held (task id, fence) pairs, if this reaches the
    database no later than ``anchor + valid_for`` by its clock."""
    row = await db.fetchrow(
        HEARTBEAT,
        instance_id,
        session_key,
        seconds(lease),
        [task_id for task_id, _ in held],
        [fence for _, fence in held],
        anchor,
        seconds(valid_for),
        seconds(live_window),
    )
    assert row is not None
    return Heartbeat(row["outcome"], set(row["renewed"] or ()), row["live"], row["db_now"])


class Retry(NamedTuple):
    """The next attempt at a slot, ``delay`` after the completion (database clock), with the
    params the attempt that ended ran with (None: the schedule's)."""

    delay: timedelta
    slot: datetime
    attempt: int  # the attempt that ended
    params: dict[str, Any] | None = None


async def complete_run(
    db: Db,
    task_id: int,
    fence: int,
    status: str,
    error: str | None,
    *,
    next_slot: datetime | None = None,
    retry: Retry | None = None,
) -> bool:
    """False when this instance no longer holds the run (fenced out): nothing changed."""
    delay, slot, attempt, params = retry if retry is not None else (None, None, None, None)
    row = await db.fetchval(
        COMPLETE_RUN,
        task_id,
        fence,
        status,
        error,
        next_slot,
        delay,
        slot,
        attempt,
        None if params is None else json.dumps(params),
    )
    return row is not None


async def prune_history(db: Db, older_than: timedelta, batch: int) -> int:
    """Deletes up to ``batch`` runs that finished before ``older_than`` ago; returns how many."""
    status = await db.execute(PRUNE_HISTORY, older_than, batch)
    return rows_affected(status)


async def task_health(db: Db, known: list[str], watched: list[str]) -> list[asyncpg.Record]:
    return await db.fetch(TASK_HEALTH, known, watched)


async def sweep_expired(db: Db) -> int:
    return len(await db.fetch(SWEEP_EXPIRED))


async def replaced_runs(db: Db, instance_id: str, held: dict[int, int]) -> list[int]:
    rows = await db.fetch(REPLACED_RUNS, instance_id, list(held), list(held.values()))
    return [int(r["id"]) for r in rows]


async def forget_instances(db: Db, after: float) -> None:
    await db.execute(FORGET_INSTANCES, seconds(after))


async def stop_instance(db: Db, instance_id: str) -> None:
    await db.execute(STOP_INSTANCE, instance_id)


# --- reads and commands for the API (SQLAlchemy text, :named parameters) -----------------

LIST_TASKS = """
SELECT name, extract(epoch FROM "interval") AS interval_seconds, schedule, timezone,
       missed AS missed_slots, extract(epoch FROM timeout) AS timeout_seconds, max_attempts,
       function_name, enabled, is_running, running_instance, started_at,
       CASE WHEN is_running THEN extract(epoch FROM clock_timestamp() - started_at) END
           AS elapsed_seconds,
       next_run_at, retry_at, retry_attempt,
       least(retry_at, next_run_at) AS due_at,
       extract(epoch FROM least(retry_at, next_run_at) - clock_timestamp()) AS due_in_seconds,
       last_status, last_finished_at
FROM tasks WHERE source = 'code' ORDER BY id
"""

TASK_HISTORY = """
SELECT h.id, h.instance_id, h.fence, h.scheduled_for, h.attempt, h.started_at, h.finished_at,
       h.status, h.error
FROM task_history h JOIN tasks t ON t.id = h.task_id
WHERE t.name = :name
ORDER BY h.started_at DESC
LIMIT :limit
"""

TASK_EXISTS = "SELECT id FROM tasks WHERE name = :name"

# Who ran, paused or resumed a task through the API (migration 0009), newest first.
TASK_ACTIONS = """
SELECT a.action, k.name AS api_key, a.created_at AS at
FROM task_actions a JOIN tasks t ON t.id = a.task_id LEFT JOIN api_keys k ON k.id = a.api_key_id
WHERE t.name = :name
ORDER BY a.id DESC
LIMIT :limit
"""

# Appended as the owner (scheduler/sql/record_task_action_v1.sql): the application's role
# may not write task_actions.
RECORD_ACTION = f"SELECT {RECORD_TASK_ACTION_V2.name}(:task_id, :action, :api_key_id, :note)"

COMMAND_RESULT = "SELECT name, enabled, next_run_at FROM tasks WHERE id = :task_id"

# The newest runs across all tasks, without sorting the whole history (no index covers
# started_at alone): each task's newest :limit runs come from ix_task_history_task_started
# (one short index scan per task), and only those candidates are merged. Durations and ages
# are database time, so every instance renders the same numbers.
RECENT_RUNS = """
SELECT t.name AS task, h.id, h.instance_id, h.fence, h.scheduled_for, h.attempt, h.started_at,
       h.finished_at, h.status, h.error,
       extract(epoch FROM coalesce(h.finished_at, clock_timestamp()) - h.started_at)
           AS duration_seconds,
       extract(epoch FROM clock_timestamp() - h.started_at) AS age_seconds
FROM tasks t
CROSS JOIN LATERAL (
    SELECT * FROM task_history h
    WHERE h.task_id = t.id
    ORDER BY h.started_at DESC
    LIMIT :limit
) h
ORDER BY h.started_at DESC, h.id DESC
LIMIT :limit
"""

# The status page's schedules: the first :limit by source (code first) and name, with how
# many there are in all.
SCHEDULES_SUMMARY = """
SELECT t.name, coalesce(t.task, t.name) AS task, t.source, t.version, t.enabled, t.note,
       (SELECT a.note FROM task_actions a WHERE a.task_id = t.id AND a.action = 'pause'
        ORDER BY a.id DESC LIMIT 1) AS pause_note,
       count(*) OVER () AS total
FROM tasks t WHERE t.deleted_at IS NULL
ORDER BY t.source DESC, t.name
LIMIT :limit
"""

DATABASE_NOW = "SELECT clock_timestamp()"

# Finished runs past their retention, a batch at a time (a running row is never touched: it
# has no end). SKIP LOCKED: concurrent pruners split the work.
PRUNE_HISTORY = """
DELETE FROM task_history WHERE id IN (
    SELECT id FROM task_history
    WHERE finished_at < clock_timestamp() - $1::interval
    ORDER BY finished_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""

# Every enabled task's interval and the time it last succeeded (its registration time if it
# never did), in Unix seconds: what the "task not succeeding" alert compares. Only tasks this
# instance has code for ($1): a task removed from the code (or housekeeping turned off) keeps
# its row, but nobody runs it, and it must not alert forever. Watched tasks ($2) are included
# while paused, with since when (the last pause through the API, else the last run's end).
TASK_HEALTH = """
SELECT t.name, extract(epoch FROM t."interval")::float8 AS interval_seconds,
       extract(epoch FROM coalesce(t.last_succeeded_at, t.created_at))::float8 AS last_success,
       CASE WHEN NOT t.enabled THEN extract(epoch FROM coalesce(
           (SELECT max(a.created_at) FROM task_actions a
            WHERE a.task_id = t.id AND a.action = 'pause'),
           t.last_finished_at, t.created_at))::float8 END AS paused_since
FROM tasks t
WHERE t.name = ANY($1::text[]) AND (t.enabled OR t.name = ANY($2::text[]))
"""

LIVE_INSTANCES = """
SELECT i.id, i.hostname, i.pid, i.started_at, i.status,
       extract(epoch FROM clock_timestamp() - i.heartbeat_at) AS heartbeat_age_seconds,
       (SELECT count(*) FROM tasks t WHERE t.is_running AND t.running_instance = i.id)
           AS running
FROM instances i
WHERE i.status <> 'stopped' AND i.heartbeat_at > clock_timestamp() - CAST(:window AS interval)
ORDER BY i.started_at
"""

# Due now, unless it is running: a run asked for while one is in progress is refused, not
# queued behind it, so a client asking in a loop cannot chain runs back to back (a full ledger
# verification, say). The claim sets is_running under the same row lock: whichever comes
# second sees the other's outcome.
RUN_NOW = """
UPDATE tasks SET next_run_at = least(next_run_at, clock_timestamp())
WHERE name = :name AND NOT is_running
RETURNING id
"""

PAUSE = "UPDATE tasks SET enabled = false WHERE name = :name RETURNING id"

# Resuming never replays missed slots, nor a retry pending from before the pause: the service
# reads the task under its row lock (a claim or another resume waits) and moves an overdue
# task to the first slot of its schedule after now (schedules.py), so at most one run follows.
RESUME_READ = """
SELECT id, "interval", schedule, timezone, next_run_at, clock_timestamp() AS now
FROM tasks WHERE name = :name
FOR UPDATE
"""

RESUME = """
UPDATE tasks SET enabled = true, next_run_at = :next_run_at,
    retry_at = NULL, retry_slot = NULL, retry_attempt = NULL
WHERE id = :task_id
RETURNING id
"""
