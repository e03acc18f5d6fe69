"""The application on its own least-privilege role (TANDEM_DATABASE_APP_ROLE): everything it
does works, and what it must never do is refused by PostgreSQL itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tandem.core.database import asyncpg_dsn
from tandem.core.migrations import grant_app_role, upgrade_to_head
from tandem.core.settings import Settings
from tandem.scheduler import repository as scheduler_repository
from tandem.scheduler.runner import task_row
from tests.scheduler.registries import definition
from tests.support import AUTH, empty_database, fetch, in_process, query


@pytest.fixture
def app_role_url(postgres_url: str) -> Iterator[str]:
    """A fresh database migrated by the owner, and the URL of a new role granted the app's
    rights on it (roles are cluster-wide: dropped afterwards)."""
    role = f"tandem_app_{uuid.uuid4().hex[:8]}"
    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        query(url, f"CREATE ROLE {role} LOGIN PASSWORD 'app'")
        try:
            grant_app_role(url, role)
            yield (
                make_url(url)
                .set(username=role, password="app")
                .render_as_string(hide_password=False)
            )
        finally:
            query(url, f"DROP OWNED BY {role}")
            query(url, f"DROP ROLE {role}")


async def test_the_app_works_on_its_role_and_cannot_rewrite_history(app_role_url: str) -> None:
    settings = Settings(
        database_url=app_role_url, scheduler_enabled=False, maintenance_enabled=False
    )
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as client,
    ):
        user = (await client.post("/users", json={"balance": 10})).json()["userId"]
        update = {"userId": user, "amount": -3}
        keyed = {"Idempotency-Key": "on-the-app-role"}
        assert (await client.post("/balance/update", json=update, headers=keyed)).is_success
        moved = await client.post(
            "/transfers", json={"fromUserId": user, "toUserId": 1, "amount": 2}
        )
        assert moved.status_code == 201, moved.text
        assert (await client.get(f"/balance/{user}/history")).is_success
        assert (await client.get("/health/ready")).status_code == 200

    conn = await asyncpg.connect(asyncpg_dsn(app_role_url))
    try:
        # The scheduler's server-side functions and sequences.
        await scheduler_repository.register_instance(conn, "probe", "host", 1)
        probe = definition("probe.task", timedelta(hours=1))
        now = await scheduler_repository.database_now(conn)
        await scheduler_repository.upsert_task(conn, task_row(probe, now))
        assert await scheduler_repository.open_session(conn, "probe", 10.0) is not None
        for statement in (
            "UPDATE ledger_entries SET amount = 0",
            "DELETE FROM transfers",
            "TRUNCATE ledger_entries",
            "CREATE TABLE intruder (id int)",
            "DROP TABLE users",
            "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
            "UPDATE api_keys SET revoked_at = NULL",
            "UPDATE api_keys SET scopes = '{all}'",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement)
    finally:
        await conn.close()
    entries = await fetch(app_role_url, "SELECT count(*) AS n FROM ledger_entries")
    assert entries[0]["n"] >= 4
