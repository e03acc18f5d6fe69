"""Wallet rules: apply a delta or a transfer atomically, never below zero, journaled, at most
once per idempotency key; holds reserve part of a balance until captured (once), released or
expired."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.callers import ANONYMOUS, Caller, period_name
from tandem.core.database import Database
from tandem.core.errors import AppError
from tandem.core.ids import INT64_MAX
from tandem.core.pool import ConnectionPool
from tandem.observability.metrics import ACCESS_KEY_LIMITED
from tandem.wallet import repository
from tandem.wallet.batching import GroupCommit, RowQueues, TransferBatches
from tandem.wallet.errors import (
    AmountExceedsHoldError,
    BalanceLimitError,
    DebitLimitError,
    HoldNotActiveError,
    HoldNotFoundError,
    HoldsUnavailableError,
    IdempotencyKeyReusedError,
    InsufficientFundsError,
    MintCeilingError,
    PayeeAlreadySetError,
    PayeeIsPayerError,
    TooManyIdempotencyKeysError,
    TransferNotFoundError,
    UserNotFoundError,
    refusal_outcome,
    replay_refusal,
)
from tandem.wallet.models import HOLD_EXPIRES_IN_DEFAULT

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
class HoldResult:
    """A hold as made, captured, released or read (``replayed``: a keyed retry's answer)."""

    hold: repository.Hold
    replayed: bool = False
    # A creation's: the payer's available amount just after it.
    available: int | None = None
    # A capture's: its transfer to the payee (None: withdrawn) and the payer's entry.
    transfer_id: int | None = None
    entry_id: int | None = None


@dataclass(frozen=True, slots=True)
class HoldPage:
    user_id: int
    holds: list[repository.Hold]
    next_before: int | None


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
    batches: WalletBatches | None = None,
) -> BalanceResult:
    """Add ``amount`` to the balance and journal it, in one atomic statement; the balance never
    goes below 0.

    With ``batches``, a change by a caller without debit limits (on withdrawals) joins its
    user's group commit (batching.py; with a key, KeyedChanges): the same outcome, one
    statement (or one transaction) for a user's concurrent changes.

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
        if batches is not None:
            delta = repository.Delta(amount, reference, caller.api_key_id)
            result = await batches.changes.apply(user_id, delta)
        else:
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
    if batches is not None and not (amount < 0 and caller.debit_limits):
        answer = await batches.keyed.apply(user_id, KeyedDelta(amount, reference, keyed))
        if isinstance(answer, Exception):
            raise answer
        return answer
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
    batches: TransferBatches | None = None,
) -> TransferResult:
    """Move ``amount`` (> 0) from one user to another, atomically and journaled (two entries
    sharing the transfer id). With ``batches``, a transfer without a key by a caller without
    debit limits joins its payee's group commit (batching.py): the same outcome. Raises
    UserNotFoundError (saying which), InsufficientFundsError,
    BalanceLimitError, IdempotencyKeyReusedError, DebitLimitError (the caller's key past a
    debit limit: the amount is counted against it); a refusal changes nothing. A caller bound
    to users pays only from them (to anyone): another payer is UserNotFoundError, as for a
    payer that does not exist, before anything changes or its key is claimed; what it is told
    of the transfer made (or replayed) is what it would read of it (``seen_by``)."""
    if not caller.may_touch(from_user_id):
        raise UserNotFoundError(from_user_id, field="fromUserId")
    request = repository.Request("transfer", from_user_id, to_user_id, amount, reference)
    made = await _transfer(pool, request, idempotency_key, caller, keys_per_day, batches)
    shown = seen_by(caller, made.transfer)
    assert shown is not None, "a caller pays only from a user it may touch"
    return TransferResult(shown, made.replayed)


async def _transfer(
    pool: ConnectionPool,
    request: repository.Request,
    idempotency_key: str | None,
    caller: Caller,
    keys_per_day: int,
    batches: TransferBatches | None = None,
) -> TransferResult:
    """The transfer as made or replayed, all of it (``transfer`` says what the caller sees)."""
    if idempotency_key is None and not caller.debit_limits:
        assert request.to_user_id is not None
        if batches is not None:
            payment = repository.Payment(
                request.user_id, request.amount, request.reference, caller.api_key_id
            )
            result = await batches.apply(request.to_user_id, payment)
        else:
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

Outcome = TypeVar("Outcome", BalanceResult, TransferResult, HoldResult)
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
    """The money a request takes out of a user (0 for a deposit). A hold counts when it is
    made (it takes the amount out of what the user may spend); its capture does not count
    again, and its release gives nothing back to the window."""
    if request.kind in ("transfer", "hold"):
        return request.amount
    return max(0, -request.amount) if request.kind == "update" else 0


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
            return await _stored(conn, keyed, request, replay)
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


async def _stored(
    conn: Connection,
    keyed: _Keyed,
    request: repository.Request,
    replay: Callable[
        [Connection, _Keyed, repository.Request, int | None], Awaitable[Outcome | None]
    ],
) -> Outcome:
    """The answer of a key claimed before (its row locked by the claim): the stored outcome
    replayed. Raises IdempotencyKeyReusedError for another request with the key, or the
    stored refusal."""
    assert keyed.key is not None
    stored = await repository.get_idempotency_outcome(conn, keyed.key, keyed.api_key_id)
    if stored.request != request:
        raise IdempotencyKeyReusedError()
    if stored.outcome != "ok":
        raise replay_refusal(stored.outcome, request)
    replayed = await replay(conn, keyed, request, stored.legacy_balance)
    assert replayed is not None, "an applied key is in the journal"
    return replayed


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
    return _replayed_update(applied, request, legacy_balance)


def _replayed_update(
    applied: repository.Applied, request: repository.Request, legacy_balance: int | None
) -> BalanceResult | None:
    """The replay of what a key applied (None: nothing); IdempotencyKeyReusedError when it
    applied something else."""
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


# --- group commit of keyed changes ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyedDelta:
    """A balance change with an idempotency key, waiting in its user's KeyedChanges queue."""

    amount: int
    reference: str | None
    keyed: _Keyed

    @property
    def key(self) -> str:
        assert self.keyed.key is not None, "a keyed change has its key"
        return self.keyed.key

    def delta(self) -> repository.Delta:
        return repository.Delta(self.amount, self.reference, self.keyed.api_key_id, self.key)


class KeyedChanges(RowQueues[KeyedDelta, "BalanceResult | Exception"]):
    """One user's keyed changes: ``_once`` each, with the user's concurrent ones folded into
    one transaction (``_updates_once``). An item's answer is its result or its error (a
    refusal, or a failure of its own when the batch went item by item), raised to its
    request. Two items with one key (of one caller) never share a batch: the second waits for
    the next, and replays the first's outcome or is told 422."""

    kind = "keyed_change"

    def _identity(self, item: KeyedDelta) -> Hashable:
        return (item.keyed.api_key_id, item.keyed.key)

    async def _one(self, row: int, item: KeyedDelta) -> BalanceResult | Exception:
        request = repository.Request("update", row, None, item.amount, item.reference)
        return await _once(self._database.pool, item.keyed, request, _apply_update, _replay_update)

    async def _batch(
        self, row: int, items: Sequence[KeyedDelta]
    ) -> list[BalanceResult | Exception]:
        try:
            return list(await _updates_once(self._database.pool, row, items))
        except _OneByOne:
            # Rolled back: nothing of the batch applied or claimed. Each alone, in order, each
            # answered what it met (an item applied is never answered another's failure).
            answers: list[BalanceResult | Exception] = []
            for item in items:
                try:
                    answers.append(await self._one(row, item))
                except Exception as error:
                    answers.append(error)
            return answers


class _OneByOne(AppError):
    """A keyed batch needs the single path's rollback for one of its items: the whole batch
    rolls back and each item goes alone. An AppError for the pool: a domain outcome, so the
    transaction is rolled back and its connection kept (any other exception would cost the
    connection). Never answered: KeyedChanges._batch catches it."""


async def _updates_once(
    pool: ConnectionPool, user_id: int, items: Sequence[KeyedDelta]
) -> list[BalanceResult | AppError]:
    """``_once`` for keyed changes of one user (no key twice), in one transaction: the keys
    claimed (in one order: repository.CLAIM_IDEMPOTENCY_KEYS), the claimed-before replayed,
    the new ones counted against their callers' days and applied together (APPLY_DELTAS:
    each decided on the balance the ones before it left, each its own entry with its key),
    their outcomes recorded; one commit. Raises _OneByOne (rolled back) when an item needs
    the single path's rollback: a caller past its daily cap, or a pruned key that applied
    something else (either is decided per item, in order, alone)."""
    answers: list[BalanceResult | AppError | None] = [None] * len(items)
    requests = [
        repository.Request("update", user_id, None, item.amount, item.reference) for item in items
    ]
    deltas = [item.delta() for item in items]
    async with pool.transaction() as conn:
        fresh = await repository.claim_idempotency_keys(conn, user_id, deltas)
        new: list[int] = []
        for n, item in enumerate(items):
            if fresh[n]:
                new.append(n)
                continue
            try:
                answers[n] = await _stored(conn, item.keyed, requests[n], _replay_update)
            except AppError as stored_refusal:
                answers[n] = stored_refusal
        # Claimed anew: a key whose outcome was pruned after it applied replays the journal.
        applied = await repository.applied_with_keys(
            conn, [items[n].key for n in new], [deltas[n].api_key_id for n in new]
        )
        outcomes: list[tuple[str, int | None, str]] = []
        to_apply: list[int] = []
        for n, found in zip(new, applied, strict=True):
            try:
                replayed = _replayed_update(found, requests[n], None)
            except IdempotencyKeyReusedError:
                raise _OneByOne("a pruned key reused for another request") from None
            if replayed is None:
                to_apply.append(n)
            else:
                answers[n] = replayed
                outcomes.append((items[n].key, deltas[n].api_key_id, "ok"))
        # New keys counted against each caller's day; past the cap, each alone decides.
        callers: dict[int | None, list[int]] = {}
        for n in to_apply:
            callers.setdefault(deltas[n].api_key_id, []).append(n)
        for owner, ours in callers.items():
            if await repository.count_idempotency_key(conn, owner, len(ours)) > min(
                items[n].keyed.per_day for n in ours
            ):
                raise _OneByOne("past a caller's daily cap of new keys")
        if to_apply:
            results = await repository.apply_deltas(conn, user_id, [deltas[n] for n in to_apply])
            for at, n in enumerate(to_apply):
                result = None if results is None else results[at]
                refusal = _refusal(user_id, items[n].amount, result)
                if refusal is None:
                    assert result is not None
                    answers[n] = BalanceResult(user_id, result.balance, result.entry_id)
                else:
                    answers[n] = refusal
                outcome = "ok" if refusal is None else refusal_outcome(refusal)
                outcomes.append((items[n].key, deltas[n].api_key_id, outcome))
        if outcomes:
            await repository.record_idempotency_outcomes(conn, outcomes)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


@dataclass(frozen=True)
class WalletBatches:
    """The process's group commit queues (batching.py)."""

    changes: GroupCommit
    keyed: KeyedChanges
    transfers: TransferBatches

    @classmethod
    def of(cls, database: Database, batch_max: int, batch_wait: float) -> WalletBatches:
        return cls(
            GroupCommit(database, batch_max, batch_wait),
            KeyedChanges(database, batch_max, batch_wait),
            TransferBatches(database, batch_max, batch_wait),
        )


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


# --- holds ---------------------------------------------------------------------------------


async def create_hold(
    pool: ConnectionPool,
    user_id: int,
    amount: int,
    to_user_id: int | None = None,
    expires_in: int = HOLD_EXPIRES_IN_DEFAULT,
    reference: str | None = None,
    idempotency_key: str | None = None,
    caller: Caller = ANONYMOUS,
    keys_per_day: int = DEFAULT_KEYS_PER_DAY,
) -> HoldResult:
    """Reserve ``amount`` (> 0) of the user's available amount (balance - held) for
    ``expires_in`` seconds of the database's clock, for the payee ``to_user_id`` if given.
    Concurrent holds, withdrawals and transfers of one user never reserve or spend more than
    its balance (one conditional statement under its row lock); the user's expired holds are
    released first when they are in the way.

    Raises UserNotFoundError (also to a key bound to other users, before anything changes or
    its key is claimed; the payee's says toUserId), InsufficientFundsError,
    PayeeIsPayerError, IdempotencyKeyReusedError, DebitLimitError (a hold counts against the
    key's debit limit when made), HoldsUnavailableError (holds not enabled yet; never stored
    as a key's outcome). A refusal changes nothing."""
    if not caller.may_touch(user_id):
        raise UserNotFoundError(user_id)
    request = repository.Request("hold", user_id, to_user_id, amount, reference, None, expires_in)
    if idempotency_key is None and not caller.debit_limits:
        made = await _apply_hold(pool, _Keyed(None, caller, keys_per_day), request)
        if isinstance(made, AppError):
            raise made
        return made
    if idempotency_key is None:
        # By a key with debit limits: counted in the hold's transaction.
        async with pool.transaction() as conn:
            made = await _apply_hold(conn, _Keyed(None, caller, keys_per_day), request)
            if isinstance(made, AppError):
                raise made
            await count_debit(conn, caller, amount)
        return made
    keyed = _Keyed(idempotency_key, caller, keys_per_day)
    return await _once(pool, keyed, request, _apply_hold, _replay_hold)


async def capture_hold(
    pool: ConnectionPool,
    hold_id: int,
    amount: int | None = None,
    to_user_id: int | None = None,
    idempotency_key: str | None = None,
    caller: Caller = ANONYMOUS,
    keys_per_day: int = DEFAULT_KEYS_PER_DAY,
) -> HoldResult:
    """The hold's one capture: ``amount`` (None: all) leaves the payer, to the payee (the
    hold's, or ``to_user_id`` for a hold made without one) as a transfer, or withdrawn when
    there is none; the rest is released in the same step. Only before the hold's expires_at
    (the database's clock). Not counted against a debit limit (its hold was).

    Raises HoldNotFoundError (also to a key not bound to the payer), HoldNotActiveError
    (captured, released or expired: ``status``), PayeeAlreadySetError, PayeeIsPayerError,
    AmountExceedsHoldError, UserNotFoundError (the payee), BalanceLimitError (the payee's),
    IdempotencyKeyReusedError. A refusal changes nothing but this: a hold found past its
    expiry is marked expired (released)."""
    found = await _payers_hold(pool, hold_id, caller)
    request = repository.Request(
        "capture", found.user_id, to_user_id, 0 if amount is None else amount, None, hold_id
    )
    keyed = _Keyed(idempotency_key, caller, keys_per_day)
    if idempotency_key is None:
        return await _change_unkeyed(pool, _apply_capture, keyed, request)
    return await _once(pool, keyed, request, _apply_capture, _replay_change)


async def release_hold(
    pool: ConnectionPool,
    hold_id: int,
    idempotency_key: str | None = None,
    caller: Caller = ANONYMOUS,
    keys_per_day: int = DEFAULT_KEYS_PER_DAY,
) -> HoldResult:
    """Give the hold's amount back to its payer's available amount. Releasing a released or
    expired hold answers it as it is (released, expired); an active hold past its expires_at
    is marked expired. Raises HoldNotFoundError (also to a key not bound to the payer),
    HoldNotActiveError (captured), IdempotencyKeyReusedError."""
    found = await _payers_hold(pool, hold_id, caller)
    request = repository.Request("release", found.user_id, None, 0, None, hold_id)
    keyed = _Keyed(idempotency_key, caller, keys_per_day)
    if idempotency_key is None:
        return await _change_unkeyed(pool, _apply_release, keyed, request)
    return await _once(pool, keyed, request, _apply_release, _replay_change)


async def _change_unkeyed(
    pool: ConnectionPool,
    apply: Callable[[Connection, _Keyed, repository.Request], Awaitable[HoldResult | AppError]],
    keyed: _Keyed,
    request: repository.Request,
) -> HoldResult:
    """A capture or release without a key: the change and the reading of the hold it left in
    one transaction. Read on its own after the commit, a failure of that read would be told
    as database_unavailable (nothing changed) of a change that was made; in one transaction
    it is outcome_unknown at worst. The refusal is raised after the commit: a capture that
    finds its hold past expiry marks it expired, and that stands."""
    async with pool.transaction() as conn:
        changed = await apply(conn, keyed, request)
    if isinstance(changed, AppError):
        raise changed
    return changed


async def get_hold(pool: ConnectionPool, hold_id: int, caller: Caller = ANONYMOUS) -> HoldResult:
    """Raises HoldNotFoundError, also to a key bound to neither its payer nor its payee."""
    found = await repository.get_hold(pool, hold_id)
    if found is None or not _may_read(caller, found):
        raise HoldNotFoundError(hold_id)
    return HoldResult(found)


async def list_holds(
    pool: ConnectionPool,
    user_id: int,
    status: str | None,
    limit: int,
    before: int | None,
    caller: Caller = ANONYMOUS,
) -> HoldPage:
    """The user's holds (as payer), newest first, ``limit`` of them older than hold
    ``before``, only those in ``status`` if given. Raises UserNotFoundError (the access layer
    answers it to a key bound to other users before this runs)."""
    if not caller.may_touch(user_id):
        raise UserNotFoundError(user_id)
    rows = await repository.list_holds(
        pool, user_id, status, INT64_MAX if before is None else before, limit + 1
    )
    if not rows and not await repository.user_exists(pool, user_id):
        raise UserNotFoundError(user_id)
    page = rows[:limit]
    return HoldPage(user_id, page, page[-1].id if len(rows) > limit else None)


def _may_read(caller: Caller, hold: repository.Hold) -> bool:
    """A hold is its payer's and its payee's: a key bound to either may read it."""
    return caller.may_touch(hold.user_id) or (
        hold.to_user_id is not None and caller.may_touch(hold.to_user_id)
    )


async def _payers_hold(pool: ConnectionPool, hold_id: int, caller: Caller) -> repository.Hold:
    """The hold a change is asked of, if ``caller`` may change it: only a key bound to its
    payer (or unbound) may; any other is told the hold does not exist, before anything
    changes or its idempotency key is claimed. Who pays never changes: read unlocked."""
    found = await repository.get_hold(pool, hold_id)
    if found is None or not caller.may_touch(found.user_id):
        raise HoldNotFoundError(hold_id)
    return found


async def _apply_hold(
    db: repository.Executor, keyed: _Keyed, request: repository.Request
) -> HoldResult | AppError:
    """The hold made, or the refusal (returned: it is recorded before it is raised). Holds
    not enabled is raised, never returned: the transaction rolls back and nothing is stored,
    so a retry with the key is judged anew once they are."""
    assert request.expires_in is not None
    made = await repository.create_hold(
        db,
        request.user_id,
        request.to_user_id,
        request.amount,
        request.expires_in,
        request.reference,
        keyed.key,
        keyed.api_key_id,
    )
    if made.outcome == "holds_unavailable":
        raise HoldsUnavailableError()
    if made.outcome == "user_not_found":
        return UserNotFoundError(request.user_id)
    if made.outcome == "to_not_found":
        assert request.to_user_id is not None
        return UserNotFoundError(request.to_user_id, field="toUserId")
    if made.outcome == "payee_is_payer":
        return PayeeIsPayerError(request.user_id)
    if made.outcome == "insufficient_funds":
        return InsufficientFundsError(request.user_id)
    assert made.outcome == "ok", made
    assert made.hold_id is not None
    assert made.expires_at is not None
    assert made.created_at is not None
    assert made.available is not None
    hold = repository.Hold(
        made.hold_id,
        request.user_id,
        request.to_user_id,
        request.amount,
        None,
        "active",
        made.expires_at,
        made.created_at,
        request.reference,
        made.available,
    )
    return HoldResult(hold, available=made.available)


async def _replay_hold(
    conn: Connection, keyed: _Keyed, request: repository.Request, _legacy_balance: int | None
) -> HoldResult | None:
    """The creation a key made, answered as it was made (active, with the available amount
    it answered), whatever the hold became since."""
    assert keyed.key is not None
    applied = await repository.applied_with_key(conn, keyed.key, keyed.api_key_id)
    if applied.kind not in (None, "hold"):
        raise IdempotencyKeyReusedError()  # another kind's key, its outcome pruned
    if applied.hold_id is None:
        return None
    found = await repository.hold_with_key(conn, keyed.key, keyed.api_key_id)
    assert found is not None
    lasts = round((found.expires_at - found.created_at).total_seconds())
    if (
        (found.user_id, found.amount, found.reference, lasts)
        != (request.user_id, request.amount, request.reference, request.expires_in)
        # A payee set by the capture was not asked for by the creation.
        or (request.to_user_id is not None and found.to_user_id != request.to_user_id)
    ):
        raise IdempotencyKeyReusedError()
    first = found._replace(status="active", captured_amount=None, to_user_id=request.to_user_id)
    return HoldResult(first, replayed=True, available=found.available_after)


async def _apply_capture(
    db: repository.Executor, keyed: _Keyed, request: repository.Request
) -> HoldResult | AppError:
    assert request.hold_id is not None
    hold_id = request.hold_id
    changed = await repository.capture_hold(
        db,
        hold_id,
        request.amount or None,
        request.to_user_id,
        keyed.key,
        keyed.api_key_id,
    )
    refusal = _change_refused(hold_id, request, changed)
    if refusal is not None:
        return refusal
    found = await repository.get_hold(db, hold_id)
    assert found is not None
    assert found.status == "captured"
    return HoldResult(found, transfer_id=changed.transfer_id, entry_id=changed.entry_id)


async def _apply_release(
    db: repository.Executor, keyed: _Keyed, request: repository.Request
) -> HoldResult | AppError:
    assert request.hold_id is not None
    changed = await repository.release_hold(db, request.hold_id, keyed.key, keyed.api_key_id)
    refusal = _change_refused(request.hold_id, request, changed)
    if refusal is not None:
        return refusal
    found = await repository.get_hold(db, request.hold_id)
    assert found is not None
    return HoldResult(found)


def _change_refused(
    hold_id: int, request: repository.Request, changed: repository.HoldChange
) -> AppError | None:
    """The refusal a capture's or a release's outcome stands for (None: done)."""
    if changed.outcome == "ok":
        return None
    if changed.outcome == "hold_not_found":
        return HoldNotFoundError(hold_id)
    if changed.outcome == "hold_not_active":
        assert changed.status is not None
        return HoldNotActiveError(hold_id, changed.status)
    if changed.outcome == "payee_already_set":
        return PayeeAlreadySetError(hold_id)
    if changed.outcome == "payee_is_payer":
        return PayeeIsPayerError(request.user_id)
    if changed.outcome == "to_not_found":
        assert request.to_user_id is not None
        return UserNotFoundError(request.to_user_id, field="toUserId")
    if changed.outcome == "amount_exceeds_hold":
        return AmountExceedsHoldError(hold_id, request.amount)
    assert changed.outcome == "balance_limit_exceeded", changed
    return BalanceLimitError(request.to_user_id or request.user_id)


async def _replay_change(
    conn: Connection, keyed: _Keyed, request: repository.Request, _legacy_balance: int | None
) -> HoldResult | None:
    """The capture or release a key made: the hold as that change left it (a capture or a
    release is the hold's last change, so that is the hold now)."""
    assert keyed.key is not None
    assert request.hold_id is not None
    applied = await repository.applied_with_key(conn, keyed.key, keyed.api_key_id)
    if applied.kind not in (None, "change"):
        raise IdempotencyKeyReusedError()  # another kind's key, its outcome pruned
    if applied.changed_hold_id is None:
        return None
    captured = applied.change == "captured"
    if applied.changed_hold_id != request.hold_id or captured != (request.kind == "capture"):
        raise IdempotencyKeyReusedError()
    found = await repository.get_hold(conn, request.hold_id)
    assert found is not None
    if not captured:
        return HoldResult(found, replayed=True)
    if (request.amount or found.amount, request.to_user_id or found.to_user_id) != (
        found.captured_amount,
        found.to_user_id,
    ):
        raise IdempotencyKeyReusedError()
    entry = await repository.capture_entry(conn, request.hold_id)
    assert entry is not None
    return HoldResult(found, replayed=True, transfer_id=entry[0], entry_id=entry[1])
