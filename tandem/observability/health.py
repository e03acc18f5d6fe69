"""Liveness and readiness.

Live: the process answers. Ready: the database answers and its schema is at the latest
migration this code knows (an instance must not take traffic against an older schema).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tandem.core.migrations import head_revision, ready_revisions

UNDEFINED_TABLE = "42P01"


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    database: str
    schema_revision: str | None
    expected_revision: str


async def check_readiness(engine: AsyncEngine, wait_seconds: float = 2.0) -> Readiness:
    """Uses the engine's pool, not the hot path's: under a burst the requests' pool has a queue,
    and readiness must not time out (and pull the instance) because the instance is busy."""
    expected = head_revision()
    try:
        async with asyncio.timeout(wait_seconds), engine.connect() as conn:
            revision = await conn.scalar(text("SELECT version_num FROM alembic_version"))
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == UNDEFINED_TABLE:  # never migrated
            return Readiness(False, "ok", None, expected)
        return Readiness(False, f"unavailable: {type(error.orig).__name__}", None, expected)
    except (OSError, TimeoutError) as error:
        return Readiness(False, f"unavailable: {type(error).__name__}", None, expected)
    # Ready on the head, or below a contract not applied yet (it only waits for older
    # releases to be gone: this code needs nothing it does).
    return Readiness(revision in ready_revisions(), "ok", revision, expected)
