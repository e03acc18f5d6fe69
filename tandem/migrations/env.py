"""Alembic environment: runs migrations over the async engine, URL from the caller or settings
(the direct URL: migrations need a real session, not a pooler's transaction)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import tandem.wallet.models  # noqa: F401  (registers the tables on Base.metadata)
from tandem.core import locks
from tandem.core.database import open_connection
from tandem.core.models import Base
from tandem.core.settings import get_settings

target_metadata = Base.metadata


def _url() -> str:
    url = context.config.attributes.get("database_url") or get_settings().require_direct_url()
    return str(url)


# Instances that migrate on start may race; the lock makes the second wait and then find
# nothing to do. Held until the migration transaction ends.
MIGRATION_LOCK_ID = locks.MIGRATION


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        # The database's own statement_timeout (migration 0006) is for the service, not for
        # building an index on a large table.
        connection.execute(text("SET LOCAL statement_timeout = 0"))
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def _run_online() -> None:
    settings = get_settings()
    url = _url()

    # The same connections as the service's (tandem/core/database.py), without its deadline
    # per statement; a multi-host URL works here too.
    async def connect() -> object:
        return await open_connection(url, settings, "tandem-migrate", statement_deadline=False)

    engine = create_async_engine("postgresql+asyncpg://", async_creator=connect, poolclass=NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url="postgresql://", target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
