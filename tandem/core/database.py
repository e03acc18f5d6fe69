"""Database access: one SQLAlchemy async engine for the plain cases, one asyncpg pool for hot paths.

Both use asyncpg. The wallet's two hot statements go through the raw pool: a SQLAlchemy
checkout costs more than the statement itself (measured in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

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


async def _keep_session(_: asyncpg.Connection) -> None:
    """Release hook that skips asyncpg's default reset.

    The default runs ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every
    release: a second round trip per request, ~8% of the server's CPU in a burst. asyncpg still
    rolls back a transaction left open. Invariant that makes this safe: nothing on the hot pool
    changes session state (no SET, LISTEN, session-level advisory lock or held cursor).
    """


async def create_pool(settings: Settings) -> asyncpg.Pool:
    """The raw pool for hot paths; every connection is opened up front so a burst never waits
    for connection setup."""
    pool = await asyncpg.create_pool(
        asyncpg_dsn(settings.require_database_url()),
        min_size=settings.db_pool_size,
        max_size=settings.db_pool_size,
        reset=_keep_session,
        server_settings={
            "application_name": "tandem-hot",
            "statement_timeout": str(settings.db_statement_timeout_ms),
        },
    )
    assert pool is not None
    return pool


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
