"""The API keys' SQL: the key commands on a direct connection, the reload and the lookup of
one token on the requests' pool."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg

from tandem.core.database import rows_affected
from tandem.core.pool import ConnectionPool

# A key is unique by name and by token; a second instance inserting the same configured key
# at the same start finds the first's row (DO NOTHING, then the SELECT) instead of failing.
INSERT_KEY = """
INSERT INTO api_keys (name, token_sha256, scopes, bound_user_ids, expires_at, debit_per_minute,
                      debit_per_hour, debit_per_day, rate_requests, rate_seconds)
VALUES ($1, $2, $3, $4, clock_timestamp() + $5::double precision * interval '1 second',
        $6, $7, $8, $9, $10)
ON CONFLICT DO NOTHING
RETURNING id
"""

# A key's limits, as every read of a key returns them (NULL: off).
_LIMIT_COLUMNS = (
    "debit_per_minute",
    "debit_per_hour",
    "debit_per_day",
    "rate_requests",
    "rate_seconds",
)
_LIMITS = ", ".join(_LIMIT_COLUMNS)
# A live key as the cache holds it (LiveKey, read by _live_key's indexes): its binding, its
# expiry and its limits. Spelled once, for api_keys alone (_LIVE_KEY) and as `k` in a join
# (_LIVE_KEY_OF_K), so every statement reading a live key reads the same columns in order.
_LIVE_KEY_COLUMNS = (
    "{t}id",
    "{t}name",
    "{t}scopes",
    "{t}token_sha256",
    "{t}bound_user_ids",
    "extract(epoch FROM {t}expires_at)::float8",
    *("{t}" + column for column in _LIMIT_COLUMNS),
    "{t}parent_key_id",
)
_LIVE_KEY = ", ".join(column.format(t="") for column in _LIVE_KEY_COLUMNS)
_LIVE_KEY_OF_K = ", ".join(column.format(t="k.") for column in _LIVE_KEY_COLUMNS)

KEY_BY_NAME = "SELECT id, token_sha256 = $2 AS same_token FROM api_keys WHERE name = $1"

LIST_KEYS = f"""
SELECT id, name, scopes, created_at, last_used_at, revoked_at, bound_user_ids, expires_at,
       {_LIMITS}
FROM api_keys ORDER BY id
"""

# Revokes the key, the keys it minted (POST /keys: a leaked key's revocation takes what was
# minted with it), and ends their browser sessions, in one statement. The sessions' lookup
# (LIVE_SESSION) refuses a revoked key's sessions anyway; ending them here records when.
REVOKE_KEY = """
WITH named AS (
    SELECT id FROM api_keys WHERE name = $1
), revoked AS (
    UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp())
    WHERE id IN (SELECT id FROM named) OR parent_key_id IN (SELECT id FROM named)
    RETURNING id, revoked_at
), ended AS (
    UPDATE browser_sessions s SET ended_at = r.revoked_at FROM revoked r
    WHERE s.api_key_id = r.id AND s.ended_at IS NULL
)
SELECT r.revoked_at FROM revoked r JOIN named n ON n.id = r.id
"""

# Every live key (not revoked, not expired), for the process's cache (access/cache.py), and
# in the same round trip the use of the keys this process saw since its last load ($1). The
# expiry travels with the key: the cache stops accepting it at that instant, not at the next
# load.
LIVE_KEYS = f"""
WITH touched AS (
    UPDATE api_keys SET last_used_at = clock_timestamp()
    WHERE id = ANY($1::bigint[]) AND revoked_at IS NULL
)
SELECT {_LIVE_KEY}
FROM api_keys
WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > clock_timestamp())
"""

# One live key by its token's hash, for a token the process's cache does not hold (a key made
# since its last load): one probe of the unique index on token_sha256. Live as in LIVE_KEYS
# (not revoked, not expired), so a lookup can never bring back a key a reload has dropped.
LIVE_KEY_BY_HASH = f"""
SELECT {_LIVE_KEY}
FROM api_keys
WHERE token_sha256 = $1 AND revoked_at IS NULL
  AND (expires_at IS NULL OR expires_at > clock_timestamp())
"""

# A key bound to users, made for the calling key $1 by the owner's function, which checks
# what it may be (tandem/access/sql/create_bound_key_v1.sql): the application's own rules
# are not what keeps it bound.
CREATE_BOUND_KEY = """
SELECT outcome, key_id, expires_at
FROM tandem_create_bound_key_v1($1, $2, $3, $4, $5, $6::double precision * interval '1 second')
"""

# A browser session, issued at login by the owner's function from the key's raw token ($1,
# hashed there: tandem/access/sql/start_session_v1.sql), so the application's role cannot
# write a session for a key it does not hold; it expires $3 seconds after. The key's id, or
# NULL when no live key has this token (revoked or expired since this process loaded it).
START_SESSION = "SELECT tandem_start_session_v1($1, $2, $3)"

# The live key of a live session, by the session token's hash (one probe of its unique
# index), on every request carrying the cookie: no process keeps sessions, so a logout or a
# revocation on any instance is seen by the next request on every instance. Live: not ended,
# not expired, and its key not revoked, whatever any key cache holds.
LIVE_SESSION = f"""
SELECT {_LIVE_KEY_OF_K}
FROM browser_sessions s JOIN api_keys k ON k.id = s.api_key_id
WHERE s.token_sha256 = $1 AND s.ended_at IS NULL AND s.expires_at > clock_timestamp()
  AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > clock_timestamp())
"""

# A logout, by the owner's function: it only ever ends a session (the application's role may
# not UPDATE browser_sessions, so it cannot revive one).
END_SESSION = "SELECT tandem_end_session_v1($1)"

# Sessions ended or expired before $1 ago, a batch ($2) at a time: no lookup reads them. No
# FOR UPDATE (it needs UPDATE, which the application's role has not on this table): a logout
# racing on one of these rows is one that expired already; the DELETE waits for it and finds
# the row still dead.
PRUNE_SESSIONS = """
DELETE FROM browser_sessions WHERE id IN (
    SELECT id FROM browser_sessions
    WHERE least(ended_at, expires_at) < clock_timestamp() - $1::interval
    LIMIT $2
)
"""


class Limits(NamedTuple):
    """A key's limits as stored (None: off): debits per minute, hour, day; a rate."""

    debit_per_minute: int | None = None
    debit_per_hour: int | None = None
    debit_per_day: int | None = None
    rate_requests: int | None = None
    rate_seconds: int | None = None


class Key(NamedTuple):
    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
    bound_user_ids: list[int] | None
    expires_at: datetime | None
    limits: Limits


class LiveKey(NamedTuple):
    id: int
    name: str
    scopes: list[str]
    sha256: bytes
    bound_user_ids: list[int] | None
    expires_at: float | None  # seconds since the epoch
    limits: Limits
    parent_key_id: int | None = None  # the key that minted it (POST /keys)


class BoundKeyOutcome(NamedTuple):
    outcome: str  # 'ok', or the function's refusal
    key_id: int | None
    expires_at: datetime | None


def _live_key(row: asyncpg.Record) -> LiveKey:
    users = None if row[4] is None else list(row[4])
    return LiveKey(
        row[0], row[1], list(row[2]), bytes(row[3]), users, row[5], Limits(*row[6:11]), row[11]
    )


async def insert_key(
    db: asyncpg.Connection,
    name: str,
    sha256: bytes,
    scopes: list[str],
    users: list[int] | None = None,
    expires_in: float | None = None,
    limits: Limits = Limits(),  # noqa: B008  (an immutable tuple)
) -> bool:
    """False when the name or the token is taken."""
    row = await db.fetchval(INSERT_KEY, name, sha256, scopes, users, expires_in, *limits)
    return row is not None


async def create_bound_key(
    pool: ConnectionPool,
    caller_id: int,
    name: str,
    sha256: bytes,
    scopes: list[str],
    users: list[int],
    expires_in: float,
) -> BoundKeyOutcome:
    # Not retry_safe: a retry after a lost COMMIT would find its own key's name taken.
    row = await pool.fetchrow(CREATE_BOUND_KEY, caller_id, name, sha256, scopes, users, expires_in)
    assert row is not None
    return BoundKeyOutcome(row[0], row[1], row[2])


async def key_by_name(db: asyncpg.Connection, name: str, sha256: bytes) -> tuple[int, bool] | None:
    """(id, whether its token is ``sha256``'s), or None."""
    row = await db.fetchrow(KEY_BY_NAME, name, sha256)
    return None if row is None else (row[0], row[1])


async def list_keys(db: asyncpg.Connection) -> list[Key]:
    return [
        Key(
            row[0],
            row[1],
            list(row[2]),
            row[3],
            row[4],
            row[5],
            None if row[6] is None else list(row[6]),
            row[7],
            Limits(*row[8:13]),
        )
        for row in await db.fetch(LIST_KEYS)
    ]


async def revoke_key(db: asyncpg.Connection, name: str) -> datetime | None:
    """When the key was revoked (now, or earlier); None when no key has this name."""
    revoked: datetime | None = await db.fetchval(REVOKE_KEY, name)
    return revoked


async def live_keys(pool: ConnectionPool, used: list[int]) -> list[LiveKey]:
    # retry_safe: the only write dates the keys' use, which may as well be retried or lost.
    rows = await pool.fetch(LIVE_KEYS, used, retry_safe=True)
    return [_live_key(row) for row in rows]


async def live_key_by_hash(pool: ConnectionPool, sha256: bytes) -> LiveKey | None:
    row = await pool.fetchrow(LIVE_KEY_BY_HASH, sha256, retry_safe=True)
    return None if row is None else _live_key(row)


async def start_session(
    pool: ConnectionPool, key_token: str, sha256: bytes, seconds: int
) -> int | None:
    """The key's id, or None when no live key has the token ``key_token`` (nothing stored)."""
    key_id: int | None = await pool.fetchval(START_SESSION, key_token, sha256, seconds)
    return key_id


async def live_session(pool: ConnectionPool, sha256: bytes) -> LiveKey | None:
    """The key of the live session with this token hash, or None."""
    row = await pool.fetchrow(LIVE_SESSION, sha256, retry_safe=True)
    return None if row is None else _live_key(row)


async def end_session(pool: ConnectionPool, sha256: bytes) -> None:
    # retry_safe: ending a session twice is ending it once.
    await pool.fetchval(END_SESSION, sha256, retry_safe=True)


async def prune_sessions(conn: asyncpg.Connection, older_than: timedelta, batch: int) -> int:
    """Deletes up to ``batch`` sessions ended or expired ``older_than`` ago; how many."""
    return rows_affected(await conn.execute(PRUNE_SESSIONS, older_than, batch))
