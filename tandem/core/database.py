"""The one owner of every database connection this process opens.

``Database`` makes every connection (``connect``: the URL, deadlines, TCP keepalive, the
statement cache, in one place), lends them out through its pools (the requests' pool, the
SQLAlchemy engine for the plain cases, the scheduler's pool) and its single connections (the
scheduler's heartbeat, housekeeping), runs the ORM's units of work (``transact``: the one
transaction helper, with the failure classification of ``failures.py``) and closes everything
within a deadline, even when the database no longer answers.

Session parameters are *not* sent in the startup packet (a pooler such as PgBouncer refuses
them): the server-side deadlines (statement_timeout, idle_in_transaction_session_timeout, TCP
keepalive and tcp_user_timeout) are the database's defaults, set by a migration (0006) and
overridable per role by the operator. The client-side deadlines are set here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from tandem.core.errors import AppError
from tandem.core.failures import classify, is_stale_connection
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Client-side TCP keepalive: an idle connection to a peer that vanished without a FIN (a
# partition, a dead host) is noticed in about IDLE + INTERVAL * COUNT = 11 s instead of hours.
_KEEPALIVE_IDLE = 5
_KEEPALIVE_INTERVAL = 2
_KEEPALIVE_COUNT = 3


def asyncpg_dsn(url: str) -> str:
    """The URL as asyncpg wants it: scheme ``postgresql``, no driver suffix. Everything else
    passes unchanged, so multi-host URLs (``h1:5432,h2:5432``) and ``target_session_attrs``
    work; asyncpg understands both (SQLAlchemy's URL parser does not, so it is not used)."""
    scheme, separator, rest = url.partition("://")
    if not separator or scheme.split("+", 1)[0] not in ("postgresql", "postgres"):
        raise ValueError("the database URL must start with postgresql:// (or postgres://)")
    return f"postgresql://{rest}"


def _tune_socket(conn: asyncpg.Connection, user_timeout: float) -> None:
    """TCP keepalive and TCP_USER_TIMEOUT on the connection's socket (asyncpg has no option
    for them). TCP_USER_TIMEOUT bounds how long sent data may stay unacknowledged, so a write
    into a partition fails in seconds rather than after the kernel's 15 minutes of retries."""
    transport = getattr(conn, "_transport", None)  # asyncpg keeps no public handle on it
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket (the embedded server): no network in between
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", _KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", _KEEPALIVE_COUNT),
        ("TCP_USER_TIMEOUT", int(user_timeout * 1000)),
    ):
        if hasattr(socket, option):  # Linux has all four; others may lack some
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def open_connection(
    url: str, settings: Settings, application_name: str, *, statement_deadline: bool = True
) -> asyncpg.Connection:
    """One new connection with the service's client-side settings: a connect deadline, a
    deadline on every statement (``command_timeout``: asyncpg cancels the statement and
    raises TimeoutError), TCP keepalive, and the prepared-statement cache unless the pooler in
    between cannot keep prepared statements (TANDEM_DB_STATEMENT_CACHE=false). Only
    ``application_name`` goes in the startup packet: every pooler accepts it.
    ``statement_deadline=False`` (migrations) leaves statements without a client deadline."""
    conn = await asyncpg.connect(
        asyncpg_dsn(url),
        timeout=settings.db_connect_timeout,
        command_timeout=settings.db_command_timeout if statement_deadline else None,
        statement_cache_size=100 if settings.db_statement_cache else 0,
        server_settings={"application_name": application_name},
    )
    try:
        _tune_socket(conn, settings.db_tcp_user_timeout)
    except OSError:
        conn.terminate()
        raise
    return conn


class Database:
    """Every connection of the process, made, lent and closed here."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._url = settings.require_database_url()
        # Everything this object made and has not seen closed, for the last word at close().
        self._connections: weakref.WeakSet[asyncpg.Connection] = weakref.WeakSet()
        self._pools: list[ConnectionPool] = []
        self._requests: ConnectionPool | None = None
        self._engine: AsyncEngine | None = None
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None

    async def connect(
        self,
        application_name: str = "tandem",
        *,
        direct: bool = False,
        statement_deadline: bool = True,
    ) -> asyncpg.Connection:
        """A new connection owned by this object (closed by ``close`` if the borrower has
        not closed it). ``direct``: a real database session, never a pooler's transaction
        (TANDEM_DATABASE_DIRECT_URL when set), for what a session holds (the scheduler's
        session lock). ``statement_deadline=False``: no client-side deadline per statement,
        for scans that take as long as the data (the ledger's verification)."""
        url = self.settings.require_direct_url() if direct else self._url
        conn = await open_connection(
            url, self.settings, application_name, statement_deadline=statement_deadline
        )
        self._connections.add(conn)
        return conn

    async def open(self) -> None:
        """The requests' pool (all its connections opened now, or retried in the background
        while the database is down) and the engine (connections on demand)."""
        self._requests = await self.open_pool("tandem-requests", self.settings.db_pool_size)
        self._engine = self._create_engine()
        self._sessionmaker = async_sessionmaker(self._engine, expire_on_commit=False)

    async def open_pool(self, application_name: str, size: int) -> ConnectionPool:
        pool = await ConnectionPool.open(
            lambda: self.connect(application_name), size, self.settings.db_pool_timeout
        )
        self._pools.append(pool)
        return pool

    @property
    def pool(self) -> ConnectionPool:
        """The pool requests run their statements on (the wallet, the key cache); the
        scheduler opens its own (open_pool)."""
        assert self._requests is not None, "used before Database.open()"
        return self._requests

    @property
    def engine(self) -> AsyncEngine:
        assert self._engine is not None, "used before Database.open()"
        return self._engine

    def _create_engine(self) -> AsyncEngine:
        cache_size = 100 if self.settings.db_statement_cache else 0
        engine: AsyncEngine | None = None

        def creator() -> Any:
            # SQLAlchemy's documented way to hand its asyncpg dialect a connection made
            # elsewhere while still passing the dialect's own prepared-statement cache size.
            assert engine is not None
            return engine.sync_engine.dialect.dbapi.connect(  # type: ignore[union-attr]
                async_creator_fn=lambda: self.connect("tandem-engine"),
                prepared_statement_cache_size=cache_size,
            )

        engine = create_async_engine(
            "postgresql+asyncpg://",
            creator=creator,
            pool_size=self.settings.db_engine_pool_size,
            max_overflow=0,
            # No burst queues here (the wallet has its own pool): a request that cannot get
            # one of these few connections within a statement's deadline gets a 503.
            pool_timeout=min(self.settings.db_pool_timeout, self.settings.db_command_timeout),
        )

        @event.listens_for(engine.sync_engine, "checkout")
        def _refuse_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
            # A pooled connection the server dropped while idle (a restart): SQLAlchemy
            # replaces it and retries the checkout, so no request sees "connection is closed".
            # Free, unlike pool_pre_ping's round trip per checkout.
            if dbapi_connection.driver_connection.is_closed():
                raise DisconnectionError("the server closed this pooled connection")

        return engine

    async def transact(
        self, work: Callable[[AsyncSession], Awaitable[T]], *, writes: bool = True
    ) -> T:
        """Run ``work`` in one transaction and commit it: the one place that commits for the
        ORM's cases. Raises DatabaseUnavailableError when nothing was applied (a failure
        before COMMIT was sent, or any failure of a read: a connection found broken is
        retried once on a fresh one first) and OutcomeUnknownError when the connection broke
        during the COMMIT of ``writes``. AppErrors from ``work`` roll back and pass through."""
        assert self._sessionmaker is not None, "used before Database.open()"
        for attempt in (1, 2):
            committing = False
            try:
                async with self._sessionmaker() as session:
                    result = await work(session)
                    committing = True
                    await session.commit()
                    return result
            except AppError:
                raise
            except Exception as failure:
                sent = writes and committing
                error = classify(failure, sent=sent)
                if error is None:
                    raise
                if attempt == 1 and not sent and is_stale_connection(failure):
                    log.info("retrying a unit of work on a fresh connection (%r)", failure)
                    continue
                raise error from failure
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close every pool and connection within TANDEM_DB_CLOSE_TIMEOUT, concurrently,
        and terminate what is left: a database that stopped answering cannot hold up the
        shutdown (closing politely one by one waited 5 s per connection)."""
        timeout = self.settings.db_close_timeout
        # The pools get half the budget for polite closes, so they terminate what is left
        # themselves before this waits no longer.
        closing: list[Awaitable[Any]] = [pool.close(timeout / 2) for pool in self._pools]
        if self._engine is not None:
            closing.append(self._engine.dispose())
        if closing:
            tasks = [asyncio.ensure_future(c) for c in closing]
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    log.warning("closing database connections: %r", task.exception())
        for conn in list(self._connections):
            if not conn.is_closed():
                conn.terminate()


def rows_affected(status: str) -> int:
    """The row count of an asyncpg command status such as ``"DELETE 42"``."""
    return int(status.rsplit(" ", 1)[1])
