"""Wallet SQL. Each statement is named, with the race it closes.

Functions take the requests' pool or a connection (both run statements), so the same statement
serves a standalone call and one inside a transaction. asyncpg prepares and caches each
statement per connection, so the hot path pays parsing and planning once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.database import rows_affected
from tandem.core.locks import LEDGER_VERIFICATION
from tandem.core.pool import ConnectionPool
from tandem.wallet.functions import (
    APPLY_DELTA_V2,
    APPLY_DELTAS_V1,
    CAPTURE_HOLD_V1,
    CREATE_HOLD_V1,
    CREATE_USER_V1,
    EXPIRE_HOLDS_V1,
    RELEASE_HOLD_V1,
    TRANSFER_BATCH_V1,
    TRANSFER_V3,
)

Connection = asyncpg.Connection
Executor = ConnectionPool | Connection

# A balance change and its journal entry in one statement (one round trip, autocommit), run
# by its owner function (wallet/sql/apply_delta_v2.sql): the row lock serialises concurrent
# changes with no lost update, and the entry is written under it with the balance after. A
# withdrawal spends only the available amount (balance - held), after releasing the user's
# expired holds if they are in the way. No row: no such user; applied false: refused
# (refusal 'mint_ceiling' when the daily mint ceiling refused a deposit, else the available
# amount or the 64-bit ceiling). $4 (the idempotency key) is unique in the journal per caller
# ($5): a change applied with a key never applies again.
APPLY_DELTA = f"SELECT * FROM {APPLY_DELTA_V2.name}($1, $2, $3, $4, $5)"

# Group commit (batching.py): a batch of one user's changes in one statement and one commit,
# in the order they arrived, by its owner function (wallet/sql/apply_deltas_v1.sql): the row
# lock, taken first, holds every other change of the user off while each item is decided on
# the balance the ones before it left (never below held, never past 2^63-1, under the mint
# ceiling) and journaled with its own balance after it. One row per item, in order; no rows:
# no such user. $4 (idempotency keys) must hold no (key, caller) twice.
APPLY_DELTAS = f"SELECT * FROM {APPLY_DELTAS_V1.name}($1, $2, $3, $4, $5)"

# A user and its opening entry in one statement, by its owner function
# (wallet/sql/create_user_v1.sql): the application's role may not insert either itself.
CREATE_USER = f"SELECT * FROM {CREATE_USER_V1.name}(:balance, :api_key_id)"

GET_BALANCE = "SELECT balance, held FROM users WHERE id = $1"

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
       k.name AS api_key, e.hold_id
FROM ledger_entries e LEFT JOIN api_keys k ON k.id = e.api_key_id
WHERE e.user_id = $1 AND e.id < $2 ORDER BY e.id DESC LIMIT $3
"""

USER_EXISTS = "SELECT EXISTS (SELECT FROM users WHERE id = $1)"

# Locks both users in id order, checks, moves the amount and journals both legs, in one
# round trip, as the owner (wallet/sql/transfer_v3.sql): no deadlock whatever the directions
# in flight; the payer spends only its available amount (its expired holds released first
# when they are in the way).
TRANSFER = f"SELECT * FROM {TRANSFER_V3.name}($1, $2, $3, $4, $5, $6)"

# Group commit (batching.py): transfers into one payee in one statement and one commit, in the
# order they arrived, by its owner function (wallet/sql/transfer_batch_v1.sql): every row it
# touches locked once, in id order, first (as TRANSFER's two), each transfer decided on the
# balances the ones before it left and journaled with its two legs. One row per transfer, in
# order, as TRANSFER's.
TRANSFER_BATCH = f"SELECT * FROM {TRANSFER_BATCH_V1.name}($1, $2, $3, $4, $5)"

GET_TRANSFER = """
SELECT t.id, t.from_user_id, t.to_user_id, t.amount, t.reference, t.created_at,
       f.balance AS from_balance, d.balance AS to_balance
FROM transfers t
JOIN ledger_entries f ON f.transfer_id = t.id AND f.user_id = t.from_user_id
JOIN ledger_entries d ON d.transfer_id = t.id AND d.user_id = t.to_user_id
WHERE t.id = $1
"""

# What each key applied, from the journal (it outlives the pruning of idempotency_keys): the
# balance update that carries it, the transfer, the hold it made, or the hold whose capture
# or release it made; one statement for a batch of keys ($1, with their callers $2), since a
# request asks them all (a key of one kind must not apply as another). A row per key, in the
# keys' order (a key is unique per caller in the journal and in hold_events, so each join
# finds at most one row). Keys are the caller's: an index probe by key each, then the caller
# (IS NOT DISTINCT FROM: NULL is the anonymous caller).
APPLIED_WITH_KEYS = """
SELECT e.id, e.user_id, e.amount, e.balance, e.reference,
       (SELECT t.id FROM transfers t
        WHERE t.idempotency_key = k.key AND t.api_key_id IS NOT DISTINCT FROM k.owner),
       (SELECT h.id FROM holds h
        WHERE h.idempotency_key = k.key AND h.api_key_id IS NOT DISTINCT FROM k.owner),
       v.hold_id, v.kind
FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS k(key, owner, ord)
LEFT JOIN ledger_entries e
    ON e.idempotency_key = k.key AND e.api_key_id IS NOT DISTINCT FROM k.owner
LEFT JOIN hold_events v ON v.idempotency_key = k.key AND v.api_key_id IS NOT DISTINCT FROM k.owner
ORDER BY k.ord
"""

# Claims the key before the change. A concurrent request with the same key blocks on the
# unique index until the first commits (then sees its row) or rolls back (then claims it):
# two requests with one key can never both apply. DO UPDATE rather than DO NOTHING: it locks
# an existing row too, so the pruning (SKIP LOCKED) cannot delete it between this claim and
# the reading of its outcome. True when the row is new (xmax = 0). A key is unique per caller
# ($2, NULLS NOT DISTINCT: migration 0009), so one caller can never claim another's.
CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys
    (key, api_key_id, kind, user_id, to_user_id, amount, reference, hold_id, expires_in, outcome)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending')
ON CONFLICT (key, api_key_id) DO UPDATE SET key = EXCLUDED.key
RETURNING xmax = 0
"""

# CLAIM_IDEMPOTENCY_KEY for a batch of balance changes of one user ($1; keys $2 of callers
# $3, amounts $4, references $5; no (key, caller) twice: the batch is deduplicated before,
# since ON CONFLICT DO UPDATE cannot touch one row twice). The race it closes, besides the
# single claim's: two batches claiming overlapping keys in different orders would each hold
# one the other waits for; claimed in one order (caller, key), whoever waits holds nothing
# the other needs. No row lock is held yet (the change comes after), so a claim never waits
# while holding a balance. True per key (in the order given) when claimed anew.
CLAIM_IDEMPOTENCY_KEYS = """
WITH claimed AS (
    INSERT INTO idempotency_keys
        (key, api_key_id, kind, user_id, to_user_id, amount, reference, outcome)
    SELECT c.key, c.owner, 'update', $1::bigint, NULL, c.amount, c.reference, 'pending'
    FROM unnest($2::text[], $3::bigint[], $4::bigint[], $5::text[])
         AS c(key, owner, amount, reference)
    ORDER BY c.owner NULLS FIRST, c.key
    ON CONFLICT (key, api_key_id) DO UPDATE SET key = EXCLUDED.key
    RETURNING key, api_key_id, xmax = 0 AS fresh
)
SELECT c.fresh
FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS k(key, owner, ord)
JOIN claimed c ON c.key = k.key AND c.api_key_id IS NOT DISTINCT FROM k.owner
ORDER BY k.ord
"""

GET_IDEMPOTENCY_OUTCOME = """
SELECT kind, user_id, to_user_id, amount, reference, hold_id, expires_in, outcome, balance
FROM idempotency_keys WHERE key = $1 AND api_key_id IS NOT DISTINCT FROM $2
"""

# The outcomes of claimed keys ($1, of callers $2): $3, each key's.
RECORD_IDEMPOTENCY_OUTCOMES = """
UPDATE idempotency_keys k SET outcome = r.outcome
FROM unnest($1::text[], $2::bigint[], $3::text[]) AS r(key, owner, outcome)
WHERE k.key = r.key AND k.api_key_id IS NOT DISTINCT FROM r.owner
"""

# Counts new keys ($2 of them) against their caller's day (UTC) and answers the day's
# total. One row per caller, day and server backend: a backend runs one transaction at a
# time, so two requests never wait on one counter row (a single row per caller would
# serialise all of its keyed requests on their commits). The sum reads the other backends'
# committed rows.
COUNT_IDEMPOTENCY_KEY = """
WITH bump AS (
    INSERT INTO idempotency_usage (api_key_id, day, backend, used)
    VALUES ($1, (clock_timestamp() AT TIME ZONE 'UTC')::date, pg_backend_pid(), $2)
    ON CONFLICT (day, api_key_id, backend)
        DO UPDATE SET used = idempotency_usage.used + EXCLUDED.used
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

LEDGER_SIZE = """
SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM ledger_entries),
       (SELECT count(*) FROM holds)
"""

# Users whose held is not the sum of their active holds (expired but not yet released
# included: they are released only with held).
VERIFY_HELD = """
SELECT u.id, u.held, coalesce(s.total, 0) AS active
FROM users u
LEFT JOIN (SELECT user_id, sum(amount) AS total FROM holds WHERE status = 'active'
           GROUP BY user_id) s ON s.user_id = u.id
WHERE coalesce(s.total, 0) <> u.held
ORDER BY u.id
"""

# Holds whose events or journal entries do not match their state: created once with their
# amount; active with no other event; captured exactly once, for captured_amount, with the
# rest released, and journaled as one withdrawal of the payer or two transfer legs of one
# transfer (payer -captured, payee +captured), each entry carrying the hold; released or
# expired once, for the whole amount, with no entry.
VERIFY_HOLDS = """
WITH events AS (
    SELECT hold_id,
           count(*) FILTER (WHERE kind = 'created') AS created,
           sum(amount) FILTER (WHERE kind = 'created') AS created_amount,
           count(*) FILTER (WHERE kind = 'captured') AS captures,
           coalesce(sum(amount) FILTER (WHERE kind = 'captured'), 0) AS captured,
           count(*) FILTER (WHERE kind IN ('released', 'expired')) AS releases,
           coalesce(sum(amount) FILTER (WHERE kind IN ('released', 'expired')), 0) AS released
    FROM hold_events GROUP BY hold_id
), entries AS (
    SELECT e.hold_id, count(*) AS n,
           coalesce(sum(e.amount) FILTER (WHERE e.user_id = h.user_id), 0) AS paid,
           coalesce(sum(e.amount) FILTER (WHERE e.user_id = h.to_user_id), 0) AS received,
           bool_and(e.kind = CASE WHEN h.to_user_id IS NULL THEN 'withdrawal' ELSE 'transfer' END
                    AND e.user_id IN (h.user_id, h.to_user_id)) AS kinds,
           count(DISTINCT e.transfer_id) AS transfers
    FROM ledger_entries e JOIN holds h ON h.id = e.hold_id
    WHERE e.hold_id IS NOT NULL
    GROUP BY e.hold_id
)
SELECT * FROM (
    SELECT h.id, CASE
        WHEN coalesce(v.captures, 0) > 1 THEN 'captured more than once'
        WHEN coalesce(v.created, 0) <> 1 OR v.created_amount <> h.amount
            THEN 'its creation is not journaled once with its amount'
        WHEN h.status = 'active' AND (v.captures > 0 OR v.releases > 0)
            THEN 'active, with a capture or a release journaled'
        WHEN h.status = 'captured' AND (v.captures <> 1 OR v.captured <> h.captured_amount
                                         OR v.captured + v.released <> h.amount)
            THEN 'its capture events do not match the hold'
        WHEN h.status IN ('released', 'expired') AND (v.captures > 0 OR v.releases <> 1
                                                      OR v.released <> h.amount)
            THEN 'its release events do not match the hold'
        WHEN h.status <> 'captured' AND coalesce(n.n, 0) > 0
            THEN 'journal entries carry a hold that was not captured'
        WHEN h.status = 'captured' AND NOT coalesce(
            n.kinds AND n.paid = -h.captured_amount AND CASE WHEN h.to_user_id IS NULL
                THEN n.n = 1
                ELSE n.n = 2 AND n.received = h.captured_amount AND n.transfers = 1 END, false)
            THEN 'its capture''s journal entries do not match it'
    END AS problem
    FROM holds h
    LEFT JOIN events v ON v.hold_id = h.id
    LEFT JOIN entries n ON n.hold_id = h.id
) found
WHERE problem IS NOT NULL
ORDER BY id
"""

# At most one verification at a time in the database (each a full scan): a second one tries
# and is told one runs (the cron's run then skips), or waits for it (`tandem ledger verify`).
# Transaction-level, so a transaction pooler cannot leave it held on a server connection.
TRY_LOCK_VERIFICATION = "SELECT pg_try_advisory_xact_lock($1)"
LOCK_VERIFICATION = "SELECT pg_advisory_xact_lock($1)"

# The statement deadline for the rest of this transaction (SET LOCAL takes no parameter):
# the waiting for a verification in progress has none ('0': that one is bounded by its own).
SET_LOCAL_STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', $1, true)"

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


class Delta(NamedTuple):
    """One change of a batch (APPLY_DELTAS), by the caller ``api_key_id``."""

    amount: int
    reference: str | None
    api_key_id: int | None
    key: str | None = None  # its idempotency key, claimed in the batch's transaction


class Payment(NamedTuple):
    """One transfer of a batch into one payee (TRANSFER_BATCH): no idempotency key."""

    from_user_id: int
    amount: int
    reference: str | None
    api_key_id: int | None


class DeltaResult(NamedTuple):
    balance: int
    applied: bool
    entry_id: int | None
    refusal: str | None = None  # "mint_ceiling", or None (the floor or the 64-bit ceiling)


class Request(NamedTuple):
    """What a keyed request asked for: a retry with the same key must ask the same."""

    kind: str  # "update", "transfer", "hold", "capture" or "release"
    user_id: int  # a capture's or a release's: the hold's payer
    to_user_id: int | None
    amount: int  # a capture's: 0 for all of the hold; a release's: 0
    reference: str | None
    hold_id: int | None = None  # a capture's or a release's
    expires_in: int | None = None  # a hold's


class Entry(NamedTuple):
    id: int
    amount: int
    balance: int
    kind: str
    transfer_id: int | None
    reference: str | None
    created_at: datetime
    api_key: str | None  # the name of the API key that made it
    hold_id: int | None  # the hold a capture's entry comes from


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
    return None if row is None else DeltaResult(row[0], row[1], row[2], row[3])


async def apply_deltas(
    db: Executor, user_id: int, deltas: Sequence[Delta]
) -> list[DeltaResult] | None:
    """Each change's outcome, in order; None when the user does not exist."""
    rows = await db.fetch(
        APPLY_DELTAS,
        user_id,
        [delta.amount for delta in deltas],
        [delta.reference for delta in deltas],
        [delta.key for delta in deltas],
        [delta.api_key_id for delta in deltas],
    )
    return [DeltaResult(row[0], row[1], row[2], row[3]) for row in rows] if rows else None


class UserBalance(NamedTuple):
    balance: int
    held: int  # the sum of the user's active holds; available = balance - held


async def get_balance(pool: ConnectionPool, user_id: int) -> UserBalance | None:
    row = await pool.fetchrow(GET_BALANCE, user_id, retry_safe=True)
    return None if row is None else UserBalance(row[0], row[1])


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


async def transfer_batch(
    db: Executor, to_user_id: int, payments: Sequence[Payment]
) -> list[TransferResult]:
    """Each transfer's outcome, in order (TransferResult as ``transfer`` gives it)."""
    rows = await db.fetch(
        TRANSFER_BATCH,
        to_user_id,
        [payment.from_user_id for payment in payments],
        [payment.amount for payment in payments],
        [payment.reference for payment in payments],
        [payment.api_key_id for payment in payments],
    )
    return [TransferResult(*row) for row in rows]


async def get_transfer(db: Executor, transfer_id: int) -> Transfer | None:
    if isinstance(db, ConnectionPool):
        row = await db.fetchrow(GET_TRANSFER, transfer_id, retry_safe=True)
    else:
        row = await db.fetchrow(GET_TRANSFER, transfer_id)
    return None if row is None else Transfer(*row)


class Applied(NamedTuple):
    entry: KeyedEntry | None
    transfer_id: int | None
    hold_id: int | None = None  # the hold made with the key
    changed_hold_id: int | None = None  # the hold captured or released with the key
    change: str | None = None  # what the key did to it: "captured", "released", "expired"

    @property
    def kind(self) -> str | None:
        """What the key applied, if anything: "update", "transfer", "hold" or "change" (a
        capture or a release)."""
        if self.entry is not None:
            return "update"
        if self.transfer_id is not None:
            return "transfer"
        if self.hold_id is not None:
            return "hold"
        return None if self.changed_hold_id is None else "change"


async def applied_with_key(conn: Connection, key: str, api_key_id: int | None) -> Applied:
    return (await applied_with_keys(conn, [key], [api_key_id]))[0]


async def applied_with_keys(
    conn: Connection, keys: Sequence[str], api_key_ids: Sequence[int | None]
) -> list[Applied]:
    """What each key (of its caller) applied, in the keys' order."""
    rows = await conn.fetch(APPLIED_WITH_KEYS, keys, api_key_ids)
    assert len(rows) == len(keys)  # one row per key, always
    return [
        Applied(
            None if row[0] is None else KeyedEntry(row[0], row[1], row[2], row[3], row[4]),
            row[5],
            row[6],
            row[7],
            row[8],
        )
        for row in rows
    ]


class NewUser(NamedTuple):
    id: int | None  # None: refused
    balance: int | None
    refusal: str | None  # "mint_ceiling", or None


async def create_user(session: AsyncSession, balance: int, api_key_id: int | None) -> NewUser:
    """The user and its opening entry, in the caller's transaction (its commit is theirs)."""
    result = await session.execute(
        text(CREATE_USER), {"balance": balance, "api_key_id": api_key_id}
    )
    row = result.one()
    return NewUser(row[0], row[1], row[2])


async def claim_idempotency_key(
    conn: Connection, key: str, api_key_id: int | None, request: Request
) -> bool:
    """True: claimed anew; False: the caller claimed the key before (its row is now locked)."""
    claimed: bool = await conn.fetchval(CLAIM_IDEMPOTENCY_KEY, key, api_key_id, *request)
    return claimed


async def count_idempotency_key(conn: Connection, api_key_id: int | None, keys: int = 1) -> int:
    """Counts ``keys`` new keys for the caller today; returns today's total, these included."""
    total: int = await conn.fetchval(COUNT_IDEMPOTENCY_KEY, api_key_id, keys)
    return total


async def claim_idempotency_keys(
    conn: Connection, user_id: int, deltas: Sequence[Delta]
) -> list[bool]:
    """Claims each change's key (CLAIM_IDEMPOTENCY_KEYS), in order: True when claimed anew."""
    claimed = await conn.fetch(
        CLAIM_IDEMPOTENCY_KEYS,
        user_id,
        [delta.key for delta in deltas],
        [delta.api_key_id for delta in deltas],
        [delta.amount for delta in deltas],
        [delta.reference for delta in deltas],
    )
    assert len(claimed) == len(deltas)
    return [row[0] for row in claimed]


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
    request = Request(row[0], row[1], row[2], row[3], row[4], row[5], row[6])
    return StoredOutcome(request, row[7], row[8])


async def record_idempotency_outcome(
    conn: Connection, key: str, api_key_id: int | None, outcome: str
) -> None:
    await record_idempotency_outcomes(conn, [(key, api_key_id, outcome)])


async def record_idempotency_outcomes(
    conn: Connection, outcomes: Sequence[tuple[str, int | None, str]]
) -> None:
    """Each (key, caller, outcome)."""
    await conn.execute(
        RECORD_IDEMPOTENCY_OUTCOMES,
        [key for key, _, _ in outcomes],
        [owner for _, owner, _ in outcomes],
        [outcome for _, _, outcome in outcomes],
    )


class Verification(NamedTuple):
    users: int
    entries: int
    # Users whose balance is not the sum of their entries: (id, balance, sum, entries).
    balances: list[tuple[int, int, int, int]]
    # Entries whose balance is not the previous one's plus their amount, or dated before it:
    # (entry id, user id, amount, balance, previous balance).
    chain: list[tuple[int, int, int, int, int | None]]
    # How many holds were checked.
    holds_checked: int
    # What is wrong with holds: (user id, "held ... is not the sum ...") for a user whose
    # held is not the sum of its active holds; (hold id, what) for a hold captured twice, or
    # whose events or capture entries do not match it.
    holds: list[tuple[int, str]]

    @property
    def mismatches(self) -> int:
        return len(self.balances) + len(self.chain) + len(self.holds)


async def verify_ledger(
    conn: Connection,
    deadline: float,
    *,
    wait: Callable[[], object] | None = None,
) -> Verification | None:
    """Both invariants over every user, and the holds' (held is the sum of the user's active
    holds; a hold is captured at most once, its events and its capture's entries match it),
    read in one snapshot, so concurrent changes (each a balance and its entry in one
    transaction) never look like a mismatch.

    One verification at a time: when another one runs, None at once, or (``wait`` given,
    called first) after waiting for it. Each statement has ``deadline`` seconds (a full scan:
    past the database's default deadline on a big ledger); past it asyncpg raises
    QueryCanceledError and nothing is reported."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if not await conn.fetchval(TRY_LOCK_VERIFICATION, LEDGER_VERIFICATION):
            if wait is None:
                return None
            wait()
            await conn.execute(SET_LOCAL_STATEMENT_TIMEOUT, "0")
            await conn.fetchval(LOCK_VERIFICATION, LEDGER_VERIFICATION)
        await conn.execute(SET_LOCAL_STATEMENT_TIMEOUT, f"{max(1, round(deadline * 1000))}ms")
        size = await conn.fetchrow(LEDGER_SIZE)
        assert size is not None
        balances = [(r[0], r[1], r[2], r[3]) for r in await conn.fetch(VERIFY_BALANCES)]
        chain = [(r[0], r[1], r[2], r[3], r[4]) for r in await conn.fetch(VERIFY_CHAIN)]
        holds = [
            (r[0], f"user {r[0]}: held {r[1]} is not the sum of its active holds, {r[2]}")
            for r in await conn.fetch(VERIFY_HELD)
        ]
        holds += [(r[0], f"hold {r[0]}: {r[1]}") for r in await conn.fetch(VERIFY_HOLDS)]
    return Verification(size[0], size[1], balances, chain, size[2], holds)


async def prune_idempotency_keys(conn: Connection, older_than: timedelta, batch: int) -> int:
    """Deletes up to ``batch`` keys created before ``older_than`` ago; returns how many."""
    status = await conn.execute(PRUNE_IDEMPOTENCY_KEYS, older_than, batch)
    await conn.execute(PRUNE_IDEMPOTENCY_USAGE)
    await conn.execute(PRUNE_KEY_DEBITS)
    return rows_affected(status)


# --- holds ---------------------------------------------------------------------------------

# A hold and its event in one round trip, by its owner function (wallet/sql/create_hold_v1.sql):
# the reservation is one conditional UPDATE of users.held under the payer's row lock, so
# concurrent holds, withdrawals and transfers never reserve or spend more than the balance;
# the payer's expired holds are released first when they are in the way. $6 (the
# idempotency key) is unique on holds per caller ($7).
CREATE_HOLD = f"SELECT * FROM {CREATE_HOLD_V1.name}($1, $2, $3, $4, $5, $6, $7)"

# The one capture of a hold, with its journal entries and the release of the rest, in one
# round trip (wallet/sql/capture_hold_v1.sql): payer and payee locked in id order, then the
# hold, its state read after the locks: of a capture, a release and the expiry of one hold,
# exactly one changes it.
CAPTURE_HOLD = f"SELECT * FROM {CAPTURE_HOLD_V1.name}($1, $2, $3, $4, $5)"

# A hold's release (wallet/sql/release_hold_v1.sql), under its payer's row lock as above.
RELEASE_HOLD = f"SELECT * FROM {RELEASE_HOLD_V1.name}($1, $2, $3)"

# A hold as a client sees it: an active hold at or past its expires_at is 'expired' (it can
# no longer be captured; its release, by the task or the payer's next spending, only gives
# its amount back).
_HOLD_COLUMNS = """
h.id, h.user_id, h.to_user_id, h.amount, h.captured_amount,
CASE WHEN h.status = 'active' AND h.expires_at <= clock_timestamp() THEN 'expired'
     ELSE h.status END AS status,
h.expires_at, h.created_at, h.reference, h.available_after
"""

GET_HOLD = f"SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.id = $1"

# A user's holds, newest first, keyset on id (as HISTORY): a page is an index range scan, and
# holds made meanwhile never shift a later page. $3: only holds in this state as GET_HOLD
# shows it (NULL: all). One row more than asked tells whether another page follows.
LIST_HOLDS = f"""
SELECT * FROM (SELECT {_HOLD_COLUMNS} FROM holds h WHERE h.user_id = $1 AND h.id < $2) h
WHERE $3::text IS NULL OR h.status = $3::text
ORDER BY h.id DESC LIMIT $4
"""

# The hold a key made (a replay of its creation, after the stored outcome was pruned).
HOLD_WITH_KEY = f"""
SELECT {_HOLD_COLUMNS} FROM holds h
WHERE h.idempotency_key = $1 AND h.api_key_id IS NOT DISTINCT FROM $2
"""

# A capture's transfer (NULL without a payee) and the payer's journal entry.
CAPTURE_ENTRY = """
SELECT e.transfer_id, e.id FROM ledger_entries e JOIN holds h ON h.id = e.hold_id
WHERE e.hold_id = $1 AND e.user_id = h.user_id
"""

# The expiry task's batch (wallet/sql/expire_holds_v1.sql): the payers of the $1 holds due
# first, each locked FOR UPDATE SKIP LOCKED before its holds (a payer busy spending is left to
# its own spending, which releases them too, or to the next round); the holds released.
EXPIRE_HOLDS = f"SELECT {EXPIRE_HOLDS_V1.name}($1)"

# The holds by state, in one snapshot: active ones not yet due, due ones not yet released
# (overdue: the task is behind by the age of the oldest), and the finished ones. One instant
# for every row (clock_timestamp() once). A scan of holds: read every few seconds by the task.
HOLD_STATS = """
WITH now AS (SELECT clock_timestamp() AS t)
SELECT count(*) FILTER (WHERE h.status = 'active' AND h.expires_at > now.t) AS active,
       count(*) FILTER (WHERE h.status = 'captured') AS captured,
       count(*) FILTER (WHERE h.status = 'released') AS released,
       count(*) FILTER (WHERE h.status = 'expired') AS expired,
       count(*) FILTER (WHERE h.status = 'active' AND h.expires_at <= now.t) AS overdue,
       coalesce(extract(epoch FROM now.t - min(h.expires_at) FILTER (
           WHERE h.status = 'active' AND h.expires_at <= now.t)), 0) AS oldest
FROM now LEFT JOIN holds h ON true
GROUP BY now.t
"""


class NewHold(NamedTuple):
    outcome: str  # "ok", "holds_unavailable", "user_not_found", "to_not_found", ...
    hold_id: int | None
    expires_at: datetime | None
    created_at: datetime | None
    available: int | None  # after it (ok), or what there was (insufficient_funds)


class HoldChange(NamedTuple):
    outcome: str  # "ok", "hold_not_found", "hold_not_active", ...
    status: str | None  # the hold's state after (or, refused, as found)
    transfer_id: int | None = None  # a capture's, with a payee
    entry_id: int | None = None  # a capture's: the payer's journal entry


class Hold(NamedTuple):
    id: int
    user_id: int
    to_user_id: int | None
    amount: int
    captured_amount: int | None
    status: str  # an active hold past its expires_at reads 'expired'
    expires_at: datetime
    created_at: datetime
    reference: str | None
    available_after: int  # the payer's available amount just after it was made


class HoldStats(NamedTuple):
    # Holds by state: active (not yet due), captured, released, expired.
    counts: dict[str, int]
    # Active holds at or past their expiry, not yet released.
    overdue: int
    # How long the oldest of them is past its expiry (0 when none).
    oldest_overdue_seconds: float


async def _read_row(db: Executor, statement: str, *args: object) -> asyncpg.Record | None:
    """A read: on the pool it may be retried on another connection; on a connection it is
    the caller's transaction's."""
    if isinstance(db, ConnectionPool):
        return await db.fetchrow(statement, *args, retry_safe=True)
    return await db.fetchrow(statement, *args)


async def create_hold(
    db: Executor,
    user_id: int,
    to_user_id: int | None,
    amount: int,
    expires_in: int,
    reference: str | None,
    idempotency_key: str | None,
    api_key_id: int | None,
) -> NewHold:
    row = await db.fetchrow(
        CREATE_HOLD,
        user_id,
        to_user_id,
        amount,
        expires_in,
        reference,
        idempotency_key,
        api_key_id,
    )
    assert row is not None
    return NewHold(*row)


async def capture_hold(
    db: Executor,
    hold_id: int,
    amount: int | None,
    to_user_id: int | None,
    idempotency_key: str | None,
    api_key_id: int | None,
) -> HoldChange:
    """``amount`` None: all of it."""
    row = await db.fetchrow(CAPTURE_HOLD, hold_id, amount, to_user_id, idempotency_key, api_key_id)
    assert row is not None
    return HoldChange(*row)


async def release_hold(
    db: Executor, hold_id: int, idempotency_key: str | None, api_key_id: int | None
) -> HoldChange:
    row = await db.fetchrow(RELEASE_HOLD, hold_id, idempotency_key, api_key_id)
    assert row is not None
    return HoldChange(row[0], row[1])


async def get_hold(db: Executor, hold_id: int) -> Hold | None:
    row = await _read_row(db, GET_HOLD, hold_id)
    return None if row is None else Hold(*row)


async def list_holds(
    pool: ConnectionPool, user_id: int, status: str | None, before: int, limit: int
) -> list[Hold]:
    rows = await pool.fetch(LIST_HOLDS, user_id, before, status, limit, retry_safe=True)
    return [Hold(*row) for row in rows]


async def hold_with_key(conn: Connection, key: str, api_key_id: int | None) -> Hold | None:
    row = await conn.fetchrow(HOLD_WITH_KEY, key, api_key_id)
    return None if row is None else Hold(*row)


async def capture_entry(db: Executor, hold_id: int) -> tuple[int | None, int] | None:
    """A captured hold's transfer (None without a payee) and the payer's entry."""
    row = await _read_row(db, CAPTURE_ENTRY, hold_id)
    return None if row is None else (row[0], row[1])


async def expire_holds(conn: Connection, limit: int) -> int:
    """Releases the due holds of the payers of the ``limit`` holds due first (all of each
    payer's due holds: the count may pass ``limit``), skipping payers another transaction
    holds; returns how many holds it released. Fewer than ``limit``: nothing more is due, or
    what is left belongs to payers busy right now (their own spending releases it)."""
    released: int = await conn.fetchval(EXPIRE_HOLDS, limit)
    return released


async def hold_stats(pool: ConnectionPool) -> HoldStats:
    row = await pool.fetchrow(HOLD_STATS, retry_safe=True)
    assert row is not None
    counts = {"active": row[0], "captured": row[1], "released": row[2], "expired": row[3]}
    return HoldStats(counts, int(row[4]), float(row[5]))
