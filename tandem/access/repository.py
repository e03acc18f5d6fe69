"""The API keys' SQL: the key commands on a direct connection, the reload and the lookup of
one token on the requests' pool."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import asyncpg

from tandem.core.pool import ConnectionPool

# A key is unique by name and by token; a second instance inserting the same configured key
# at the same start finds the first's row (DO NOTHING, then the SELECT) instead of failing.
INSERT_KEY = """
INSERT INTO api_keys (name, token_sha256, scopes) VALUES ($1, $2, $3)
ON CONFLICT DO NOTHING
RETURNING id
"""

KEY_BY_NAME = "SELECT id, token_sha256 = $2 AS same_token FROM api_keys WHERE name = $1"

LIST_KEYS = """
SELECT id, name, scopes, created_at, last_used_at, revoked_at FROM api_keys ORDER BY id
"""

REVOKE_KEY = """
UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp()) WHERE name = $1
RETURNING revoked_at
"""

# Every live key, for the process's cache (access/cache.py), and in the same round trip the
# use of the keys this process saw since its last load ($1).
LIVE_KEYS = """
WITH touched AS (
    UPDATE api_keys SET last_used_at = clock_timestamp()
    WHERE id = ANY($1::bigint[]) AND revoked_at IS NULL
)
SELECT id, name, scopes, token_sha256 FROM api_keys WHERE revoked_at IS NULL
"""

# One live key by its token's hash, for a token the process's cache does not hold (a key made
# since its last load): one probe of the unique index on token_sha256. Live as in LIVE_KEYS
# (not revoked), so a lookup can never bring back a key a reload has dropped.
LIVE_KEY_BY_HASH = """
SELECT id, name, scopes, token_sha256 FROM api_keys
WHERE token_sha256 = $1 AND revoked_at IS NULL
"""


class Key(NamedTuple):
    id: int
    name: str
    scopes: list[str]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class LiveKey(NamedTuple):
    id: int
    name: str
    scopes: list[str]
    sha256: bytes


async def insert_key(db: asyncpg.Connection, name: str, sha256: bytes, scopes: list[str]) -> bool:
    """False when the name or the token is taken."""
    return await db.fetchval(INSERT_KEY, name, sha256, scopes) is not None


async def key_by_name(db: asyncpg.Connection, name: str, sha256: bytes) -> tuple[int, bool] | None:
    """(id, whether its token is ``sha256``'s), or None."""
    row = await db.fetchrow(KEY_BY_NAME, name, sha256)
    return None if row is None else (row[0], row[1])


async def list_keys(db: asyncpg.Connection) -> list[Key]:
    return [Key(*row) for row in await db.fetch(LIST_KEYS)]


async def revoke_key(db: asyncpg.Connection, name: str) -> datetime | None:
    """When the key was revoked (now, or earlier); None when no key has this name."""
    revoked: datetime | None = await db.fetchval(REVOKE_KEY, name)
    return revoked


async def live_keys(pool: ConnectionPool, used: list[int]) -> list[LiveKey]:
    # retry_safe: the only write dates the keys' use, which may as well be retried or lost.
    rows = await pool.fetch(LIVE_KEYS, used, retry_safe=True)
    return [LiveKey(row[0], row[1], list(row[2]), bytes(row[3])) for row in rows]


async def live_key_by_hash(pool: ConnectionPool, sha256: bytes) -> LiveKey | None:
    row = await pool.fetchrow(LIVE_KEY_BY_HASH, sha256, retry_safe=True)
    return None if row is None else LiveKey(row[0], row[1], list(row[2]), bytes(row[3]))
