"""Liveness and readiness.

Live: the process answers. Ready: the database answers and its schema is at the latest
migration this code knows (an instance must not take traffic against an older schema).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from tandem.core.migrations import head_revision


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    database: str
    schema_revision: str | None
    expected_revision: str


async def check_readiness(pool: asyncpg.Pool, wait_seconds: float = 2.0) -> Readiness:
    expected = head_revision()
    try:
        revision = await pool.fetchval(
            "SELECT version_num FROM alembic_version", timeout=wait_seconds
        )
    except asyncpg.UndefinedTableError:
        return Readiness(False, "ok", None, expected)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return Readiness(False, f"unavailable: {type(error).__name__}", None, expected)
    return Readiness(revision == expected, "ok", revision, expected)
