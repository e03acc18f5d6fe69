"""The change stream's SQL. Each statement is named, with the race it closes.

Events are rendered to JSON by the database (``EVENT_JSON``): the bytes a webhook receives
and signs are the bytes ``GET /events`` shows, with no parse and dump in between.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

import asyncpg

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
