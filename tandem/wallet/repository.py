"""Wallet SQL. Each statement is named, with the race it closes.

Functions take the hot pool or a connection (both run statements), so the same statement
serves a standalone call and one inside a transaction. asyncpg prepares and caches each
statement per connection, so the hot path pays parsing and planning once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.database import rows_affected
from tandem.core.hotpool import HotPool
from tandem.wallet.models import User

Connection = asyncpg.Connection
Executor = HotPool | Connection

# Applies the delta only when the result fits 0..2^63-1, in one statement. UPDATE takes the
# row lock, and under READ COMMITTED PostgreSQL re-checks the WHERE on the newest row version
# after waiting for it, so concurrent updates serialise on the row with no read-modify-write
# race and no lost update. The numeric sum cannot overflow, so a refusal is a row, not an
# error. The second branch tells "refused" from "no such user" in the same round trip.
APPLY_DELTA = """
WITH updated AS (
    UPDATE users SET balance = balance + $2, updated_at = clock_timestamp()
    WHERE id = $1 AND (balance::numeric + $2) BETWEEN 0 AND 9223372036854775807
    RETURNING balance
)
SELECT balance, true AS applied FROM updated
UNION ALL
SELECT balance, false FROM users WHERE id = $1 AND NOT EXISTS (SELECT FROM updated)
"""

GET_BALANCE = "SELECT balance FROM users WHERE id = $1"

# Claims the key before the change. A concurrent request with the same key blocks on the
# unique index until the first commits (then sees its row) or rolls back (then claims it):
# two requests with one key can never both apply.
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys (key, user_id, amount, outcome) VALUES ($1, $2, $3, 'pending')
ON CONFLICT (key) DO NOTHING
RETURNING key
"""

GET_IDEMPOTENCY_OUTCOME = """
SELECT user_id, amount, outcome, balance FROM idempotency_keys WHERE key = $1
"""

RECORD_IDEMPOTENCY_OUTCOME = """
UPDATE idempotency_keys SET outcome = $2, balance = $3 WHERE key = $1
"""

# Keys past their retention, a batch at a time. SKIP LOCKED: a row another transaction holds
# (a retry of that very key in flight) is left for the next round instead of waited on.
PRUNE_IDEMPOTENCY_KEYS = """
DELETE FROM idempotency_keys WHERE key IN (
    SELECT key FROM idempotency_keys
    WHERE created_at < clock_timestamp() - $1::interval
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""


class DeltaResult(NamedTuple):
    balance: int
    applied: bool


class StoredOutcome(NamedTuple):
    user_id: int
    amount: int
    outcome: str
    balance: int | None


async def apply_delta(db: Executor, user_id: int, amount: int) -> DeltaResult | None:
    """None when the user does not exist."""
    row = await db.fetchrow(APPLY_DELTA, user_id, amount)
    return None if row is None else DeltaResult(row[0], row[1])


async def get_balance(pool: HotPool, user_id: int) -> int | None:
    value = await pool.fetchval(GET_BALANCE, user_id, read_only=True)
    return None if value is None else int(value)


async def create_user(session: AsyncSession, balance: int) -> User:
    """A plain insert: the ORM's case. The caller's transaction commits it."""
    user = User(balance=balance)
    session.add(user)
    await session.flush()
    return user


async def claim_idempotency_key(conn: Connection, key: str, user_id: int, amount: int) -> bool:
    return await conn.fetchval(CLAIM_IDEMPOTENCY_KEY, key, user_id, amount) is not None


async def get_idempotency_outcome(conn: Connection, key: str) -> StoredOutcome:
    row = await conn.fetchrow(GET_IDEMPOTENCY_OUTCOME, key)
    assert row is not None, "claimed keys are never deleted inside their retention window"
    return StoredOutcome(row[0], row[1], row[2], row[3])


async def record_idempotency_outcome(
    conn: Connection, key: str, outcome: str, balance: int | None
) -> None:
    await conn.execute(RECORD_IDEMPOTENCY_OUTCOME, key, outcome, balance)


async def prune_idempotency_keys(conn: Connection, older_than: timedelta, batch: int) -> int:
    """Deletes up to ``batch`` keys created before ``older_than`` ago; returns how many."""
    status = await conn.execute(PRUNE_IDEMPOTENCY_KEYS, older_than, batch)
    return rows_affected(status)
