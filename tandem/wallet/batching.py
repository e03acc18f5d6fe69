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

Why our own and not a library's: the queue is per row and decided in the database's order
of arrival; it needs nothing but the event loop (one process, one thread), and it must
speak the pool's failure classes. Only changes without an idempotency key and by keys
without debit limits are batched (the service decides: those need their own transaction).
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import deque
from dataclasses import dataclass, field

import asyncpg

from tandem.core.database import Database
from tandem.core.errors import AppError, DatabaseUnavailableError, OutcomeUnknownError
from tandem.observability.metrics import WALLET_BATCH_SIZE
from tandem.wallet import repository
from tandem.wallet.repository import Delta, DeltaResult

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Waiting:
    """One change in a user's queue, and the answer its request awaits."""

    delta: Delta
    answer: asyncio.Future[DeltaResult | None]
    expiry: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class _Queue:
    """A user with a statement in flight: the changes waiting for it to end."""

    waiting: deque[_Waiting] = field(default_factory=deque)
    sender: asyncio.Task[None] | None = None


class QueueWaitExpiredError(DatabaseUnavailableError):
    pass


# Seconds every change goes alone after a batch found no batch function (migration 0018 not
# applied yet).
RETRY_BATCHES_AFTER = 30.0


class GroupCommit:
    """The per-user queues of one process. ``apply`` is ``repository.apply_delta`` (no key)
    with the user's concurrent changes folded into batches."""

    def __init__(self, database: Database, batch_max: int, batch_wait: float) -> None:
        self._database = database
        self._batch_max = batch_max
        self._batch_wait = batch_wait
        self._queues: dict[int, _Queue] = {}
        self._alone_until = 0.0  # loop time: no batch function found, every change alone

    @property
    def users_in_flight(self) -> int:
        """Users with a statement in flight (and a queue, maybe empty)."""
        return len(self._queues)

    async def apply(self, user_id: int, delta: Delta) -> DeltaResult | None:
        """The change applied or refused, as ``repository.apply_delta`` answers (None: no such
        user). Raises what the pool raises (DatabaseUnavailableError, OutcomeUnknownError),
        or QueueWaitExpiredError (a DatabaseUnavailableError) after ``batch_wait`` unsent."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._alone_until:
            return await self._one(user_id, delta)
        queue = self._queues.get(user_id)
        if queue is None:
            # Nothing in flight for this user: at once, alone.
            self._queues[user_id] = _Queue()
            try:
                return await self._one(user_id, delta)
            finally:
                self._then(user_id)
        waiting = _Waiting(delta, loop.create_future())
        waiting.expiry = loop.call_later(self._batch_wait, _expire, waiting)
        queue.waiting.append(waiting)
        return await waiting.answer

    def _then(self, user_id: int) -> None:
        """The statement in flight for ``user_id`` ended: send what waits, or forget the user."""
        queue = self._queues[user_id]
        if queue.sender is None and queue.waiting:
            queue.sender = asyncio.get_running_loop().create_task(self._send(user_id, queue))
        elif queue.sender is None:
            del self._queues[user_id]

    async def _send(self, user_id: int, queue: _Queue) -> None:
        """Batches, one after another, until the user's queue is empty."""
        try:
            while True:
                batch: list[_Waiting] = []
                while queue.waiting and len(batch) < self._batch_max:
                    waiting = queue.waiting.popleft()
                    if waiting.answer.done():
                        continue  # expired or cancelled before it was sent: nothing to send
                    if waiting.expiry is not None:
                        waiting.expiry.cancel()
                    batch.append(waiting)
                if not batch:
                    return
                try:
                    await self._run(user_id, batch)
                except BaseException:
                    # Cancelled with the statement maybe sent (the process is stopping), or a
                    # bug: no request of the batch is left waiting.
                    for waiting in batch:
                        _answer_error(
                            waiting, OutcomeUnknownError("the batch was cut off after sending")
                        )
                    raise
        finally:
            del self._queues[user_id]
            # Whatever is left (only if this task was cancelled: the process is stopping).
            for waiting in queue.waiting:
                _answer_error(waiting, DatabaseUnavailableError("the instance is stopping"))

    async def _run(self, user_id: int, batch: list[_Waiting]) -> None:
        WALLET_BATCH_SIZE.observe(len(batch))
        try:
            results = await repository.apply_deltas(
                self._database.pool, user_id, [waiting.delta for waiting in batch]
            )
        except AppError as error:
            # Classified by the pool: not applied, or outcome unknown; the same for each item.
            for waiting in batch:
                _answer_error(waiting, copy.copy(error))
            return
        except asyncpg.UndefinedFunctionError:
            if self._alone_until == 0.0:
                log.warning(
                    "group commit waits for migration 0018 (no batch function): every balance "
                    "change goes alone until it is applied"
                )
            self._alone_until = asyncio.get_running_loop().time() + RETRY_BATCHES_AFTER
            for waiting in batch:
                await self._alone(user_id, waiting)
            return
        except asyncpg.PostgresError:
            # The statement ran and rolled back as a whole: each item alone, for its own
            # answer (a bug shows as the 500 of the item that causes it, and only that one).
            for waiting in batch:
                await self._alone(user_id, waiting)
            return
        except Exception as exc:  # a bug: every item answers 500, with the same cause
            for waiting in batch:
                _answer_error(waiting, exc)
            return
        if results is None:
            for waiting in batch:
                _answer(waiting, None)
            return
        assert len(results) == len(batch), (len(results), len(batch))
        for waiting, result in zip(batch, results, strict=True):
            _answer(waiting, result)

    async def _one(self, user_id: int, delta: Delta) -> DeltaResult | None:
        """One change alone: today's statement."""
        return await repository.apply_delta(
            self._database.pool, user_id, delta.amount, delta.reference, None, delta.api_key_id
        )

    async def _alone(self, user_id: int, waiting: _Waiting) -> None:
        try:
            result = await self._one(user_id, waiting.delta)
        except Exception as exc:
            _answer_error(waiting, exc)
        else:
            _answer(waiting, result)


def _expire(waiting: _Waiting) -> None:
    _answer_error(
        waiting,
        QueueWaitExpiredError(
            "this user's earlier changes kept the database busy past the queue's wait; "
            "nothing was sent"
        ),
    )


def _answer(waiting: _Waiting, result: DeltaResult | None) -> None:
    if not waiting.answer.done():
        waiting.answer.set_result(result)


def _answer_error(waiting: _Waiting, error: BaseException) -> None:
    if waiting.expiry is not None:
        waiting.expiry.cancel()
    if not waiting.answer.done():
        waiting.answer.set_exception(error)
