"""The SQL of schedules as data (``/schedules``): reads, and the commands that change a
schedule's row, each in the caller's transaction (``ConnectionPool.transaction``). Every
timestamp is the database clock's.

A command reads the row ``FOR UPDATE`` first: the race it closes is two changes of one
version both applied (the second waits for the first's commit, then sees the new version and
is refused 412), and a change landing between a claim's read and its write (the claim takes
the same row lock, so a run goes by one whole version). Each command that makes a schedule due
sooner, or new, wakes every instance's claimer (``NOTIFY tandem_schedules``, sent at commit).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import asyncpg

from tandem.scheduler.functions import RECORD_TASK_ACTION_V2

Db = asyncpg.Connection

# The channel the claimers listen on (scheduler/session.py): a schedule was made or made due.
WAKE_CHANNEL = "tandem_schedules"

# A schedule as the API shows it. ``orphaned``: no live instance has its task's code (an
# instance of a release before 0020 does not say which tasks it has: it may).
_SHOWN = """
SELECT t.id, t.name, coalesce(t.task, t.name) AS task, t.params::text AS params, t.source,
       t.version, t.note, extract(epoch FROM t."interval")::float8 AS every,
       t.schedule AS cron, t.timezone AS tz, t.missed, t.overlap,
       extract(epoch FROM t.timeout)::float8 AS timeout,
       t.max_attempts, extract(epoch FROM t.retry_backoff)::float8 AS retry_backoff,
       extract(epoch FROM t.retry_backoff_max)::float8 AS retry_backoff_max,
       t.enabled, t.is_running, t.running_instance, t.next_run_at, t.retry_at, t.manual_at,
       t.last_status, t.last_finished_at, t.created_at, t.updated_at, t.deleted_at,
       ck.name AS created_by, uk.name AS updated_by,
       NOT EXISTS (
           SELECT FROM instances i JOIN instance_sessions s ON s.session_key = i.session_key
           WHERE i.status = 'active' AND i.heartbeat_at > clock_timestamp() - $1::interval
             AND (i.tasks IS NULL OR coalesce(t.task, t.name) = ANY(i.tasks))) AS orphaned,
       (SELECT a.note FROM task_actions a WHERE a.task_id = t.id AND a.action = 'pause'
        ORDER BY a.id DESC LIMIT 1) AS pause_note
FROM tasks t
LEFT JOIN api_keys ck ON ck.id = t.created_by
LEFT JOIN api_keys uk ON uk.id = t.updated_by
"""

GET_SCHEDULE = _SHOWN + "WHERE t.name = $2"

# Keyset by name (uq_tasks_name's index), live schedules only ($2..$4: filters, NULL: any).
LIST_SCHEDULES = (
    _SHOWN
    + """
WHERE t.deleted_at IS NULL
  AND ($2::text IS NULL OR coalesce(t.task, t.name) = $2)
  AND ($3::text IS NULL OR t.source = $3)
  AND ($4::boolean IS NULL OR t.enabled = $4)
  AND ($5::text IS NULL OR t.name > $5)
ORDER BY t.name
LIMIT $6
"""
)

# The row a command works on, locked (see the module's docstring).
LOCK_SCHEDULE = """
SELECT id, source, version, enabled, is_running, manual_at, overlap, retry_at, retry_slot,
       retry_attempt, "interval", schedule, timezone, started_at, next_run_at,
       coalesce(task, name) AS task, clock_timestamp() AS now
FROM tasks WHERE name = $1
FOR UPDATE
"""

# A new API schedule; nothing when the name is taken (uq_tasks_name: a live schedule's, code
# or API; a deleted one's name holds a "/"). An interval schedule is due at once, a cron one
# at its first slot ($7).
CREATE_SCHEDULE = """
INSERT INTO tasks AS t (name, task, source, params, "interval", function_name, schedule,
                        timezone, missed, overlap, timeout, max_attempts, grace, retry_backoff,
                        retry_backoff_max, enabled, note, created_by, updated_by, next_run_at,
                        create_key)
VALUES ($1, $2, 'api', $3::jsonb, $4, $5, $6, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
        $18, $18, coalesce($7, clock_timestamp()), $19)
ON CONFLICT (name) DO NOTHING
RETURNING id
"""

# The live schedule a retried create made: same name, same API key, same Idempotency-Key.
MADE_WITH_KEY = """
SELECT id FROM tasks
WHERE name = $1 AND created_by IS NOT DISTINCT FROM $2 AND create_key = $3
"""

# A change of an API schedule: a new version. $14: the spec changed (replan the next slot: a
# cron one's first after now, $15; an interval one's one interval after the last start, now
# if that is past); $16: the spec or the params changed (a pending retry of the old version
# is dropped).
CHANGE_SCHEDULE = """
UPDATE tasks AS t
SET task = $2, params = $3::jsonb, "interval" = $4, function_name = $5, schedule = $6,
    timezone = $7, missed = $8, overlap = $9, timeout = $10, max_attempts = $11,
    retry_backoff = $12, retry_backoff_max = $13, grace = $17, note = $18,
    version = t.version + 1, updated_at = clock_timestamp(), updated_by = $19,
    next_run_at = CASE WHEN $14 AND t.next_run_at IS NOT NULL
        THEN coalesce($15, greatest(clock_timestamp(),
                                    coalesce(t.started_at, clock_timestamp()) + $4))
        ELSE t.next_run_at END,
    retry_at = CASE WHEN $16 THEN NULL ELSE t.retry_at END,
    retry_slot = CASE WHEN $16 THEN NULL ELSE t.retry_slot END,
    retry_attempt = CASE WHEN $16 THEN NULL ELSE t.retry_attempt END,
    retry_params = CASE WHEN $16 THEN NULL ELSE t.retry_params END
WHERE t.id = $1
"""

# Soft: no new claim (disabled), the name free again ("<name>/<id>": no live name holds a
# "/"), the history kept; a running run finishes (its fenced completion finds the row).
DELETE_SCHEDULE = """
UPDATE tasks SET deleted_at = clock_timestamp(), enabled = false, name = name || '/' || id,
    manual_at = NULL, manual_params = NULL, retry_at = NULL, retry_slot = NULL,
    retry_attempt = NULL, retry_params = NULL, updated_at = clock_timestamp(), updated_by = $2
WHERE id = $1
"""

PAUSE_SCHEDULE = "UPDATE tasks SET enabled = false WHERE id = $1"

# Resuming never replays missed slots, nor a retry pending from before the pause ($2: the
# next slot, computed by the caller under the row lock).
RESUME_SCHEDULE = """
UPDATE tasks SET enabled = true, next_run_at = $2,
    retry_at = NULL, retry_slot = NULL, retry_attempt = NULL, retry_params = NULL
WHERE id = $1
"""

# A run asked for: due now with these params ($2, NULL: the schedule's); the claim takes it
# after a due retry and before the regular slot.
RUN_SCHEDULE = """
UPDATE tasks SET manual_at = clock_timestamp(), manual_params = $2::jsonb WHERE id = $1
"""

WAKE = f"SELECT pg_notify('{WAKE_CHANNEL}', '')"

RECORD_ACTION = f"SELECT {RECORD_TASK_ACTION_V2.name}($1, $2, $3, $4)"

# A schedule's history by its name: the live one, else the newest deleted one of that name.
FIND_FOR_HISTORY = """
SELECT id FROM tasks
WHERE name = $1 OR (deleted_at IS NOT NULL AND split_part(name, '/', 1) = $1)
ORDER BY deleted_at IS NULL DESC, id DESC
LIMIT 1
"""

SCHEDULE_RUNS = """
SELECT h.id, h.instance_id, h.started_at, h.finished_at, h.status, h.attempt,
       h.scheduled_for, h.schedule_version, h.params::text AS params, h.trigger, h.error
FROM task_history h WHERE h.task_id = $1
ORDER BY h.started_at DESC
LIMIT $2
"""

SCHEDULE_ACTIONS = """
SELECT a.action, k.name AS api_key, a.created_at AS at, a.note
FROM task_actions a LEFT JOIN api_keys k ON k.id = a.api_key_id
WHERE a.task_id = $1
ORDER BY a.id DESC
LIMIT $2
"""


class Locked(NamedTuple):
    id: int
    source: str
    version: int
    enabled: bool
    is_running: bool
    manual_at: datetime | None
    overlap: str
    retry_at: datetime | None
    retry_slot: datetime | None
    retry_attempt: int | None
    interval: timedelta
    schedule: str | None
    timezone: str | None
    started_at: datetime | None
    next_run_at: datetime | None
    task: str
    now: datetime


class Spec(NamedTuple):
    """What a schedule runs, when, and how: what a create or a change writes."""

    task: str
    params: dict[str, Any]
    interval: timedelta
    function_name: str
    schedule: str | None
    timezone: str | None
    missed: str
    overlap: str
    timeout: timedelta | None
    max_attempts: int
    retry_backoff: timedelta
    retry_backoff_max: timedelta
    grace: timedelta
    note: str | None


def _decoded(row: asyncpg.Record) -> dict[str, Any]:
    found = dict(row)
    if found.get("params") is not None:
        found["params"] = json.loads(found["params"])
    return found


async def get_schedule(db: Db, name: str, live_window: timedelta) -> dict[str, Any] | None:
    row = await db.fetchrow(GET_SCHEDULE, live_window, name)
    return None if row is None else _decoded(row)


async def list_schedules(
    db: Db,
    live_window: timedelta,
    task: str | None,
    source: str | None,
    enabled: bool | None,
    after: str | None,
    limit: int,
) -> list[dict[str, Any]]:
    rows = await db.fetch(LIST_SCHEDULES, live_window, task, source, enabled, after, limit)
    return [_decoded(r) for r in rows]


async def lock_schedule(db: Db, name: str) -> Locked | None:
    row = await db.fetchrow(LOCK_SCHEDULE, name)
    return None if row is None else Locked(*row)


async def database_now(db: Db) -> datetime:
    now: datetime = await db.fetchval("SELECT clock_timestamp()")
    return now


async def create_schedule(
    db: Db,
    name: str,
    spec: Spec,
    first_run: datetime | None,
    enabled: bool,
    api_key: int | None,
    create_key: str | None,
) -> int | None:
    """The new schedule's id; None: the name is taken."""
    found = await db.fetchval(
        CREATE_SCHEDULE,
        name,
        spec.task,
        json.dumps(spec.params),
        spec.interval,
        spec.function_name,
        spec.schedule,
        first_run,
        spec.timezone,
        spec.missed,
        spec.overlap,
        spec.timeout,
        spec.max_attempts,
        spec.grace,
        spec.retry_backoff,
        spec.retry_backoff_max,
        enabled,
        spec.note,
        api_key,
        create_key,
    )
    return None if found is None else int(found)


async def made_with_key(db: Db, name: str, api_key: int | None, create_key: str) -> bool:
    return await db.fetchval(MADE_WITH_KEY, name, api_key, create_key) is not None


async def change_schedule(
    db: Db,
    schedule_id: int,
    spec: Spec,
    *,
    replan: bool,
    first_run: datetime | None,
    drop_retry: bool,
    api_key: int | None,
) -> None:
    await db.execute(
        CHANGE_SCHEDULE,
        schedule_id,
        spec.task,
        json.dumps(spec.params),
        spec.interval,
        spec.function_name,
        spec.schedule,
        spec.timezone,
        spec.missed,
        spec.overlap,
        spec.timeout,
        spec.max_attempts,
        spec.retry_backoff,
        spec.retry_backoff_max,
        replan,
        first_run,
        drop_retry,
        spec.grace,
        spec.note,
        api_key,
    )


async def delete_schedule(db: Db, schedule_id: int, api_key: int | None) -> None:
    await db.execute(DELETE_SCHEDULE, schedule_id, api_key)


async def pause_schedule(db: Db, schedule_id: int) -> None:
    await db.execute(PAUSE_SCHEDULE, schedule_id)


async def resume_schedule(db: Db, schedule_id: int, next_run_at: datetime) -> None:
    await db.execute(RESUME_SCHEDULE, schedule_id, next_run_at)


async def run_schedule(db: Db, schedule_id: int, params: dict[str, Any] | None) -> None:
    await db.execute(RUN_SCHEDULE, schedule_id, None if params is None else json.dumps(params))


async def wake(db: Db) -> None:
    await db.execute(WAKE)


async def record_action(
    db: Db, schedule_id: int, action: str, api_key: int | None, note: str | None
) -> None:
    await db.execute(RECORD_ACTION, schedule_id, action, api_key, note)


async def schedule_history(
    db: Db, name: str, limit: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The runs and actions of the schedule named ``name`` (a deleted one's too), newest
    first; None: no schedule ever had that name."""
    found = await db.fetchval(FIND_FOR_HISTORY, name)
    if found is None:
        return None
    runs = [_decoded(r) for r in await db.fetch(SCHEDULE_RUNS, found, limit)]
    actions = [dict(r) for r in await db.fetch(SCHEDULE_ACTIONS, found, limit)]
    return runs, actions
