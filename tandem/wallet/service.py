"""Wallet rules: apply a delta or a transfer atomically, never below zero, journaled, at most
once per idempotency key."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.callers import ANONYMOUS, Caller, period_name
from tandem.core.errors import AppError
from tandem.core.ids import INT64_MAX
from tandem.core.pool import ConnectionPool
from tandem.observability.metrics import ACCESS_KEY_LIMITED
from tandem.wallet import repository
from tandem.wallet.errors import (
    BalanceLimitError,
    DebitLimitError,
    IdempotencyKeyReusedError,
    InsufficientFundsError,
    MintCeilingError,
    TooManyIdempotencyKeysError,
    TransferNotFoundError,
    UserNotFoundError,
    refusal_outcome,
    replay_refusal,
)

log = logging.getLogger(__name__)

DEFAULT_KEYS_PER_DAY = 1_000_000


@dataclass(frozen=True, slots=True)
class BalanceResult:
    user_id: int
    balance: int
    entry_id: int | None = None
    replayed: bool = False
    # The instant asked about, for a balance read at one.
    at: datetime | None = None
    # The sum of the user's active holds, for a balance read now (available: balance - held).
    held: int | None = None


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer: repository.Transfer
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class History:
    user_id: int
    entries: list[repository.Entry]
    next_before: int | None


def _refusal(user_id: int, amount: int, result: repository.DeltaResult | None) -> AppError | None:
    if result is None:
        return UserNotFoundError(user_id)
    if result.applied:
        return None
    if result.refusal == "mint_ceiling":
        return MintCeilingError()
    # A withdrawal can only fail the floor, a deposit only the 64-bit ceiling.
    return InsufficientFundsError(user_id) if amount < 0 else BalanceLimitError(user_id)


async def update_balance(
    pool: ConnectionPool,
    user_id: int,
    amount: int,
    idempotency_key: str | None = None,
    reference: str | None = None,
    caller: Caller = ANONYMOUS,
    keys_per_day: int = DEFAULT_KEYS_PER_DAY,
) -> BalanceResult:
    """Add ``amount`` to the balance and journal it, in one atomic statement; the balance never
    goes below 0.

    With an idempotency key, the first outcome (success or refusal) is stored in the same
    transaction as the change and every retry gets it back without applying again; an applied
    change keeps its key in the journal for good, so even after the stored outcomes are pruned
    a retry replays it.

    Raises UserNotFoundError, InsufficientFundsError, BalanceLimitError and, for a key reused
    with a different request, IdempotencyKeyReusedError. A refusal changes nothing. When the
    database fails: DatabaseUnavailableError (nothing changed) or OutcomeUnknownError (the
    change may have been applied). The caller signs the entry, and its idempotency keys are
    its own (another caller's equal key is another key); past ``keys_per_day`` new keys in a
    UTC day, TooManyIdempotencyKeysError. A caller bound to other users is told
    UserNotFoundError, before anything changes or its key is claimed. A withdrawal by a key
    with debit limits is counted in its transaction (count_debit): past one, DebitLimitError
    and nothing changed.
    """
    if not caller.may_touch(user_id):
        raise UserNotFoundError(user_id)
    if idempotency_key is None and not (amount < 0 and caller.debit_limits):
        result = await repository.apply_delta(
            pool, user_id, amount, reference, None, caller.api_key_id
        )
        refusal = _refusal(user_id, amount, result)
        if refusal is not None:
            raise refusal
        assert result is not None
        return BalanceResult(user_id, result.balance, result.entry_id)
    request = repository.Request("update", user_id, None, amount, reference)
    if idempotency_key is None:
        # A withdrawal by a key with debit limits: counted in the change's transaction.
        async with pool.transaction() as conn:
            applied = await _apply_update(conn, _Keyed(None, caller, keys_per_day), request)
            if isinstance(applied, AppError):
                raise applied
            await count_debit(conn, caller, -amount)
        return applied
    keyed = _Keyed(idempotency_key, caller, keys_per_day)
    return await _once(pool, keyed, request, _apply_update, _replay_update)


async def transfer(
    pool: ConnectionPool,
    from_user_id: int,
    to_user_id: int,
    amount: int,
    idempotency_key: str | None = None,
    reference: str | None = None,
    caller: Caller = ANONYMOUS,
    keys_per_day: int = DEFAULT_KEYS_PER_DAY,
) -> TransferResult:
    """Move ``amount`` (> 0) from one user to another, atomically and journaled (two entries
    sharing the transfer id). Raises UserNotFoundError (saying which), InsufficientFundsError,
    BalanceLimitError, IdempotencyKeyReusedError, DebitLimitError (the caller's key past a
    debit limit: the amount is counted against it); a refusal changes nothing. A caller bound
    to users pays only from them (to anyone): another payer is UserNotFoundError, as for a
    payer that does not exist, before anything changes or its key is claimed; what it is told
    of the transfer made (or replayed) is what it would read of it (``seen_by``)."""
    if not caller.may_touch(from_user_id):
        raise UserNotFoundError(from_user_id, field="fromUserId")
    request = repository.Request("transfer", from_user_id, to_user_id, amount, reference)
    made = await _transfer(pool, request, idempotency_key, caller, keys_per_day)
    shown = seen_by(caller, made.transfer)
    assert shown is not None, "a caller pays only from a user it may touch"
    return TransferResult(shown, made.replayed)


async def _transfer(
    pool: ConnectionPool,
    request: repository.Request,
    idempotency_key: str | None,
    caller: Caller,
    keys_per_day: int,
) -> TransferResult:
    """The transfer as made or replayed, all of it (``transfer`` says what the caller sees)."""
    if idempotency_key is None and not caller.debit_limits:
        assert request.to_user_id is not None
        result = await repository.transfer(
            pool,
            request.user_id,
            request.to_user_id,
            request.amount,
            request.reference,
            None,
            caller.api_key_id,
        )
        return TransferResult(_transferred(request, result))
    if idempotency_key is None:
        # By a key with debit limits: the paying side counted in the transfer's transaction.
        async with pool.transaction() as conn:
            applied = await _apply_transfer(conn, _Keyed(None, caller, keys_per_day), request)
            if isinstance(applied, AppError):
                raise applied
            await count_debit(conn, caller, request.amount)
        return applied
    keyed = _Keyed(idempotency_key, caller, keys_per_day)
    return await _once(pool, keyed, request, _apply_transfer, _replay_transfer)


# --- at most once per key ------------------------------------------------------------------

Outcome = TypeVar("Outcome", BalanceResult, TransferResult)
Connection = repository.Connection


@dataclass(frozen=True, slots=True)
class _Keyed:
    """An idempotency key (None: a request without one), with the caller it belongs to and
    that caller's daily cap."""

    key: str | None
    caller: Caller
    per_day: int

    @property
    def api_key_id(self) -> int | None:
        return self.caller.api_key_id


# --- debit limits --------------------------------------------------------------------------

_DEBIT_LIMITED = ACCESS_KEY_LIMITED.labels("debit")


async def count_debit(conn: Connection, caller: Caller, amount: int) -> None:
    """Counts ``amount`` (> 0) leaving a user by ``caller``'s key (in its maker's windows for a
    key minted through POST /keys: Caller.limited_as), in ``conn``'s transaction,
    the one that moves it: a committed debit is always counted, a rolled-back one never.
    Every debit calls this (a withdrawal, a transfer's paying side). Raises DebitLimitError
    past one of the key's windows; the caller's transaction must then roll back (it does:
    the error leaves it), so nothing moves and nothing is counted. A key without debit limits
    costs no statement. Debits committing at once on n backends may pass a limit by at most
    one debit each (the sum reads committed rows: repository.COUNT_KEY_DEBIT)."""
    if not caller.debit_limits:
        return
    limited_as = caller.limited_as  # a minted key's debits count in its maker's windows
    assert limited_as is not None
    assert amount > 0
    totals = await repository.count_key_debit(
        conn, limited_as, amount, [limit.seconds for limit in caller.debit_limits]
    )
    limits = {limit.seconds: limit.amount for limit in caller.debit_limits}
    for window in totals:
        if window.total > limits[window.seconds]:
            _DEBIT_LIMITED.inc()
            period = period_name(window.seconds)
            log.warning(
                "the API key %r was stopped by its debit limit of %d per %s (refused 429)",
                caller.name,
                limits[window.seconds],
                period,
            )
            raise DebitLimitError(caller.name, limits[window.seconds], period, window.left)


def _debit(request: repository.Request) -> int:
    """The money a request takes out of a user (0 for a deposit)."""
    return request.amount if request.kind == "transfer" else max(0, -request.amount)


async def _once(
    pool: ConnectionPool,
    keyed: _Keyed,
    request: repository.Request,
    apply: Callable[[Connection, _Keyed, repository.Request], Awaitable[Outcome | AppError]],
    replay: Callable[
        [Connection, _Keyed, repository.Request, int | None], Awaitable[Outcome | None]
    ],
) -> Outcome:
    # A broken connection before COMMIT applied nothing (database_unavailable); during COMMIT
    # the outcome is unknown, and a retry with this key finds the stored outcome or, if the
    # transaction did not commit, claims the key and applies once.
    key, owner = keyed.key, keyed.api_key_id
    assert key is not None
    async with pool.transaction() as conn:
        if not await repository.claim_idempotency_key(conn, key, owner, request):
            stored = await repository.get_idempotency_outcome(conn, key, owner)
            if stored.request != request:
                raise IdempotencyKeyReusedError()
            if stored.outcome != "ok":
                raise replay_refusal(stored.outcome, request)
            replayed = await replay(conn, keyed, request, stored.legacy_balance)
            assert replayed is not None, "an applied key is in the journal"
            return replayed
        # Claimed anew: the key's stored outcome may have been pruned after it applied.
        replayed = await replay(conn, keyed, request, None)
        if replayed is not None:
            await repository.record_idempotency_outcome(conn, key, owner, "ok")
            return replayed
        # A new key: counted against the caller's day; past the cap the transaction rolls
        # back (nothing stored, nothing applied). Retries of stored keys are never refused.
        if await repository.count_idempotency_key(conn, owner) > keyed.per_day:
            raise TooManyIdempotencyKeysError(keyed.per_day)
        result = await apply(conn, keyed, request)
        if not isinstance(result, AppError) and _debit(request):
            # Past a debit limit the transaction rolls back: nothing stored, nothing applied,
            # and a retry with this key is judged anew. A replay (above) is never counted.
            await count_debit(conn, keyed.caller, _debit(request))
        outcome = refusal_outcome(result) if isinstance(result, AppError) else "ok"
        await repository.record_idempotency_outcome(conn, key, owner, outcome)
    # The refusal is raised after the commit: it is the outcome a retry must see again.
    if isinstance(result, AppError):
        raise result
    return result


async def _apply_update(
    conn: Connection, keyed: _Keyed, request: repository.Request
) -> BalanceResult | AppError:
    """The change made, or the refusal (returned: it is recorded before it is raised)."""
    result = await repository.apply_delta(
        conn, request.user_id, request.amount, request.reference, keyed.key, keyed.api_key_id
    )
    refusal = _refusal(request.user_id, request.amount, result)
    if refusal is not None:
        return refusal
    assert result is not None
    return BalanceResult(request.user_id, result.balance, result.entry_id)


async def _replay_update(
    conn: Connection, keyed: _Keyed, request: repository.Request, legacy_balance: int | None
) -> BalanceResult | None:
    assert keyed.key is not None
    applied = await repository.applied_with_key(conn, keyed.key, keyed.api_key_id)
    if applied.kind not in (None, "update"):
        raise IdempotencyKeyReusedError()  # another kind's key, its outcome pruned
    entry = applied.entry
    if entry is None:
        if legacy_balance is not None:
            # Applied before the journal kept keys (migration 0008): the answer it stored.
            return BalanceResult(request.user_id, legacy_balance, replayed=True)
        return None
    if (entry.user_id, entry.amount, entry.reference) != (
        request.user_id,
        request.amount,
        request.reference,
    ):
        raise IdempotencyKeyReusedError()
    return BalanceResult(request.user_id, entry.balance, entry.id, replayed=True)


async def _apply_transfer(
    conn: Connection, keyed: _Keyed, request: repository.Request
) -> TransferResult | AppError:
    assert request.to_user_id is not None
    result = await repository.transfer(
        conn,
        request.user_id,
        request.to_user_id,
        request.amount,
        request.reference,
        keyed.key,
        keyed.api_key_id,
    )
    try:
        return TransferResult(_transferred(request, result))
    except AppError as refusal:
        return refusal


async def _replay_transfer(
    conn: Connection, keyed: _Keyed, request: repository.Request, _legacy_balance: int | None
) -> TransferResult | None:
    assert keyed.key is not None
    applied = await repository.applied_with_key(conn, keyed.key, keyed.api_key_id)
    if applied.kind not in (None, "transfer"):
        raise IdempotencyKeyReusedError()  # another kind's key, its outcome pruned
    if applied.transfer_id is None:
        return None
    found = await repository.get_transfer(conn, applied.transfer_id)
    assert found is not None
    if (found.from_user_id, found.to_user_id, found.amount, found.reference) != (
        request.user_id,
        request.to_user_id,
        request.amount,
        request.reference,
    ):
        raise IdempotencyKeyReusedError()
    return TransferResult(found, replayed=True)


def _transferred(
    request: repository.Request, result: repository.TransferResult
) -> repository.Transfer:
    """The transfer made, or the refusal raised."""
    assert request.to_user_id is not None
    if result.outcome == "from_not_found":
        raise UserNotFoundError(request.user_id, field="fromUserId")
    if result.outcome == "to_not_found":
        raise UserNotFoundError(request.to_user_id, field="toUserId")
    if result.outcome == "insufficient_funds":
        raise InsufficientFundsError(request.user_id)
    if result.outcome == "balance_limit_exceeded":
        raise BalanceLimitError(request.to_user_id)
    assert result.outcome == "ok", result
    assert result.transfer_id is not None
    assert result.from_balance is not None
    assert result.to_balance is not None
    assert result.created_at is not None
    return repository.Transfer(
        result.transfer_id,
        request.user_id,
        request.to_user_id,
        request.amount,
        request.reference,
        result.created_at,
        result.from_balance,
        result.to_balance,
    )


# --- reads ---------------------------------------------------------------------------------


async def get_balance(
    pool: ConnectionPool, user_id: int, at: datetime | None = None
) -> BalanceResult:
    """The balance now (with what its holds keep: held), or after the last entry at or before
    ``at``. Raises UserNotFoundError (also for an instant before the user's opening entry:
    the user did not exist then)."""
    if at is None:
        now = await repository.get_balance(pool, user_id)
        if now is None:
            raise UserNotFoundError(user_id)
        return BalanceResult(user_id, now.balance, held=now.held)
    balance = await repository.balance_at(pool, user_id, at)
    if balance is None:
        raise UserNotFoundError(user_id, at=at)
    return BalanceResult(user_id, balance, at=at)


async def history(
    pool: ConnectionPool,
    user_id: int,
    limit: int,
    before: int | None,
    caller: Caller = ANONYMOUS,
) -> History:
    """Newest first, ``limit`` entries older than entry ``before``. Raises UserNotFoundError.

    The user's own statement (amounts, balances, references) whoever reads it; the name of
    the key that made an entry only to an unbound caller, or to a bound one for the entries it
    made itself: an end user's token learns nothing of the service's other keys."""
    rows = await repository.history(
        pool, user_id, INT64_MAX if before is None else before, limit + 1
    )
    if not rows and not await repository.user_exists(pool, user_id):
        raise UserNotFoundError(user_id)
    page = rows[:limit]
    if caller.bound:
        page = [e if e.api_key == caller.name else e._replace(api_key=None) for e in page]
    return History(user_id, page, page[-1].id if len(rows) > limit else None)


async def get_transfer(
    pool: ConnectionPool, transfer_id: int, caller: Caller = ANONYMOUS
) -> repository.Transfer:
    """Raises TransferNotFoundError, also to a caller bound to neither side (as for a transfer
    that does not exist); a caller bound to one side gets the other side's balance as None."""
    found = await repository.get_transfer(pool, transfer_id)
    shown = None if found is None else seen_by(caller, found)
    if shown is None:
        raise TransferNotFoundError(transfer_id)
    return shown


def seen_by(caller: Caller, found: repository.Transfer) -> repository.Transfer | None:
    """The one decision of what a caller sees of a transfer, made, replayed or read: all of
    it unbound; bound to one side, the other side's balance-after as None (a bound key paying
    1 unit must not learn its payee's balance); bound to neither side, nothing (None)."""
    if not caller.bound:
        return found
    payer, payee = caller.may_touch(found.from_user_id), caller.may_touch(found.to_user_id)
    if not payer and not payee:
        return None
    return found._replace(
        from_balance=found.from_balance if payer else None,
        to_balance=found.to_balance if payee else None,
    )


async def create_user(
    session: AsyncSession, balance: int, caller: Caller = ANONYMOUS
) -> BalanceResult:
    """The user and its opening entry. Raises MintCeilingError for an opening balance past
    the day's mint ceiling (nothing is created)."""
    user = await repository.create_user(session, balance, caller.api_key_id)
    if user.id is None or user.balance is None:
        assert user.refusal == "mint_ceiling", user
        raise MintCeilingError()
    return BalanceResult(user.id, user.balance)
