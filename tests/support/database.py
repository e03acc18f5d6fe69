"""Databases on the suite's PostgreSQL server: a fresh one per module or test, migrated to
head and dropped afterwards, and one-statement queries on a connection of their own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tandem.core.database import asyncpg_dsn
from tandem.core.migrations import upgrade_to_head


def with_database(url: str, name: str) -> str:
    """``url`` with its database name replaced by ``name``."""
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _admin(url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(with_database(url, "postgres")))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def empty_database(server_url: str, prefix: str = "tandem_test") -> Iterator[str]:
    """A new, empty database on the server; dropped (with its connections) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(server_url: str, prefix: str = "tandem_test") -> Iterator[str]:
    """A new database migrated to head; dropped afterwards."""
    with empty_database(server_url, prefix) as url:
        upgrade_to_head(url)
        yield url


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One statement on a connection of its own (so no snapshot or statistics is reused)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


@asynccontextmanager
async def holding(url: str, sql: str, *args: object) -> AsyncIterator[None]:
    """A transaction of its own that ran ``sql`` (a lock, say) and stays open in the block;
    rolled back after it."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute(sql, *args)
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await conn.close()


def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """``fetch`` from synchronous code."""
    return asyncio.run(fetch(url, sql, *args))


def value(url: str, sql: str, *args: object) -> Any:
    """The first column of the first row; None when there is no row."""
    rows = query(url, sql, *args)
    return rows[0][0] if rows else None
