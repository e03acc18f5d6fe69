"""Wallet rules: apply a delta atomically, never below zero, at most once per idempotency key."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.errors import AppError
from tandem.core.hotpool import HotPool
from tandem.wallet import repository
from tandem.wallet.errors import (
    REPLAYABLE,
    BalanceLimitError,
    IdempotencyKeyReusedError,
    InsufficientFundsError,
    UserNotFoundError,
)


@dataclass(frozen=True, slots=True)
class BalanceResult:
    user_id: int
    balance: int
    replayed: bool = False


def _refusal(user_id: int, amount: int, result: repository.DeltaResult | None) -> AppError | None:
    if result is None:
        return UserNotFoundError(user_id)
    if result.applied:
        return None
    # A withdrawal can only fail the floor, a deposit only the 64-bit ceiling.
    return InsufficientFundsError(user_id) if amount < 0 else BalanceLimitError(user_id)


async def update_balance(
    pool: HotPool, user_id: int, amount: int, idempotency_key: str | None = None
) -> BalanceResult:
    """Add ``amount`` to the balance in one atomic statement; the balance never goes below 0.

    With an idempotency key, the first outcome (success or refusal) is stored in the same
    transaction as the change and every retry gets it back without applying again.

    Raises UserNotFoundError, InsufficientFundsError, BalanceLimitError and, for a key reused
    with a different request, IdempotencyKeyReusedError. A refusal changes nothing. When the
    database fails: DatabaseUnavailableError (nothing changed) or OutcomeUnknownError (the
    change may have been applied).
    """
    if idempotency_key is None:
        result = await repository.apply_delta(pool, user_id, amount)
        refusal = _refusal(user_id, amount, result)
        if refusal is not None:
            raise refusal
        assert result is not None
        return BalanceResult(user_id, result.balance)
    return await _update_balance_once(pool, user_id, amount, idempotency_key)


async def _update_balance_once(pool: HotPool, user_id: int, amount: int, key: str) -> BalanceResult:
    # A broken connection before COMMIT applied nothing (database_unavailable); during COMMIT
    # the outcome is unknown, and a retry with this key finds the stored outcome or, if the
    # transaction did not commit, claims the key and applies once.
    async with pool.transaction() as conn:
        if not await repository.claim_idempotency_key(conn, key, user_id, amount):
            stored = await repository.get_idempotency_outcome(conn, key)
            return _replay(stored, user_id, amount)
        result = await repository.apply_delta(conn, user_id, amount)
        refusal = _refusal(user_id, amount, result)
        balance = None if result is None or refusal is not None else result.balance
        outcome = "ok" if refusal is None else refusal.code
        await repository.record_idempotency_outcome(conn, key, outcome, balance)
    # The refusal is raised after the commit: it is the outcome a retry must see again.
    if refusal is not None:
        raise refusal
    assert balance is not None
    return BalanceResult(user_id, balance)


def _replay(stored: repository.StoredOutcome, user_id: int, amount: int) -> BalanceResult:
    if (stored.user_id, stored.amount) != (user_id, amount):
        raise IdempotencyKeyReusedError()
    if stored.outcome == "ok":
        assert stored.balance is not None
        return BalanceResult(user_id, stored.balance, replayed=True)
    raise REPLAYABLE[stored.outcome](user_id)


async def get_balance(pool: HotPool, user_id: int) -> BalanceResult:
    """Raises UserNotFoundError."""
    balance = await repository.get_balance(pool, user_id)
    if balance is None:
        raise UserNotFoundError(user_id)
    return BalanceResult(user_id, balance)


async def create_user(session: AsyncSession, balance: int) -> BalanceResult:
    user = await repository.create_user(session, balance)
    return BalanceResult(user.id, user.balance)
