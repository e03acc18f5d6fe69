"""Alembic environment: runs migrations over the async engine, URL from the caller or settings."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import tandem.wallet.models  # noqa: F401  (registers the tables on Base.metadata)
from tandem.core.database import sqlalchemy_url
from tandem.core.models import Base
from tandem.core.settings import get_settings

target_metadata = Base.metadata


def _url() -> str:
    url = context.config.attributes.get("database_url") or get_settings().require_database_url()
    return sqlalchemy_url(str(url))


# Instances that migrate on start may race; the lock makes the second wait and then find
# nothing to do. Held until the migration transaction ends.
MIGRATION_LOCK_ID = 0x7A6D_0001


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url(), poolclass=NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
