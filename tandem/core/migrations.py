"""Run and inspect Alembic migrations from code (the CLI, the app's readiness check, tests)."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Sequence
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from tandem.core.functions import ServerFunction

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if database_url:
        config.attributes["database_url"] = database_url
    return config


def upgrade_to_head(database_url: str) -> None:
    """Apply every pending migration. Safe to repeat; concurrent callers serialise on an
    advisory lock taken inside the migration transaction (see migrations/env.py)."""
    command.upgrade(alembic_config(database_url), "head")


# What the application's own role may do (TANDEM_DATABASE_APP_ROLE; the migrations run as the
# owner): read and write its tables, but no DDL (it owns nothing, and PostgreSQL 15+ gives
# PUBLIC no CREATE on the public schema), and on the journal only SELECT and INSERT: besides
# the append-only triggers, the privileges refuse an UPDATE or DELETE of history. Applied after
# every upgrade, so tables added later are covered.
_APP_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_APPEND_ONLY = ("ledger_entries", "transfers")


def grant_app_role(database_url: str, role: str, functions: Sequence[ServerFunction] = ()) -> None:
    """Give ``role`` (an existing login role) the application's rights on this database, and
    EXECUTE on each of ``functions`` by name (the owner's functions PUBLIC may not run; core
    imports no domain: the caller names them, ``tandem migrate`` all of them)."""
    from tandem.core.database import asyncpg_dsn

    if _APP_ROLE.fullmatch(role) is None:
        raise ValueError(f"invalid role name {role!r}")
    statements = [
        f"REVOKE CREATE ON SCHEMA public FROM {role}",
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"REVOKE UPDATE, DELETE, TRUNCATE ON {', '.join(_APPEND_ONLY)} FROM {role}",
        # Keys are made and revoked by the owner (`tandem keys`); the app only registers its
        # configured key and dates their use: it can neither revive nor widen one.
        f"REVOKE UPDATE, DELETE, TRUNCATE ON api_keys FROM {role}",
        f"GRANT UPDATE (last_used_at) ON api_keys TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
        f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role}",
        # By name, the owner's functions that PUBLIC may not execute.
        *(f"GRANT EXECUTE ON FUNCTION {function.signature} TO {role}" for function in functions),
    ]

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with conn.transaction():
                for statement in statements:
                    await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@functools.cache
def head_revision() -> str:
    """The latest migration this code ships. Read once per process: the files do not change
    under a running process (a release is a new process), and reading them costs milliseconds
    of CPU, which made every readiness probe (anonymous) a cheap way to load an instance."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
