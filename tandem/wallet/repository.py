"""Wallet SQL. Each statement is named, with the race it closes.

Functions take the requests' pool or a connection (both run statements), so the same statement
serves a standalone call and one inside a transaction. asyncpg prepares and caches each
statement per connection, so the hot path pays parsing and planning once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.database import rows_affected
from tandem.core.pool import ConnectionPool
from tandem.wallet.functions import TRANSFER_V1
from tandem.wallet.models import INT64_MAX, LedgerEntry, User

Connection = asyncpg.Connection
Executor = ConnectionPool | Connection

# Applies the delta only when the result fits 0..INT64_MAX, and journals it, in one statement
# (one round trip, autocommit). UPDATE takes the row lock, and under READ COMMITTED
# PostgreSQL re-checks the WHERE on the newest row version after waiting for it, so
# concurrent updates serialise on the row with no read-modify-write race and no lost update;
# the entry is written under that same lock, so a user's entries are in the order of its
# changes, each with the balance after it. The numeric sum cannot overflow, so a refusal is a
# row, not an error. The second branch tells "refused" from "no such user" in the same round
# trip. $4 (the idempotency key) is unique in the journal per caller ($5, the API key that
# also signs the entry): a change applied with a key can never be applied again with it.
APPLY_DELTA = f"""
WITH updated AS (
    UPDATE users SET balance = balance + $2, updated_at = clock_timestamp()
    WHERE id = $1 AND (balance::numeric + $2) BETWEEN 0 AND {INT64_MAX}
    RETURNING id, balance
), entry AS (
    INSERT INTO ledger_entries
        (user_id, amount, balance, kind, reference, idempotency_key, api_key_id)
    SELECT id, $2, balance, CASE WHEN $2 > 0 THEN 'deposit' ELSE 'withdrawal' END, $3, $4, $5
    FROM updated
    RETURNING id
)
SELECT balance, true AS applied, (SELECT id FROM entry) AS entry_id FROM updated
UNION ALL
SELECT balance, false, NULL FROM users WHERE id = $1 AND NOT EXISTS (SELECT FROM updated)
"""

GET_BALANCE = "SELECT balance FROM users WHERE id = $1"

# The balance after the user's last entry at or before $2 (entries of one user are written
# under its row lock, so created_at and id rise together).
BALANCE_AT = """
SELECT balance FROM ledger_entries WHERE user_id = $1 AND created_at <= $2
ORDER BY created_at DESC, id DESC LIMIT 1
"""

# Newest first, keyset on id: a page is an index range scan, and entries written meanwhile
# (always with larger ids) never shift a later page. One row more than asked tells whether
# another page follows.
HISTORY = """
SELECT e.id, e.amount, e.balance, e.kind, e.transfer_id, e.reference, e.created_at,
       k.name AS api_key
FROM ledger_entries e LEFT JOIN api_keys k ON k.id = e.api_key_id
WHERE e.user_id = $1 AND e.id < $2 ORDER BY e.id DESC LIMIT $3
"""

USER_EXISTS = "SELECT EXISTS (SELECT FROM users WHERE id = $1)"

# Locks both users in id order, checks, moves the amount and journals both legs, in one
# round trip (wallet/sql/transfer_v1.sql): no deadlock whatever the directions in flight.
TRANSFER = f"SELECT * FROM {TRANSFER_V1.name}($1, $2, $3, $4, $5, $6)"

GET_TRANSFER = """
SELECT t.id, t.from_user_id, t.to_user_id, t.amount, t.reference, t.created_at,
       f.balance AS from_balance, d.balance AS to_balance
FROM transfers t
JOIN ledger_entries f ON f.transfer_id = t.id AND f.user_id = t.from_user_id
JOIN ledger_entries d ON d.transfer_id = t.id AND d.user_id = t.to_user_id
WHERE t.id = $1
"""

# What a key applied, from the journal (it outlives the pruning of idempotency_keys): the
# balance update that carries it, or the transfer; one statement, since a request asks both
# (a key of one kind must not apply as the other). Keys are the caller's ($2): an index
# probe by key, then the caller (IS NOT DISTINCT FROM: NULL is the anonymous caller).
APPLIED_WITH_KEY = """
SELECT e.id, e.user_id, e.amount, e.balance, e.reference,
       (SELECT t.id FROM transfers t
        WHERE t.idempotency_key = $1 AND t.api_key_id IS NOT DISTINCT FROM $2) AS transfer_id
FROM (SELECT) one LEFT JOIN ledger_entries e
    ON e.idempotency_key = $1 AND e.api_key_id IS NOT DISTINCT FROM $2
"""

# Claims the key before the change. A concurrent request with the same key blocks on the
# unique index until the first commits (then sees its row) or rolls back (then claims it):
# two requests with one key can never both apply. DO UPDATE rather than DO NOTHING: it locks
# an existing row too, so the pruning (SKIP LOCKED) cannot delete it between this claim and
# the reading of its outcome. True when the row is new (xmax = 0). A key is unique per caller
# ($2, NULLS NOT DISTINCT: migration 0009), so one caller can never claim another's.
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys
    (key, api_key_id, kind, user_id, to_user_id, amount, reference, outcome)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending')
ON CONFLICT (key, api_key_id) DO UPDATE SET key = EXCLUDED.key
RETURNING xmax = 0
"""

GET_IDEMPOTENCY_OUTCOME = """
SELECT kind, user_id, to_user_id, amount, reference, outcome, balance FROM idempotency_keys
WHERE key = $1 AND api_key_id IS NOT DISTINCT FROM $2
"""

RECORD_IDEMPOTENCY_OUTCOME = """
UPDATE idempotency_keys SET outcome = $3 WHERE key = $1 AND api_key_id IS NOT DISTINCT FROM $2
"""

# Counts a new key against its caller's day (UTC) and answers the day's total. One row per
# caller, day and server backend: a backend runs one transaction at a time, so two requests
# never wait on one counter row (a single row per caller would serialise all of its keyed
# requests on their commits). The sum reads the other backends' committed rows.
COUNT_IDEMPOTENCY_KEY = """
WITH bump AS (
    INSERT INTO idempotency_usage (api_key_id, day, backend, used)
    VALUES ($1, (clock_timestamp() AT TIME ZONE 'UTC')::date, pg_backend_pid(), 1)
    ON CONFLICT (day, api_key_id, backend)
        DO UPDATE SET used = idempotency_usage.used + 1
    RETURNING used
)
SELECT (SELECT used FROM bump) + coalesce((
    SELECT sum(used) FROM idempotency_usage
    WHERE api_key_id IS NOT DISTINCT FROM $1
      AND day = (clock_timestamp() AT TIME ZONE 'UTC')::date
      AND backend <> pg_backend_pid()), 0)
"""

# Counts money leaving users by an API key with debit limits ($1, $2), in the transaction that
# moves it, for each of the key's windows ($3: their lengths in seconds, aligned to the UTC
# epoch), and answers each window's total with the seconds left in it. One row per key, window
# and server backend, as COUNT_IDEMPOTENCY_KEY: no two debits ever wait on one counter row (a
# row per key would serialise all of a key's debits on their commits). The sum reads the other
# backends' committed rows, so debits committing at once on n backends may together pass the
# limit by at most one debit each (n - 1 in all).
COUNT_KEY_DEBIT = """
WITH windows AS (
    SELECT s AS seconds,
           date_bin(make_interval(secs => s), clock_timestamp(), timestamptz 'epoch') AS start
    FROM unnest($3::integer[]) s
), bump AS (
    INSERT INTO key_debits AS d (api_key_id, seconds, window_start, backend, amount)
    SELECT $1, seconds, start, pg_backend_pid(), $2 FROM windows
    ON CONFLICT (api_key_id, seconds, window_start, backend)
        DO UPDATE SET amount = d.amount + EXCLUDED.amount
    RETURNING seconds, window_start, amount
)
SELECT b.seconds,
       b.amount + coalesce((
           SELECT sum(o.amount) FROM key_debits o
           WHERE o.api_key_id = $1 AND o.seconds = b.seconds
             AND o.window_start = b.window_start AND o.backend <> pg_backend_pid()), 0),
       extract(epoch FROM b.window_start + make_interval(secs => b.seconds) - clock_timestamp())
FROM bump b
"""

# The ledger's two invariants, in one snapshot (the caller's REPEATABLE READ transaction): a
# balance is the sum of its user's entries, and each entry's balance is the previous one's
# plus its amount (an opening entry's is its amount).
VERIFY_BALANCES = """
SELECT u.id, u.balance, coalesce(s.total, 0) AS journal, coalesce(s.n, 0) AS entries
FROM users u
LEFT JOIN (SELECT user_id, sum(amount) AS total, count(*) AS n FROM ledger_entries
           GROUP BY user_id) s ON s.user_id = u.id
WHERE coalesce(s.total, 0) <> u.balance
ORDER BY u.id
"""

# Also an entry dated before the previous one of its user: the balance at an instant relies
# on created_at rising with id per user (both are set under the user's row lock), which only
# a clock stepping back (a failover to a host behind) could break.
VERIFY_CHAIN = """
SELECT id, user_id, amount, balance, previous FROM (
    SELECT id, user_id, amount, balance, created_at,
           lag(balance) OVER w AS previous, lag(created_at) OVER w AS previous_at
    FROM ledger_entries
    WINDOW w AS (PARTITION BY user_id ORDER BY id)
) e
WHERE balance::numeric <> coalesce(previous, 0)::numeric + amount OR created_at < previous_at
ORDER BY id
"""

LEDGER_SIZE = "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM ledger_entries)"

# Keys past their retention, a batch at a time. SKIP LOCKED: a row another transaction holds
# (a retry of that very key in flight) is left for the next round instead of waited on.
PRUNE_IDEMPOTENCY_KEYS = """
DELETE FROM idempotency_keys WHERE ctid IN (
    SELECT ctid FROM idempotency_keys
    WHERE created_at < clock_timestamp() - $1::interval
      -- applied before the journal kept keys (migration 0008): kept, the only record
      AND NOT (outcome = 'ok' AND balance IS NOT NULL)
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""

# Counters of days before yesterday (UTC) are no longer read.
PRUNE_IDEMPOTENCY_USAGE = """
DELETE FROM idempotency_usage WHERE day < (clock_timestamp() AT TIME ZONE 'UTC')::date - 1
"""

# Debit windows that ended over a day ago (the longest is a day) are no longer read.
PRUNE_KEY_DEBITS = """
DELETE FROM key_debits
WHERE window_start + make_interval(secs => seconds) < clock_timestamp() - interval '1 day'
"""


class DeltaResult(NamedTuple):
    balance: int
    applied: bool
    entry_id: int | None


class Request(NamedTuple):
    """What a keyed request asked for: a retry with the same key must ask the same."""

    kind: str  # "update" or "transfer"
    user_id: int
    to_user_id: int | None
    amount: int
    reference: str | None


class Entry(NamedTuple):
    id: int
    amount: int
    balance: int
    kind: str
    transfer_id: int | None
    reference: str | None
    created_at: datetime
    api_key: str | None  # the name of the API key that made it


class KeyedEntry(NamedTuple):
    id: int
    user_id: int
    amount: int
    balance: int
    reference: str | None


class TransferResult(NamedTuple):
    outcome: str  # "ok", "from_not_found", "to_not_found", "insufficient_funds", ...
    transfer_id: int | None
    from_balance: int | None
    to_balance: int | None
    created_at: datetime | None


class Transfer(NamedTuple):
    id: int
    from_user_id: int
    to_user_id: int
    amount: int
    reference: str | None
    created_at: datetime
    # None: not shown to a key bound to the other side only (service.get_transfer).
    from_balance: int | None
    to_balance: int | None


async def apply_delta(
    db: Executor,
    user_id: int,
    amount: int,
    reference: str | None = None,
    idempotency_key: str | None = None,
    api_key_id: int | None = None,
) -> DeltaResult | None:
    """None when the user does not exist."""
    row = await db.fetchrow(APPLY_DELTA, user_id, amount, reference, idempotency_key, api_key_id)
    return None if row is None else DeltaResult(row[0], row[1], row[2])


async def get_balance(pool: ConnectionPool, user_id: int) -> int | None:
    value = await pool.fetchval(GET_BALANCE, user_id, retry_safe=True)
    return None if value is None else int(value)


async def balance_at(pool: ConnectionPool, user_id: int, at: datetime) -> int | None:
    """None when the user has no entry at or before ``at``."""
    value = await pool.fetchval(BALANCE_AT, user_id, at, retry_safe=True)
    return None if value is None else int(value)


async def history(pool: ConnectionPool, user_id: int, before: int, limit: int) -> list[Entry]:
    rows = await pool.fetch(HISTORY, user_id, before, limit, retry_safe=True)
    return [Entry(*row) for row in rows]


async def user_exists(pool: ConnectionPool, user_id: int) -> bool:
    exists: bool = await pool.fetchval(USER_EXISTS, user_id, retry_safe=True)
    return exists


async def transfer(
    db: Executor,
    from_user_id: int,
    to_user_id: int,
    amount: int,
    reference: str | None,
    idempotency_key: str | None,
    api_key_id: int | None,
) -> TransferResult:
    row = await db.fetchrow(
        TRANSFER, from_user_id, to_user_id, amount, reference, idempotency_key, api_key_id
    )
    assert row is not None
    return TransferResult(*row)


async def get_transfer(db: Executor, transfer_id: int) -> Transfer | None:
    if isinstance(db, ConnectionPool):
        row = await db.fetchrow(GET_TRANSFER, transfer_id, retry_safe=True)
    else:
        row = await db.fetchrow(GET_TRANSFER, transfer_id)
    return None if row is None else Transfer(*row)


class Applied(NamedTuple):
    entry: KeyedEntry | None
    transfer_id: int | None


async def applied_with_key(conn: Connection, key: str, api_key_id: int | None) -> Applied:
    row = await conn.fetchrow(APPLIED_WITH_KEY, key, api_key_id)
    assert row is not None  # one row, always
    entry = None if row[0] is None else KeyedEntry(row[0], row[1], row[2], row[3], row[4])
    return Applied(entry, row[5])


async def create_user(session: AsyncSession, balance: int, api_key_id: int | None) -> User:
    """A plain insert and its opening entry: the ORM's case. The caller's transaction
    commits both."""
    user = User(balance=balance)
    session.add(user)
    await session.flush()
    session.add(
        LedgerEntry(
            user_id=user.id,
            amount=balance,
            balance=balance,
            kind="opening",
            api_key_id=api_key_id,
        )
    )
    await session.flush()
    return user


async def claim_idempotency_key(
    conn: Connection, key: str, api_key_id: int | None, request: Request
) -> bool:
    """True: claimed anew; False: the caller claimed the key before (its row is now locked)."""
    claimed: bool = await conn.fetchval(CLAIM_IDEMPOTENCY_KEY, key, api_key_id, *request)
    return claimed


async def count_idempotency_key(conn: Connection, api_key_id: int | None) -> int:
    """Counts one new key for the caller today; returns today's total, this one included."""
    total: int = await conn.fetchval(COUNT_IDEMPOTENCY_KEY, api_key_id)
    return total


class DebitTotal(NamedTuple):
    seconds: int  # the window's length
    total: int  # the key's debits in the window, this one included
    left: float  # seconds until the window ends


async def count_key_debit(
    conn: Connection, api_key_id: int, amount: int, windows: list[int]
) -> list[DebitTotal]:
    """Counts ``amount`` against each window of the key, in the caller's transaction."""
    rows = await conn.fetch(COUNT_KEY_DEBIT, api_key_id, amount, windows)
    return [DebitTotal(row[0], int(row[1]), float(row[2])) for row in rows]


class StoredOutcome(NamedTuple):
    request: Request
    outcome: str  # "ok" or the refusal answered (errors.refusal_outcome)
    # The balance an "ok" answered, for keys stored before the journal kept them.
    legacy_balance: int | None


async def get_idempotency_outcome(
    conn: Connection, key: str, api_key_id: int | None
) -> StoredOutcome:
    row = await conn.fetchrow(GET_IDEMPOTENCY_OUTCOME, key, api_key_id)
    assert row is not None, "claimed keys are never deleted inside their retention window"
    return StoredOutcome(Request(row[0], row[1], row[2], row[3], row[4]), row[5], row[6])


async def record_idempotency_outcome(
    conn: Connection, key: str, api_key_id: int | None, outcome: str
) -> None:
    await conn.execute(RECORD_IDEMPOTENCY_OUTCOME, key, api_key_id, outcome)


class Verification(NamedTuple):
    users: int
    entries: int
    # Users whose balance is not the sum of their entries: (id, balance, sum, entries).
    balances: list[tuple[int, int, int, int]]
    # Entries whose balance is not the previous one's plus their amount, or dated before it:
    # (entry id, user id, amount, balance, previous balance).
    chain: list[tuple[int, int, int, int, int | None]]

    @property
    def mismatches(self) -> int:
        return len(self.balances) + len(self.chain)


async def verify_ledger(conn: Connection) -> Verification:
    """Both invariants over every user, read in one snapshot, so concurrent changes (each a
    balance and its entry in one transaction) never look like a mismatch."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # A full scan: past the database's default statement deadline on a big ledger.
        await conn.execute("SET LOCAL statement_timeout = 0")
        size = await conn.fetchrow(LEDGER_SIZE)
        assert size is not None
        balances = [(r[0], r[1], r[2], r[3]) for r in await conn.fetch(VERIFY_BALANCES)]
        chain = [(r[0], r[1], r[2], r[3], r[4]) for r in await conn.fetch(VERIFY_CHAIN)]
    return Verification(size[0], size[1], balances, chain)


async def prune_idempotency_keys(conn: Connection, older_than: timedelta, batch: int) -> int:
    """Deletes up to ``batch`` keys created before ``older_than`` ago; returns how many."""
    status = await conn.execute(PRUNE_IDEMPOTENCY_KEYS, older_than, batch)
    await conn.execute(PRUNE_IDEMPOTENCY_USAGE)
    await conn.execute(PRUNE_KEY_DEBITS)
    return rows_affected(status)
