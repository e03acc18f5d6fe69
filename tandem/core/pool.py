"""The pool of statements a process runs for requests (the wallet, the key cache) and of the
scheduler's own: a fixed set of asyncpg connections, LIFO, with direct hand-off to the
longest waiter.

Why not ``asyncpg.Pool``: with 10000 requests queued on 10 connections, its acquire/release
machinery (holder objects, a queue, shielded release, timeouts per call) cost ~100 µs of CPU
per query here, as much as the query itself (docs/decisions.md, "The wallet's hot path").
This pool does the one thing the wallet needs: run a statement on some idle connection, or
wait in line for one, FIFO, with a deadline. Connections come from ``Database.connect``
(tandem/core/database.py), which owns them; this pool only lends them out.

Invariants (each enforced where it is named):
- *One holder.* A connection is in exactly one of ``_idle``, ``_busy`` or nowhere (gone).
  ``_lend`` moves it to ``_busy``; only ``_take_back`` moves it out, and it ignores a
  connection that is not busy, so an immediate double give-back cannot lend one connection
  twice. Every caller in this module gives back exactly once per acquire (try/except/else).
  The defect of the previous version was elsewhere: a connection whose call had died with a
  FATAL was returned as if clean while asyncpg was still consuming the failed exchange.
- *A fixed size:* a connection made while another is being replaced (a caller's own, see
  below) takes that one's place; one more than ``size`` is closed, never lent again.
- *Only sane connections go back:* idle, outside a transaction, and its last call either
  succeeded or ended in a plain server ``ERROR`` (``failures.is_reusable``); anything else is
  terminated (no waiting on a dead peer) and replaced in the background.
- *Failures are classified here,* for the statements this pool runs itself: a failure before a
  statement was sent, or of a read, is "not applied" (a read is retried once on a fresh
  connection); a broken connection after a write was sent is "outcome unknown".
- *No hang when the database is gone:* while no connection is alive and reconnecting fails,
  callers are answered "unavailable" at once instead of waiting out the acquire deadline
  (one of them tries a connection itself, so the first request after a recovery succeeds).
- Nothing on this pool changes session state (SET, LISTEN, session advisory locks), so no
  reset round trip is needed between uses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from tandem.core.errors import AppError, DatabaseUnavailableError
from tandem.core.failures import (
    classify,
    is_reusable,
    is_stale_connection,
    not_applied,
    refused_before_sending,
)

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[asyncpg.Connection]]
_RECONNECT_MAX_DELAY = 2.0
# How long reconnecting may fail, with no connection alive, before the pool calls the database
# down and answers callers at once (a fast restart takes well under this).
_DOWN_AFTER = 2.0


class PoolClosedError(DatabaseUnavailableError):
    """The pool was closed (the instance is shutting down): nothing was sent."""


class ConnectionPool:
    def __init__(self, connect: Connect, size: int, acquire_timeout: float) -> None:
        self._connect = connect
        self._size = size
        self._acquire_timeout = acquire_timeout
        self._idle: list[asyncpg.Connection] = []
        self._busy: set[asyncpg.Connection] = set()
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection]] = collections.deque()
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False
        # Set once reconnecting has failed for _DOWN_AFTER with no connection alive; cleared by
        # the first connection made.
        self._down = False
        self._failing_since: float | None = None
        self._probing = False

    @classmethod
    async def open(cls, connect: Connect, size: int, acquire_timeout: float) -> ConnectionPool:
        """Open all ``size`` connections up front (a burst never waits for connection setup).
        Those that cannot be made now are retried in the background: an instance starts, and
        answers "unavailable", while the database is down."""
        pool = cls(connect, size, acquire_timeout)
        results = await asyncio.gather(*(connect() for _ in range(size)), return_exceptions=True)
        made = [r for r in results if isinstance(r, asyncpg.Connection)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                for conn in made:  # cancelled while opening: leave nothing behind
                    conn.terminate()
                raise result
        pool._idle.extend(made)
        for result in results:
            if isinstance(result, Exception):
                log.warning("opening a pooled connection failed (%r); retrying", result)
                pool._start_replacement()
        pool._down = not made
        return pool

    @property
    def size(self) -> int:
        return self._size

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def alive(self) -> int:
        return len(self._idle) + len(self._busy)

    # --- lending ---------------------------------------------------------------------

    async def _acquire(self) -> asyncpg.Connection:
        """A connection lent to the caller alone; raises DatabaseUnavailableError (nothing
        sent) when none can be had in time."""
        if self._closed:
            raise PoolClosedError("the instance is shutting down; nothing changed")
        while self._idle:
            conn = self._idle.pop()
            if conn.is_closed():
                # The server dropped it while idle (restart, terminate): replace, try the next.
                self._start_replacement()
                continue
            self._busy.add(conn)
            return conn
        if self._down and self.alive == 0:
            return await self._connect_inline()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[asyncpg.Connection] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(self._acquire_timeout, _expire, waiter)
        try:
            conn = await waiter
        except asyncio.CancelledError:
            # Handed a connection in the same instant we were cancelled: give it back.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._take_back(waiter.result(), None)
            raise
        finally:
            timer.cancel()
        if conn.is_closed():
            self._take_back(conn, None)
            return await self._acquire()
        return conn

    async def _connect_inline(self) -> asyncpg.Connection:
        """While the pool is down, one caller at a time tries a connection itself: the first
        request after the database is back succeeds instead of being refused by a pool whose
        background reconnect is still in its backoff. Everyone else is answered at once."""
        if self._probing:
            raise not_applied("no database connection can be made")
        self._probing = True
        try:
            conn = await self._connect()
        except Exception as error:
            raise not_applied(f"no database connection can be made ({error!r})") from error
        finally:
            self._probing = False
        if self._closed:
            conn.terminate()
            raise PoolClosedError("the instance is shutting down; nothing changed")
        self._down = False
        self._failing_since = None
        # This connection takes the place of one being replaced (one fewer reconnect); if none
        # is left to cancel, it is surplus and _take_back closes it after this use.
        for task in list(self._replacing):
            if task.cancel():
                break
        self._busy.add(conn)
        return conn

    def _lend(self, conn: asyncpg.Connection) -> None:
        """Give a sane connection to the longest waiter, or make it idle."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._busy.add(conn)
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _take_back(self, conn: asyncpg.Connection, failure: BaseException | None) -> None:
        if self._closed:
            conn.terminate()  # close() let go of every connection; in-flight ones end here
            return
        if conn not in self._busy:
            # Never lend it twice: a second give-back is a bug in the caller, not a reason to
            # put the connection in two hands.
            log.error("a connection was given back twice; ignoring the second time")
            return
        self._busy.discard(conn)
        surplus = self.alive >= self._size
        if (
            not surplus
            and is_reusable(failure)
            and not conn.is_closed()
            and not conn.is_in_transaction()
        ):
            self._lend(conn)
            return
        conn.terminate()
        if not surplus:
            self._start_replacement()

    def _start_replacement(self) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._replace())
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                conn = await self._connect()
            except Exception as error:  # any failure to connect: retry; the pool must heal
                self._note_failed_connect()
                log.warning("reconnecting failed (%r); retry in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX_DELAY)
                continue
            if self._closed or self.alive >= self._size:
                conn.terminate()  # shut down meanwhile, or a caller's own connection took the place
                return
            self._down = False
            self._failing_since = None
            self._lend(conn)
            return

    def _note_failed_connect(self) -> None:
        """With no connection alive, reconnecting has failed: after _DOWN_AFTER of that, the
        database is down, and waiting callers are answered now rather than at their deadline.
        A restart (connections refused for a fraction of a second) only delays them."""
        if self.alive:
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if not self._down and now - self._failing_since >= _DOWN_AFTER:
            self._down = True
            self._fail_waiters(lambda: not_applied("no database connection can be made"))

    def _fail_waiters(self, error: Callable[[], Exception]) -> None:
        """Each waiter gets an exception of its own (one instance raised in many tasks would
        collect all their tracebacks)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error())

    # --- statements ------------------------------------------------------------------

    async def fetchrow(
        self, query: str, *args: Any, retry_safe: bool = False
    ) -> asyncpg.Record | None:
        """One statement, autocommit. Raises DatabaseUnavailableError (not applied) or, for a
        write whose connection broke after sending, OutcomeUnknownError. ``retry_safe``: the
        statement may run twice (a read, or a write whose repetition does no harm), so it is
        retried once on a fresh connection when the first was found broken, and never
        reported as an unknown outcome."""
        conn = await self._acquire()
        try:
            row = await conn.fetchrow(query, *args)
        except BaseException as failure:
            retried: asyncpg.Record | None = await self._recover(
                conn, failure, asyncpg.Connection.fetchrow, query, args, retry_safe
            )
            return retried
        # The success path stays inline (no helper coroutine): it is the wallet's hot path.
        self._take_back(conn, None)
        return row

    async def fetchval(self, query: str, *args: Any, retry_safe: bool = False) -> Any:
        conn = await self._acquire()
        try:
            value = await conn.fetchval(query, *args)
        except BaseException as failure:
            return await self._recover(
                conn, failure, asyncpg.Connection.fetchval, query, args, retry_safe
            )
        self._take_back(conn, None)
        return value

    async def fetch(self, query: str, *args: Any, retry_safe: bool = False) -> list[asyncpg.Record]:
        conn = await self._acquire()
        try:
            rows = await conn.fetch(query, *args)
        except BaseException as failure:
            retried: list[asyncpg.Record] = await self._recover(
                conn, failure, asyncpg.Connection.fetch, query, args, retry_safe
            )
            return retried
        self._take_back(conn, None)
        return rows

    async def _recover(
        self,
        conn: asyncpg.Connection,
        failure: BaseException,
        method: Callable[..., Awaitable[Any]],
        query: str,
        args: Any,
        retry_safe: bool,
    ) -> Any:
        """After a statement failed: give the connection back (or replace it), then retry once
        on a fresh connection if the old one was found broken and the statement cannot have
        applied anything (a read, or never sent); otherwise raise the classified error."""
        self._take_back(conn, failure)
        if isinstance(failure, AppError) or not isinstance(failure, Exception):
            raise failure
        unapplied = retry_safe or refused_before_sending(failure)
        if is_stale_connection(failure) and unapplied:
            conn = await self._acquire()
            try:
                result = await method(conn, query, *args)
            except BaseException as second:
                self._take_back(conn, second)
                if isinstance(second, AppError) or not isinstance(second, Exception):
                    raise
                failure, unapplied = second, retry_safe or refused_before_sending(second)
            else:
                self._take_back(conn, None)
                return result
        error = classify(failure, sent=not unapplied)
        if error is None:
            raise failure
        raise error from failure

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """BEGIN … COMMIT on one connection. A failure before COMMIT was sent is "not
        applied" (the server never commits a transaction it did not see committed); a broken
        connection during COMMIT is "outcome unknown". An AppError raised inside rolls back
        and passes through unchanged."""
        conn = await self._acquire()
        committing = False
        try:
            tx = conn.transaction()
            await tx.start()
            try:
                yield conn
            except BaseException as failure:
                # Roll back only a connection known to be sane; a broken or cancelled one is
                # terminated instead (the server rolls back what it never saw committed).
                if isinstance(failure, AppError) or (
                    isinstance(failure, asyncpg.PostgresError) and is_reusable(failure)
                ):
                    with contextlib.suppress(Exception):
                        await tx.rollback()
                raise
            committing = True
            await tx.commit()
        except BaseException as failure:
            domain = isinstance(failure, AppError)
            self._take_back(conn, None if domain else failure)
            if domain or not isinstance(failure, Exception):
                raise
            error = classify(failure, sent=committing)
            if error is None:
                raise
            raise error from failure
        self._take_back(conn, None)

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for several statements that the caller manages (the scheduler's
        loops); returned on exit, or replaced if the caller's failure left it unknown. Driver
        errors from the caller's statements pass through unclassified."""
        conn = await self._acquire()
        try:
            yield conn
        except BaseException as failure:
            self._take_back(conn, failure)
            raise
        self._take_back(conn, None)

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109  (a budget, split)
        """Fail every waiter, stop replacing, and close every connection within ``timeout``:
        idle ones are closed politely, all at once; whatever has not closed by then (a busy
        one, or one whose peer is gone) is terminated, so a dead database cannot hold the
        shutdown."""
        self._closed = True
        self._fail_waiters(lambda: PoolClosedError("the instance is shutting down"))
        for task in list(self._replacing):
            task.cancel()
        idle, self._idle = self._idle, []
        busy, self._busy = self._busy, set()
        for conn in busy:
            conn.terminate()
        closing = [asyncio.ensure_future(conn.close(timeout=timeout)) for conn in idle]
        if closing:
            await asyncio.wait(closing, timeout=timeout)
            for future in closing:
                if future.done():
                    future.exception()  # retrieved: a failed polite close is fine
                else:
                    future.cancel()
        for conn in idle:
            if not conn.is_closed():
                conn.terminate()


def _expire(waiter: asyncio.Future[asyncpg.Connection]) -> None:
    if not waiter.done():
        waiter.set_exception(not_applied("no database connection became free in time"))
