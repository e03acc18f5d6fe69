"""Group commit per user: one busy balance is never the bottleneck.

Every balance change used to be its own statement and commit, and the changes of one user
queued on its row lock, each holding it through its own commit flush. Here, per process:

- a change of a user with no statement in flight goes at once, alone, as it always did
  (``APPLY_DELTA``): no timer, no added latency at low load;
- changes of that user arriving meanwhile wait in the user's queue, in arrival order; when
  the statement in flight ends, up to ``batch_max`` of them go together as one statement
  (``APPLY_DELTAS``: one row lock, one commit), each decided on the balance the ones before it
  left, and each request gets its own item's answer. The next batch follows the same way
  until the queue is empty;
- a change that waited ``batch_wait`` seconds without being sent is answered 503
  ``database_unavailable``: nothing was sent;
- a 2xx still means committed: the batch's statement commits (autocommit,
  ``synchronous_commit`` untouched) before any of its items is answered.

When a batch's statement fails, the pool has classified the failure: never sent or rolled
back (``database_unavailable``), or the connection lost after sending (``outcome_unknown``):
each item gets that answer (a fresh error of its own). A failure the pool did not classify
means the statement ran and rolled back (an error of the function's, a bug): its items are
tried again one by one, so one bad item never takes the others' answers with it.

A database below migration 0018 (the holds' contract waiting for an older release's
instances, or a downgrade) has no batch function: the first batch that finds it missing is
sent change by change, and every change goes alone, as with group commit off, for
``RETRY_BATCHES_AFTER`` seconds before a batch is tried again.

Two kinds of queue, one mechanism (``RowQueues``): ``GroupCommit`` batches the balance
changes of one user (``APPLY_DELTAS``); ``TransferBatches`` batches the transfers into one
payee (``TRANSFER_BATCH``): the hot side of a platform is the account every sale credits, so
a transfer queues on its payee's row (the rule), and the batch locks each row it touches
once, payers and payee in id order, as every transfer does. A payer busy with outgoing
transfers is not batched (its transfers go to different payees).

Why our own and not a library's: the queue is per row and decided in the database's order
of arrival; it needs nothing but the event loop (one process, one thread), and it must
speak the pool's failure classes. The service decides what is batched (service.py:
keyed changes have a queue of their own there, KeyedChanges, whose batch is one
transaction; a change by a key with debit limits keeps its own transaction).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import asyncpg

from tandem.core.database import Database
from tandem.core.errors import AppError, DatabaseUnavailableError, OutcomeUnknownError
from tandem.observability.metrics import WALLET_BATCH_SIZE
from tandem.wallet import repository
from tandem.wallet.repository import Delta, DeltaResult, Payment, TransferResult

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True, eq=False)
class _Waiting(Generic[Item, Result]):
    """One item in a row's queue, and the answer its request awaits."""

    item: Item
    answer: asyncio.Future[Result]
    expiry: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Queue(Generic[Item, Result]):
    """A row with a statement in flight: the items waiting for it to end."""

    waiting: deque[_Waiting[Item, Result]] = field(default_factory=deque)
    sender: asyncio.Task[None] | None = None


class QueueWaitExpiredError(DatabaseUnavailableError):
    pass


# Seconds every item goes alone after a batch found no batch function (migration 0018 not
# applied yet).
RETRY_BATCHES_AFTER = 30.0


class RowQueues(ABC, Generic[Item, Result]):
    """The per-row queues of one process for one kind of statement: ``_one`` sends an item
    alone (today's statement), ``_batch`` several of one row together, in order."""

    kind: ClassVar[str]  # what the metric's label and the log call an item

    def __init__(self, database: Database, batch_max: int, batch_wait: float) -> None:
        self._database = database
        self._batch_max = batch_max
        self._batch_wait = batch_wait
        self._queues: dict[int, _Queue[Item, Result]] = {}
        self._alone_until = 0.0  # loop time: no batch function found, every item alone
        self._sizes = WALLET_BATCH_SIZE.labels(self.kind)  # the child, looked up once

    @property
    def rows_in_flight(self) -> int:
        """Rows with a statement in flight (and a queue, maybe empty)."""
        return len(self._queues)

    @abstractmethod
    async def _one(self, row: int, item: Item) -> Result: ...

    @abstractmethod
    async def _batch(self, row: int, items: Sequence[Item]) -> list[Result]: ...

    def _identity(self, item: Item) -> Hashable | None:
        """What no two items of one batch may share (None: anything goes): an item whose
        identity is already in the batch being formed waits for the next one, so it is
        decided after the first has committed (a keyed retry then replays it)."""
        return None

    async def apply(self, row: int, item: Item) -> Result:
        """The item's outcome, as ``_one`` answers it. Raises what the pool raises
        (DatabaseUnavailableError, OutcomeUnknownError), or QueueWaitExpiredError (a
        DatabaseUnavailableError) after ``batch_wait`` unsent."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._alone_until:
            return await self._one(row, item)
        queue = self._queues.get(row)
        if queue is None:
            # Nothing in flight for this row: at once, alone.
            self._queues[row] = _Queue()
            try:
                return await self._one(row, item)
            finally:
                self._then(row)
        waiting: _Waiting[Item, Result] = _Waiting(item, loop.create_future())
        waiting.expiry = loop.call_later(self._batch_wait, _expire, waiting)
        queue.waiting.append(waiting)
        try:
            return await waiting.answer
        except asyncio.CancelledError:
            waiting.expiry.cancel()  # the request is gone: nothing holds its item any more
            raise

    def _then(self, row: int) -> None:
        """The statement in flight for ``row`` ended: send what waits, or forget the row."""
        queue = self._queues[row]
        if queue.waiting:
            queue.sender = asyncio.get_running_loop().create_task(self._send(row, queue))
        else:
            del self._queues[row]

    async def _send(self, row: int, queue: _Queue[Item, Result]) -> None:
        """Batches, one after another, until the row's queue is empty."""
        try:
            while True:
                batch: list[_Waiting[Item, Result]] = []
                seen: set[Hashable] = set()
                later: list[_Waiting[Item, Result]] = []  # in order, for the next batch
                while queue.waiting and len(batch) < self._batch_max:
                    waiting = queue.waiting.popleft()
                    if waiting.answer.done():
                        continue  # expired or cancelled before it was sent: nothing to send
                    identity = self._identity(waiting.item)
                    if identity is not None:
                        if identity in seen:
                            later.append(waiting)
                            if len(later) >= self._batch_max:
                                break  # a storm of one key: scan no further this time
                            continue
                        seen.add(identity)
                    if waiting.expiry is not None:
                        waiting.expiry.cancel()
                    batch.append(waiting)
                queue.waiting.extendleft(reversed(later))
                if not batch:
                    return
                if asyncio.get_running_loop().time() < self._alone_until:
                    for waiting in batch:  # no batch function yet: each alone, no batch tried
                        await self._alone(row, waiting)
                    continue
                try:
                    await self._run(row, batch)
                except BaseException:
                    # Cancelled with the statement maybe sent (the process is stopping), or a
                    # bug: no request of the batch is left waiting.
                    for waiting in batch:
                        _answer_error(
                            waiting, OutcomeUnknownError("the batch was cut off after sending")
                        )
                    raise
        finally:
            del self._queues[row]
            # Whatever is left (only if this task was cancelled: the process is stopping).
            for waiting in queue.waiting:
                _answer_error(waiting, DatabaseUnavailableError("the instance is stopping"))

    async def _run(self, row: int, batch: list[_Waiting[Item, Result]]) -> None:
        self._sizes.observe(len(batch))
        try:
            results = await self._batch(row, [waiting.item for waiting in batch])
        except AppError as error:
            # Classified by the pool: not applied, or outcome unknown; the same for each item.
            for waiting in batch:
                _answer_error(waiting, copy.copy(error))
            return
        except asyncpg.UndefinedFunctionError:
            if self._alone_until == 0.0:
                log.warning(
                    "group commit waits for migration 0018 (no batch function): every %s "
                    "goes alone until it is applied",
                    self.kind,
                )
            self._alone_until = asyncio.get_running_loop().time() + RETRY_BATCHES_AFTER
            for waiting in batch:
                await self._alone(row, waiting)
            return
        except (asyncpg.PostgresError, asyncpg.DataError) as failure:
            # The statement ran and rolled back as a whole (or one item could not be encoded,
            # nothing sent): each item alone, for its own answer (a bug shows as the 500 of
            # the item that causes it, and only that one).
            log.warning(
                "a %s batch of %d failed (%s: %s); its items are sent one by one",
                self.kind,
                len(batch),
                getattr(failure, "sqlstate", None) or type(failure).__name__,
                failure,
            )
            for waiting in batch:
                await self._alone(row, waiting)
            return
        except Exception as exc:  # a bug: every item answers 500, with the same cause
            for waiting in batch:
                _answer_error(waiting, exc)
            return
        assert len(results) == len(batch), (len(results), len(batch))
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(result)

    async def _alone(self, row: int, waiting: _Waiting[Item, Result]) -> None:
        try:
            result = await self._one(row, waiting.item)
        except Exception as exc:
            _answer_error(waiting, exc)
        else:
            if not waiting.answer.done():
                waiting.answer.set_result(result)


class GroupCommit(RowQueues[Delta, "DeltaResult | None"]):
    """One user's balance changes (no key): ``repository.apply_delta`` with the user's
    concurrent changes folded into batches. None: no such user."""

    kind = "change"

    async def _one(self, row: int, item: Delta) -> DeltaResult | None:
        return await repository.apply_delta(
            self._database.pool, row, item.amount, item.reference, None, item.api_key_id
        )

    async def _batch(self, row: int, items: Sequence[Delta]) -> list[DeltaResult | None]:
        found = await repository.apply_deltas(self._database.pool, row, items)
        return [None] * len(items) if found is None else list(found)


class TransferBatches(RowQueues[Payment, TransferResult]):
    """Transfers into one payee (no key): ``repository.transfer`` with the payee's
    concurrent incoming transfers folded into batches."""

    kind = "transfer"

    async def _one(self, row: int, item: Payment) -> TransferResult:
        return await repository.transfer(
            self._database.pool,
            item.from_user_id,
            row,
            item.amount,
            item.reference,
            None,
            item.api_key_id,
        )

    async def _batch(self, row: int, items: Sequence[Payment]) -> list[TransferResult]:
        return await repository.transfer_batch(self._database.pool, row, items)


def _expire(waiting: _Waiting[Item, Result]) -> None:
    _answer_error(
        waiting,
        QueueWaitExpiredError(
            "earlier changes of this row kept the database busy past the queue's wait; "
            "nothing was sent"
        ),
    )


def _answer_error(waiting: _Waiting[Item, Result], error: BaseException) -> None:
    if waiting.expiry is not None:
        waiting.expiry.cancel()
    if not waiting.answer.done():
        waiting.answer.set_exception(error)
