"""Migrations against a real PostgreSQL, and readiness following the schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
from alembic import command

from tandem.core.database import asyncpg_dsn
from tandem.core.migrations import alembic_config, head_revision, upgrade_to_head
from tests.support import empty_database, http_get, start_server


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(query)
    finally:
        await conn.close()


def test_upgrade_creates_schema_and_plan_user(postgres_url: str) -> None:
    """Upgrading an empty database creates the tables, the CHECK and user 1 with 10000."""
    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        users = asyncio.run(_fetch(url, "SELECT id, balance FROM users"))
        assert [(r["id"], r["balance"]) for r in users] == [(1, 10_000)]
        checks = asyncio.run(_fetch(url, "SELECT conname FROM pg_constraint WHERE contype = 'c'"))
        assert "ck_users_balance_not_negative" in {r["conname"] for r in checks}
        version = asyncio.run(_fetch(url, "SELECT version_num FROM alembic_version"))
        assert version[0]["version_num"] == head_revision()


def test_concurrent_upgrades_serialise(postgres_url: str) -> None:
    """Four `tandem migrate` processes at once all succeed, and the schema is created once."""
    with empty_database(postgres_url) as url:
        env = {**os.environ, "TANDEM_DATABASE_URL": url}
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "tandem", "migrate"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=120)[0].decode() for p in processes]
        assert [p.returncode for p in processes] == [0] * 4, outputs
        users = asyncio.run(_fetch(url, "SELECT count(*) AS n FROM users"))
        assert users[0]["n"] == 1


def test_downgrade_and_upgrade_round_trip(postgres_url: str) -> None:
    """Every migration can be undone and applied again."""
    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        command.downgrade(alembic_config(url), "base")
        tables = asyncio.run(
            _fetch(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        )
        assert {r["tablename"] for r in tables} <= {"alembic_version"}
        upgrade_to_head(url)


def test_readiness_follows_schema(postgres_url: str, tmp_path: Path) -> None:
    """An instance on an unmigrated database is live but not ready; ready once migrated."""
    with empty_database(postgres_url) as url:
        server = start_server(url, tmp_path)
        try:
            assert http_get(f"{server.url}/health/live").status_code == 200
            not_ready = http_get(f"{server.url}/health/ready")
            assert not_ready.status_code == 503
            assert not_ready.json()["status"] == "not_ready"
            upgrade_to_head(url)
            assert http_get(f"{server.url}/health/ready").status_code == 200
        finally:
            server.stop()


def test_session_deadlines_are_the_databases_defaults(postgres_url: str) -> None:
    """After the migrations, the server-side deadlines are the database's defaults (no startup
    parameter needed: a new session has them), and a value the operator set before is kept."""
    with empty_database(postgres_url) as url:
        name = url.rsplit("/", 1)[1].split("?")[0]
        asyncio.run(_fetch(url, f"ALTER DATABASE \"{name}\" SET statement_timeout = '42s'"))
        upgrade_to_head(url)
        shown = {
            setting: asyncio.run(_fetch(url, f"SHOW {setting}"))[0][0]
            for setting in ("statement_timeout", "idle_in_transaction_session_timeout")
        }
        # The TCP settings read 0 on a Unix socket (the embedded server's): check the defaults.
        rows = asyncio.run(
            _fetch(
                url,
                "SELECT unnest(setconfig) AS c FROM pg_db_role_setting WHERE setrole = 0 AND "
                "setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
        )
    assert shown == {"statement_timeout": "42s", "idle_in_transaction_session_timeout": "10s"}
    assert {r["c"] for r in rows} == {
        "statement_timeout=42s",
        "idle_in_transaction_session_timeout=10s",
        "tcp_keepalives_idle=5",
        "tcp_keepalives_interval=2",
        "tcp_keepalives_count=3",
        "tcp_user_timeout=10000",
    }
