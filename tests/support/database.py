"""Databases on the suite's PostgreSQL server: a fresh one per module or test, migrated to
head and dropped afterwards, and one-statement queries on a connection of their own."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
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


def _admin(url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(asyncpg_dsn(with_database(url, "postgres")), timeout=10)
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


@contextmanager
def empty_database(
    server_url: str, prefix: str = "tandem_test", template: str | None = None
) -> Iterator[str]:
    """A new database on the server, empty or a copy of ``template``; dropped (with its
    connections) afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    _admin(server_url, f'CREATE DATABASE "{name}"{copy}')
    try:
        yield with_database(server_url, name)
    finally:
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(server_url: str, prefix: str = "tandem_test") -> Iterator[str]:
    """A new database migrated to head (a copy of this process's migrated template on that
    server); dropped afterwards."""
    template = _migrated_template(server_url)
    with empty_database(server_url, prefix, template) as url:
        # Kept per database outside it, so not copied: ALTER DATABASE ... SET (migration
        # 0006's session deadlines).
        for setting in _admin(server_url, DATABASE_SETTINGS, template):
            name, _, value = setting[0].partition("=")
            literal = value.replace("'", "''")
            _admin(
                server_url, f"ALTER DATABASE \"{make_url(url).database}\" SET {name} = '{literal}'"
            )
        yield url


# Running the migrations took about 0.7 s per database, for each of the ~90 fresh databases of
# a run (every module's and many a test's): each server gets one migrated database per test
# process, and fresh_database copies it (CREATE DATABASE ... TEMPLATE copies everything in the
# database: tables, functions, grants, rows). Named per process: the suite's workers may share
# one server, and a template is copied only while no one is connected to it.
_templates: dict[str, str] = {}

DATABASE_SETTINGS = """
SELECT unnest(s.setconfig) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
WHERE d.datname = $1 AND s.setrole = 0
"""


def _migrated_template(server_url: str) -> str:
    server = with_database(server_url, "postgres")
    name = _templates.get(server)
    # A throwaway server's URL may come back with a later server on the same port.
    if name is not None and not _admin(server, "SELECT FROM pg_database WHERE datname = $1", name):
        name = None
    if name is None:
        name = f"tandem_template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        _admin(server, f'CREATE DATABASE "{name}"')
        upgrade_to_head(with_database(server, name))
        _templates[server] = name
        atexit.register(_drop_quietly, server, name)
    return name


def _drop_quietly(server_url: str, name: str) -> None:
    """At exit: the server may be gone already (a throwaway one, or the session's own)."""
    with contextlib.suppress(Exception):
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
