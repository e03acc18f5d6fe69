"""The wallet service against a real PostgreSQL: atomicity under concurrency, idempotency."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tandem.core.pool import ConnectionPool
from tandem.wallet import service
from tandem.wallet.errors import (
    IdempotencyKeyReusedError,
    InsufficientFundsError,
    UserNotFoundError,
)


async def make_user(pool: ConnectionPool, balance: int) -> int:
    user_id = await pool.fetchval("INSERT INTO users (balance) VALUES ($1) RETURNING id", balance)
    return int(user_id)


async def test_concurrent_withdrawals_never_overdraw(pool: ConnectionPool) -> None:
    """400 concurrent withdrawals of 7 from 1000: exactly 142 succeed, 6 is left."""
    user = await make_user(pool, 1000)

    async def withdraw() -> bool:
        try:
            await service.update_balance(pool, user, -7)
        except InsufficientFundsError:
            return False
        return True

    outcomes = await asyncio.gather(*(withdraw() for _ in range(400)))
    assert outcomes.count(True) == 142
    assert (await service.get_balance(pool, user)).balance == 1000 - 142 * 7


async def test_concurrent_retries_with_one_key_apply_once(pool: ConnectionPool) -> None:
    """50 concurrent requests with one Idempotency-Key: one applies, 49 replay its outcome."""
    user = await make_user(pool, 1000)
    results = await asyncio.gather(
        *(service.update_balance(pool, user, -10, f"same-key-{user}") for _ in range(50))
    )
    assert {r.balance for r in results} == {990}
    assert sum(not r.replayed for r in results) == 1
    assert (await service.get_balance(pool, user)).balance == 990


async def test_key_reuse_with_other_amount_is_refused(pool: ConnectionPool) -> None:
    """A key bound to one request refuses another and leaves the balance alone."""
    user = await make_user(pool, 100)
    await service.update_balance(pool, user, -1, f"reuse-{user}")
    with pytest.raises(IdempotencyKeyReusedError):
        await service.update_balance(pool, user, -2, f"reuse-{user}")
    assert (await service.get_balance(pool, user)).balance == 99


async def test_unknown_user_with_key_is_replayed(pool: ConnectionPool) -> None:
    """A keyed request for a missing user records that outcome; the retry gets it again even
    after the user has been created meanwhile (re-evaluated, the retry would apply), and the
    new user's balance is untouched."""
    missing = 2**62 + 7
    key = f"missing-{missing}"
    with pytest.raises(UserNotFoundError):
        await service.update_balance(pool, missing, 5, key)
    # The world changes between the request and its retry: the user now exists.
    await pool.fetchval(
        "INSERT INTO users (id, balance) OVERRIDING SYSTEM VALUE VALUES ($1, 100) RETURNING id",
        missing,
    )
    with pytest.raises(UserNotFoundError):
        await service.update_balance(pool, missing, 5, key)
    assert (await service.get_balance(pool, missing)).balance == 100
    stored = await pool.fetchval("SELECT outcome FROM idempotency_keys WHERE key = $1", key)
    assert stored == "user_not_found"
    # Without the key, the same request is evaluated afresh and applies.
    assert (await service.update_balance(pool, missing, 5)).balance == 105


async def test_database_refuses_negative_balance(pool: ConnectionPool) -> None:
    """The CHECK constraint refuses a negative balance even from a statement that skips the
    service's condition."""
    user = await make_user(pool, 1)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.fetchrow("UPDATE users SET balance = balance - 2 WHERE id = $1", user)
    assert (await service.get_balance(pool, user)).balance == 1
