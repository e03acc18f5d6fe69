"""A small connection pool for the hot path: a fixed set of asyncpg connections, LIFO, with
direct hand-off to the longest waiter.

Why not ``asyncpg.Pool``: with 10000 requests queued on 10 connections, its acquire/release
machinery (holder objects, a queue, shielded release, timeouts per call) cost ~100 µs of CPU
per query here, as much as the query itself (bench/pool.py measures both in one run). This
pool does the one thing the wallet needs: run a statement on some idle connection, or wait
in line for one, FIFO, with a deadline.

Invariants:
- A connection goes back to the pool only when it is idle and outside a transaction; any
  failure that is not a plain server-side error (connection lost, cancellation mid-query,
  protocol state unknown) terminates it, and a replacement is opened in the background.
- Nothing on this pool changes session state (SET, LISTEN, session advisory locks), so no
  reset round trip is needed between uses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

Connect = Callable[[], Awaitable[asyncpg.Connection]]


class PoolClosedError(RuntimeError):
    pass


class HotPool:
    def __init__(self, connect: Connect, size: int, acquire_timeout: float) -> None:
        self._connect = connect
        self._size = size
        self._acquire_timeout = acquire_timeout
        self._idle: list[asyncpg.Connection] = []
        self._waiters: collections.deque[asyncio.Future[asyncpg.Connection]] = collections.deque()
        self._all: set[asyncpg.Connection] = set()
        self._replacing: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    async def open(cls, connect: Connect, size: int, acquire_timeout: float) -> HotPool:
        """Open all ``size`` connections up front: a burst never waits for connection setup."""
        pool = cls(connect, size, acquire_timeout)
        connections = await asyncio.gather(*(connect() for _ in range(size)))
        pool._all.update(connections)
        pool._idle.extend(connections)
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

    async def _acquire(self) -> asyncpg.Connection:
        if self._closed:
            raise PoolClosedError("the pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            # The server dropped it while idle (restart, idle timeout): replace, try the next.
            self._discard(conn)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[asyncpg.Connection] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(self._acquire_timeout, _expire, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a connection in the same instant we were cancelled: give it back.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise
        finally:
            timer.cancel()

    def _release(self, conn: asyncpg.Connection) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _discard(self, conn: asyncpg.Connection) -> None:
        """Terminate a connection in an unknown state and open a replacement."""
        self._all.discard(conn)
        conn.terminate()
        if not self._closed:
            task = asyncio.get_running_loop().create_task(self._replace())
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)

    async def _replace(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                conn = await self._connect()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                log.warning("reconnecting the hot pool failed (%r); retry in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._closed:
                await conn.close()
                return
            self._all.add(conn)
            self._release(conn)
            return

    def _give_back(self, conn: asyncpg.Connection, failure: BaseException | None) -> None:
        # A server-side error (constraint, bad value) leaves the connection idle and usable;
        # anything else (lost connection, cancellation mid-statement) leaves it unknown.
        clean = failure is None or isinstance(failure, asyncpg.PostgresError)
        if clean and not conn.is_closed() and not conn.is_in_transaction():
            self._release(conn)
        else:
            self._discard(conn)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        conn = await self._acquire()
        try:
            row = await conn.fetchrow(query, *args)
        except BaseException as failure:
            self._give_back(conn, failure)
            raise
        self._give_back(conn, None)
        return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        conn = await self._acquire()
        try:
            value = await conn.fetchval(query, *args)
        except BaseException as failure:
            self._give_back(conn, failure)
            raise
        self._give_back(conn, None)
        return value

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for several statements (a transaction); returned on exit."""
        conn = await self._acquire()
        try:
            yield conn
        except BaseException as failure:
            self._give_back(conn, failure)
            raise
        self._give_back(conn, None)

    async def close(self) -> None:
        """Fail every waiter, stop replacing, and close every connection."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosedError("the pool is closed"))
        for task in list(self._replacing):
            task.cancel()
        for conn in list(self._all):
            with suppress(OSError, asyncpg.InterfaceError, asyncpg.PostgresError):
                await conn.close(timeout=5)
        self._all.clear()
        self._idle.clear()


def _expire(waiter: asyncio.Future[asyncpg.Connection]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no database connection became free in time"))
