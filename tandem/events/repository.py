"""The change stream's SQL. Each statement is named, with the race it closes.

Events are rendered to JSON by the database (``EVENT_JSON``): the bytes a webhook receives
and signs are the bytes ``GET /events`` shows, with no parse and dump in between.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg

from tandem.core.database import rows_affected
from tandem.core.pool import ConnectionPool
from tandem.events.functions import PRUNE_EVENTS_V1, STAMP_EVENTS_V1

Executor = ConnectionPool | asyncpg.Connection

# The sequencer's round (tandem_stamp_events_v1: the race it closes is in its file).
STAMP_EVENTS = f"SELECT stamped, last_position FROM {STAMP_EVENTS_V1.name}($1)"

# Retention (tandem_prune_events_v1: a prefix of the positions, with the stream's mark).
PRUNE_EVENTS = f"SELECT {PRUNE_EVENTS_V1.name}($1, $2)"

# An event as the API and the webhooks show it: {"id", "type", "createdAt", "data"}; its id
# is "evt_" and the event's row id (stable: a redelivery and a replay send the same id).
EVENT_JSON = """json_build_object(
    'id', 'evt_' || e.id, 'type', e.type,
    'createdAt', to_char(e.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
    'data', e.data)::text"""

# A page of the stream after position $1 (or after the last pruned, if later: the oldest
# kept): up to $2 events, of the types $3 (NULL: all), of the users $4 (NULL: all; else the
# events of those users, either side of a transfer or hold), within positions
# (start, start + $5] (a filtered read scans a bounded window, and tells the reader how far it
# looked). The stream's bounds come in the same statement, so from the same snapshot as the
# events: every position up to last_position is committed and visible here (the stamping
# transaction that gave it committed before this snapshot), so a reader that moves its cursor
# to the end of the window it scanned skips nothing.
READ_EVENTS = f"""
WITH s AS (
    SELECT last_position, pruned_through, greatest($1, pruned_through) AS start
    FROM event_stream
)
SELECT s.last_position, s.pruned_through, s.start, p.position, p.user_id, p.other_user_id,
       p.body
FROM s
LEFT JOIN LATERAL (
    SELECT e.position, e.user_id, e.other_user_id, {EVENT_JSON} AS body
    FROM events e
    WHERE e.position > s.start AND e.position <= s.last_position AND e.position - s.start <= $5
      AND ($3::text[] IS NULL OR e.type = ANY ($3::text[]))
      AND ($4::bigint[] IS NULL OR e.user_id = ANY ($4::bigint[])
           OR e.other_user_id = ANY ($4::bigint[]))
    ORDER BY e.position
    LIMIT $2
) p ON true
ORDER BY p.position
"""

# The stream's bounds alone (a waiter's cheap poll, and a new endpoint's starting point).
STREAM_BOUNDS = "SELECT last_position, pruned_through FROM event_stream"


class StreamEvent(NamedTuple):
    position: int
    user_id: int | None
    other_user_id: int | None
    body: str


class Page(NamedTuple):
    """Events after ``start``, and the stream's bounds when they were read."""

    events: list[StreamEvent]
    start: int
    last_position: int
    pruned_through: int


async def stamp_events(db: Executor, limit: int) -> tuple[int, int | None]:
    """Stamps up to ``limit`` committed events; returns (how many, the last position), or
    (0, None) when another stamper holds the stream."""
    row = await db.fetchrow(STAMP_EVENTS, limit)
    assert row is not None
    return row["stamped"], row["last_position"]


async def prune_events(db: Executor, keep: timedelta, limit: int) -> int:
    return int(await db.fetchval(PRUNE_EVENTS, keep, limit))


async def read_events(
    pool: ConnectionPool,
    after: int,
    limit: int,
    types: list[str] | None,
    users: list[int] | None,
    window: int,
) -> Page:
    rows = await pool.fetch(READ_EVENTS, after, limit, types, users, window, retry_safe=True)
    events = [
        StreamEvent(row["position"], row["user_id"], row["other_user_id"], row["body"])
        for row in rows
        if row["position"] is not None
    ]
    first = rows[0]
    return Page(events, first["start"], first["last_position"], first["pruned_through"])


async def stream_bounds(db: Executor) -> tuple[int, int]:
    row = await db.fetchrow(STREAM_BOUNDS)
    assert row is not None, "migration 0019 inserts the stream's row"
    return row["last_position"], row["pruned_through"]


# --- webhook endpoints -------------------------------------------------------------------

_ENDPOINT_COLUMNS = """w.id, w.url, w.types, w.enabled, w.state, w.position, w.generation,
    w.attempts, w.failing_since, w.next_attempt_at, w.created_at, w.updated_at,
    w.previous_secret_until"""


class Endpoint(NamedTuple):
    id: int
    url: str
    types: list[str] | None
    enabled: bool
    state: str
    position: int
    generation: int
    attempts: int
    failing_since: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    previous_secret_until: datetime | None


class Secrets(NamedTuple):
    """What signs a delivery: the secret, and the one before a rotation while it overlaps."""

    current: str
    previous: str | None


CREATE_ENDPOINT = f"""
INSERT INTO webhook_endpoints AS w (url, types, secret, position, api_key_id)
VALUES ($1, $2, $3, $4, $5)
RETURNING {_ENDPOINT_COLUMNS}
"""

LIST_ENDPOINTS = f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints w ORDER BY w.id"

GET_ENDPOINT = f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints w WHERE w.id = $1"

# A change by the API. Enabling an endpoint (again) makes it active, its failures forgotten:
# it resumes at its cursor at once.
UPDATE_ENDPOINT = f"""
UPDATE webhook_endpoints AS w
SET url = coalesce($2, w.url),
    types = CASE WHEN $3 THEN $4::text[] ELSE w.types END,
    enabled = coalesce($5, w.enabled),
    state = CASE WHEN $5 THEN 'active' ELSE w.state END,
    attempts = CASE WHEN $5 THEN 0 ELSE w.attempts END,
    failing_since = CASE WHEN $5 THEN NULL ELSE w.failing_since END,
    next_attempt_at = CASE WHEN $5 THEN NULL ELSE w.next_attempt_at END,
    generation = w.generation + CASE WHEN $5 OR $2 IS NOT NULL OR $3 THEN 1 ELSE 0 END,
    updated_at = clock_timestamp()
WHERE w.id = $1
RETURNING {_ENDPOINT_COLUMNS}
"""

DELETE_ENDPOINT = "DELETE FROM webhook_endpoints WHERE id = $1 RETURNING id"

# A new secret; the old one keeps signing (beside it) for $3 seconds.
ROTATE_SECRET = f"""
UPDATE webhook_endpoints AS w
SET previous_secret = w.secret, secret = $2,
    previous_secret_until = clock_timestamp() + make_interval(secs => $3),
    updated_at = clock_timestamp()
WHERE w.id = $1
RETURNING {_ENDPOINT_COLUMNS}
"""

# A replay: the cursor set back (or on) to $2, the endpoint active and enabled again; the
# generation bumped, so a delivery worker still sending from the old cursor cannot write it.
REPLAY_ENDPOINT = f"""
UPDATE webhook_endpoints AS w
SET position = $2, generation = w.generation + 1, enabled = true, state = 'active',
    attempts = 0, failing_since = NULL, next_attempt_at = NULL, updated_at = clock_timestamp()
WHERE w.id = $1
RETURNING {_ENDPOINT_COLUMNS}
"""

ENDPOINT_SECRETS = """
SELECT w.secret,
       CASE WHEN w.previous_secret_until > clock_timestamp() THEN w.previous_secret END
FROM webhook_endpoints w WHERE w.id = $1
"""

LIST_DELIVERIES = """
SELECT d.id, 'evt_' || d.event_id AS event_id, d.position, d.attempt, d.outcome,
       d.status_code, d.duration_ms, d.error, d.created_at
FROM webhook_deliveries d
WHERE d.endpoint_id = $1 AND d.id < $2
ORDER BY d.id DESC LIMIT $3
"""

# The events an endpoint receives next: after its cursor, of its types, in stream order.
# The events an endpoint receives next: after $1, through $4 (a position the worker knows is
# committed: what it scanned it need not scan again), of its types, in stream order; with the
# stream's last pruned position, from the same snapshot (events after a cursor below it were
# deleted unsent).
PENDING_EVENTS = f"""
WITH s AS (SELECT pruned_through FROM event_stream)
SELECT s.pruned_through, p.position, p.id, p.created_at, p.body
FROM s
LEFT JOIN LATERAL (
    SELECT e.position, e.id, e.created_at, {EVENT_JSON} AS body
    FROM events e
    WHERE e.position > $1 AND e.position <= $4
      AND ($2::text[] IS NULL OR e.type = ANY ($2::text[]))
    ORDER BY e.position
    LIMIT $3
) p ON true
ORDER BY p.position
"""

# An endpoint whose cursor fell below the retention (it was behind, or disabled, for longer
# than events are kept): marked failing and disabled, never silently moved past the gap; a
# replay from a kept cursor starts it again. Fenced as RECORD_DELIVERIES is.
EXPIRE_ENDPOINT = """
UPDATE webhook_endpoints AS w
SET state = 'failing', enabled = false, updated_at = clock_timestamp()
WHERE w.id = $1 AND w.generation = $4
  AND EXISTS (SELECT FROM tasks t WHERE t.name = $2 AND t.fence = $3 AND t.is_running)
RETURNING w.id
"""

# The delivery worker's record of attempts, and the endpoint's cursor moved past what was
# acknowledged ($5; $6 true) or its failure counted ($6 false: the next attempt in $7
# seconds; past the retry window of $8 seconds since its first failure it is marked failing
# and disabled), in one transaction: a crash re-sends at most what this write would have
# recorded. Fenced twice: the endpoint's generation ($4: a replay or a change since the
# worker read it refuses the write) and the worker's own run of the relay task ($2, $3: a
# worker taken over by another instance, and still running somewhere, cannot move a cursor,
# its fence no longer the task's). Returns nothing when refused.
RECORD_DELIVERIES = """
WITH moved AS (
    UPDATE webhook_endpoints AS w
    SET position = greatest(w.position, $5),
        attempts = CASE WHEN $6 THEN 0 ELSE w.attempts + 1 END,
        failing_since = CASE WHEN $6 THEN NULL
                             ELSE coalesce(w.failing_since, clock_timestamp()) END,
        next_attempt_at = CASE WHEN $6 THEN NULL
                               ELSE clock_timestamp() + make_interval(secs => $7) END,
        state = CASE WHEN NOT $6 AND w.failing_since
                          < clock_timestamp() - make_interval(secs => $8)
                     THEN 'failing' ELSE w.state END,
        enabled = w.enabled AND ($6 OR w.failing_since IS NULL OR w.failing_since
                                 >= clock_timestamp() - make_interval(secs => $8)),
        updated_at = clock_timestamp()
    WHERE w.id = $1 AND w.generation = $4
      AND EXISTS (SELECT FROM tasks t WHERE t.name = $2 AND t.fence = $3 AND t.is_running)
    RETURNING w.state, w.enabled
), recorded AS (
    INSERT INTO webhook_deliveries
        (endpoint_id, event_id, position, attempt, outcome, status_code, duration_ms, error)
    SELECT $1, d.event_id, d.position, d.attempt, d.outcome, d.status_code, d.duration_ms,
           d.error
    FROM unnest($9::bigint[], $10::bigint[], $11::integer[], $12::text[], $13::integer[],
                $14::integer[], $15::text[])
         AS d(event_id, position, attempt, outcome, status_code, duration_ms, error)
    WHERE EXISTS (SELECT FROM moved)
)
SELECT m.state, m.enabled FROM moved m
"""

# Deliveries and their records past the retention.
PRUNE_DELIVERIES = """
DELETE FROM webhook_deliveries WHERE id IN (
    SELECT id FROM webhook_deliveries WHERE created_at < clock_timestamp() - $1::interval
    ORDER BY created_at LIMIT $2)
"""


class Pending(NamedTuple):
    position: int
    event_id: int
    created_at: datetime
    body: str


class Attempt(NamedTuple):
    """One attempt at one event, as recorded."""

    event_id: int
    position: int
    attempt: int
    outcome: str
    status_code: int | None
    duration_ms: int
    error: str | None


class Delivery(NamedTuple):
    id: int
    event_id: str
    position: int
    attempt: int
    outcome: str
    status_code: int | None
    duration_ms: int
    error: str | None
    created_at: datetime


def _endpoint(row: asyncpg.Record | None) -> Endpoint | None:
    return None if row is None else Endpoint(*row)


async def create_endpoint(
    db: Executor, url: str, types: list[str] | None, secret: str, position: int, key: int | None
) -> Endpoint:
    row = await db.fetchrow(CREATE_ENDPOINT, url, types, secret, position, key)
    assert row is not None
    return Endpoint(*row)


async def list_endpoints(pool: ConnectionPool) -> list[Endpoint]:
    return [Endpoint(*row) for row in await pool.fetch(LIST_ENDPOINTS, retry_safe=True)]


async def get_endpoint(db: Executor, endpoint_id: int) -> Endpoint | None:
    return _endpoint(await db.fetchrow(GET_ENDPOINT, endpoint_id))


async def update_endpoint(
    db: Executor,
    endpoint_id: int,
    url: str | None,
    types_given: bool,
    types: list[str] | None,
    enabled: bool | None,
) -> Endpoint | None:
    row = await db.fetchrow(UPDATE_ENDPOINT, endpoint_id, url, types_given, types, enabled)
    return _endpoint(row)


async def delete_endpoint(db: Executor, endpoint_id: int) -> bool:
    return await db.fetchval(DELETE_ENDPOINT, endpoint_id) is not None


async def rotate_secret(
    db: Executor, endpoint_id: int, secret: str, overlap: float
) -> Endpoint | None:
    return _endpoint(await db.fetchrow(ROTATE_SECRET, endpoint_id, secret, overlap))


async def replay_endpoint(db: Executor, endpoint_id: int, position: int) -> Endpoint | None:
    return _endpoint(await db.fetchrow(REPLAY_ENDPOINT, endpoint_id, position))


async def endpoint_secrets(db: Executor, endpoint_id: int) -> Secrets | None:
    row = await db.fetchrow(ENDPOINT_SECRETS, endpoint_id)
    return None if row is None else Secrets(row[0], row[1])


async def list_deliveries(
    pool: ConnectionPool, endpoint_id: int, before: int, limit: int
) -> list[Delivery]:
    rows = await pool.fetch(LIST_DELIVERIES, endpoint_id, before, limit, retry_safe=True)
    return [Delivery(*row) for row in rows]


async def pending_events(
    db: Executor, after: int, types: list[str] | None, limit: int, through: int
) -> tuple[list[Pending], int]:
    """The next events, and the stream's last pruned position."""
    rows = await db.fetch(PENDING_EVENTS, after, types, limit, through)
    pending = [Pending(*row[1:]) for row in rows if row["position"] is not None]
    return pending, rows[0]["pruned_through"]


async def expire_endpoint(db: Executor, endpoint: Endpoint, fence: tuple[str, int]) -> None:
    await db.fetchval(EXPIRE_ENDPOINT, endpoint.id, fence[0], fence[1], endpoint.generation)


async def record_deliveries(
    db: Executor,
    endpoint: Endpoint,
    fence: tuple[str, int],
    position: int,
    delivered: bool,
    retry_in: float,
    window: float,
    attempts: list[Attempt],
) -> tuple[str, bool] | None:
    """The endpoint's (state, enabled) after the write, or None: refused (fenced)."""
    columns: list[list[object]] = [list(column) for column in zip(*attempts, strict=True)]
    row = await db.fetchrow(
        RECORD_DELIVERIES,
        endpoint.id,
        fence[0],
        fence[1],
        endpoint.generation,
        position,
        delivered,
        retry_in,
        window,
        *(columns or [[] for _ in Attempt._fields]),
    )
    return None if row is None else (row["state"], row["enabled"])


async def prune_deliveries(db: asyncpg.Connection, older_than: timedelta, limit: int) -> int:
    return rows_affected(await db.execute(PRUNE_DELIVERIES, older_than, limit))
