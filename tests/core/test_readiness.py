"""Readiness follows the schema, the app in process: live at once on an unmigrated database,
ready only once the migrations have run."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tandem.core.migrations import head_revision, upgrade_to_head
from tests.support import app_settings, empty_database, in_process_client


@pytest.fixture
def unmigrated_url(postgres_url: str) -> Iterator[str]:
    """An empty database of the test's own: no migration has run."""
    with empty_database(postgres_url) as url:
        yield url


async def test_readiness_follows_schema(unmigrated_url: str) -> None:
    """An instance on an unmigrated database is live but not ready; ready once migrated."""
    async with in_process_client(app_settings(unmigrated_url)) as client:
        assert (await client.get("/health/live")).status_code == 200
        not_ready = await client.get("/health/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["status"] == "not_ready"
        # The migrations run beside the live instance, as `tandem migrate` would (alembic runs
        # its own event loop: in a thread of its own).
        await asyncio.to_thread(upgrade_to_head, unmigrated_url)
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready"


async def test_readiness_reads_the_migration_files_once(database_url: str) -> None:
    """Readiness compares the database with the head revision this code ships, read from the
    migration files once per process, not per probe (an anonymous route must stay cheap)."""
    async with in_process_client(app_settings(database_url)) as client:
        assert (await client.get("/health/ready")).status_code == 200
        reads = head_revision.cache_info().misses
        for _ in range(20):
            assert (await client.get("/health/ready")).status_code == 200
        assert head_revision.cache_info().misses == reads
