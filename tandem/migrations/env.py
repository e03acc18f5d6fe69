"""Alembic environment: runs migrations over the async engine, URL from the caller or settings
(the direct URL: migrations need a real session, not a pooler's transaction).

``target_metadata`` is every table's model (tandem/models.py), so ``alembic revision
--autogenerate`` and ``alembic check`` compare the whole schema. What autogenerate cannot
compare is left out of the comparison by name, in NOT_COMPARED, each with its reason; the
catalog test (tests/core/test_schema.py) checks those objects instead.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from alembic import context
from alembic.operations.ops import MigrationScript
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.schema import SchemaItem

from tandem.core import locks
from tandem.core.database import open_connection
from tandem.core.settings import get_settings
from tandem.models import metadata

target_metadata = metadata

# What autogenerate cannot compare, by name, each with its reason; left out of the comparison
# so that it never proposes to create or drop them. They are compared elsewhere: the models
# against a migrated database by the catalog (tests/core/test_migrations.py, which also sees
# partial indexes' predicates, CHECK constraints and exclusion constraints, none of which
# autogenerate compares), and server-side functions and triggers against their files and
# declarations (tests/core/test_schema.py). Server-side functions and triggers are not
# reflected at all, so they need no entry.
NOT_COMPARED: dict[str, str] = {
    # Reflection does not report exclusion constraints; were it to, the model's would be
    # proposed as a new one every time.
    "ex_task_history_no_overlap": "exclusion constraint (no reflection)",
    # A view reflects as a table no model maps: it would be proposed for dropping.
    "instance_sessions": "view over pg_locks (the instances' live sessions)",
}


def include_object(
    item: SchemaItem,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: SchemaItem | None,
) -> bool:
    return name not in NOT_COMPARED


def process_revision_directives(
    context: MigrationContext, revision: object, directives: list[MigrationScript]
) -> None:
    """A new revision is numbered after the head and named by its message
    (``0012_holds`` for ``-m holds``), as the released ones are."""
    script = directives[0]
    head = (
        ScriptDirectory.from_config(context.config).get_current_head() if context.config else None
    )
    number = int(head.split("_", 1)[0]) + 1 if head else 1
    slug = re.sub(r"[^a-z0-9]+", "_", (script.message or "change").lower()).strip("_")
    script.rev_id = f"{number:04d}_{slug}"


def _url() -> str:
    url = context.config.attributes.get("database_url") or get_settings().require_direct_url()
    return str(url)


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_object=include_object,
        compare_server_default=True,
        process_revision_directives=process_revision_directives,
        **kwargs,
    )


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        # The database's own statement_timeout (migration 0006) is for the service, not for
        # building an index on a large table.
        connection.execute(text("SET LOCAL statement_timeout = 0"))
        # Instances that migrate on start may race: the second waits here, then finds
        # nothing to do. Held until the migration transaction ends.
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": locks.MIGRATION})
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
    _configure(url="postgresql://", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
