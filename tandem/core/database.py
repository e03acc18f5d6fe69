"""Database access: one SQLAlchemy async engine for the plain cases, one lean pool of raw
asyncpg connections for the hot path.

Both use asyncpg. The wallet's two hot statements go through the lean pool: a SQLAlchemy
checkout costs more than the statement itself (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from tandem.core.hotpool import HotPool
from tandem.core.settings import Settings


def sqlalchemy_url(url: str) -> str:
    """The same URL with the asyncpg driver named, as SQLAlchemy wants it."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> str:
    """The same URL without a driver suffix, as asyncpg wants it."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_engine(settings: Settings) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(settings.require_database_url()),
        pool_size=settings.db_engine_pool_size,
        max_overflow=0,
        pool_timeout=settings.db_pool_timeout,
        pool_pre_ping=False,
        connect_args={
            "server_settings": {
                "application_name": "tandem",
                "statement_timeout": str(settings.db_statement_timeout_ms),
            }
        },
    )


def connect_function(
    settings: Settings, application_name: str = "tandem"
) -> Callable[[], Awaitable[asyncpg.Connection]]:
    """How to open one raw asyncpg connection with the service's session settings."""
    dsn = asyncpg_dsn(settings.require_database_url())
    server_settings = {
        "application_name": application_name,
        "statement_timeout": str(settings.db_statement_timeout_ms),
    }

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(dsn, server_settings=server_settings)

    return connect


async def create_pool(settings: Settings) -> HotPool:
    """The hot path's pool (see hotpool.py for why it is not asyncpg's)."""
    connect = connect_function(settings, "tandem-hot")
    return await HotPool.open(connect, settings.db_pool_size, settings.db_pool_timeout)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """One unit of work: commit on success, roll back on any exception. The one place that
    commits for requests and background loops alike."""
    async with sessionmaker() as session, session.begin():
        yield session


def rows_affected(status: str) -> int:
    """The row count of an asyncpg command status such as ``"DELETE 42"``."""
    return int(status.rsplit(" ", 1)[1])
