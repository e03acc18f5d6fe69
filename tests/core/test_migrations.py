"""Migrations against a real PostgreSQL, and readiness following the schema."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory

from tandem.core.database import asyncpg_dsn
from tandem.core.migrations import alembic_config, head_revision, upgrade_to_head
from tandem.models import metadata
from tests.support import empty_database, query


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


# The catalog of the public schema, each part a set of rows that say everything a migration
# decides (column positions excepted: a column added later sits last, one dropped and added
# again too).
CATALOG: dict[str, str] = {
    "tables": """
        SELECT c.relname, c.relkind::text FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')""",
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v')
          AND a.attnum > 0 AND NOT a.attisdropped""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype::text, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "sequences": """
        SELECT sequencename, data_type::text, cycle FROM pg_sequences
        WHERE schemaname = 'public'""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'public'""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_function_result(p.oid), p.prosrc, p.prosecdef, p.provolatile::text,
               p.proconfig::text, p.proacl::text
        FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE NOT tgisinternal""",
}


async def _catalog(url: str, parts: tuple[str, ...] = tuple(CATALOG)) -> dict[str, set[tuple]]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return {part: {tuple(row) for row in await conn.fetch(CATALOG[part])} for part in parts}
    finally:
        await conn.close()


def catalog(url: str, parts: tuple[str, ...] = tuple(CATALOG)) -> dict[str, set[tuple]]:
    return asyncio.run(_catalog(url, parts))


def test_each_downgrade_step_leaves_the_schema_of_a_fresh_upgrade(postgres_url: str) -> None:
    """From head, one revision down at a time to base: after each step the catalog (tables,
    columns with types, nullability and defaults, indexes, constraints, sequences, views,
    functions, triggers) is that of a new database upgraded to that revision; then head again
    from base. The new database's catalogs are read on its way up, one revision at a time (each
    upgrade runs the same migration a straight one does: one walk, not one per revision)."""
    script = ScriptDirectory.from_config(alembic_config())
    revisions = [r.revision for r in script.walk_revisions()]  # head first
    assert revisions[0] == head_revision()
    targets = [*revisions[1:], "base"]
    with empty_database(postgres_url) as fresh:
        command.upgrade(alembic_config(fresh), "base")  # its version table, as a downgrade's
        expected = {"base": catalog(fresh)}
        for revision in reversed(revisions):
            command.upgrade(alembic_config(fresh), revision)
            expected[revision] = catalog(fresh)
    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        assert catalog(url) == expected[revisions[0]]
        for above, target in zip(revisions, targets, strict=True):
            command.downgrade(alembic_config(url), "-1")
            stepped = catalog(url)
            for part in CATALOG:
                assert stepped[part] == expected[target][part], (
                    f"after downgrading {above} to {target}: {part} differ\n"
                    f"  left behind: {sorted(stepped[part] - expected[target][part])}\n"
                    f"  missing: {sorted(expected[target][part] - stepped[part])}"
                )
        upgrade_to_head(url)
        assert catalog(url) == expected[revisions[0]]


def test_models_create_the_schema_the_migrations_make(postgres_url: str) -> None:
    """The models, created as they are (metadata.create_all), make the tables, columns,
    defaults, indexes and constraints the migrations make, including what autogenerate does
    not compare (CHECK and exclusion constraints, partial indexes' predicates)."""
    parts = ("columns", "indexes", "constraints")
    with empty_database(postgres_url) as migrated, empty_database(postgres_url) as modelled:
        upgrade_to_head(migrated)
        expected = catalog(migrated, parts)
        engine = sa.create_engine(sa.make_url(modelled).set(drivername="postgresql+psycopg"))
        try:
            with engine.begin() as connection:
                metadata.create_all(connection)
        finally:
            engine.dispose()
        made = catalog(modelled, parts)

    def schema_only(rows: set[tuple]) -> set[tuple]:
        # Only the migrations' bookkeeping table and the view are not models.
        return {r for r in rows if r[0] not in {"alembic_version", "instance_sessions"}}

    for part in parts:
        assert schema_only(made[part]) == schema_only(expected[part]), (
            f"{part} differ\n  models only: {sorted(schema_only(made[part] - expected[part]))}"
            f"\n  migrations only: {sorted(schema_only(expected[part] - made[part]))}"
        )


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


def test_downgrading_the_limits_revokes_the_limited_keys(postgres_url: str) -> None:
    """Below 0013 a key has no limits: a limited key is revoked by the downgrade rather than
    left to become unlimited (as 0012's downgrade does for bound and expiring keys); a key
    without limits stays live."""
    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        for name, limits in (
            ("plain", "NULL, NULL, NULL, NULL"),
            ("debit-day", "NULL, NULL, 10, NULL"),
            ("debit-minute", "1, NULL, NULL, NULL"),
            ("rated", "NULL, NULL, NULL, 5"),
        ):
            rate_seconds = "60" if name == "rated" else "NULL"
            query(
                url,
                "INSERT INTO api_keys (name, token_sha256, scopes, debit_per_minute, "
                "debit_per_hour, debit_per_day, rate_requests, rate_seconds) "
                f"VALUES ($1::text, sha256(convert_to($1::text, 'UTF8')), '{{wallet:read}}', "
                f"{limits}, {rate_seconds})",
                name,
            )
        command.downgrade(alembic_config(url), "0012_bound_keys")
        live = query(url, "SELECT name FROM api_keys WHERE revoked_at IS NULL ORDER BY name")
        assert [row["name"] for row in live] == ["plain"]


def test_downgrading_below_holds_refuses_while_a_hold_is_active(postgres_url: str) -> None:
    """Below 0016 there is no held: an active hold's amount would become spendable unnoticed,
    so the downgrade refuses (nothing changed) until the hold is released."""
    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        made = query(
            url, "SELECT hold_id FROM tandem_create_hold_v1(1, NULL, 5, 600, NULL, NULL, NULL)"
        )
        with pytest.raises(RuntimeError, match="1 holds are active"):
            command.downgrade(alembic_config(url), "0015_app_role_contract")
        assert query(url, "SELECT version_num FROM alembic_version")[0][0] == head_revision()
        query(url, "SELECT * FROM tandem_release_hold_v1($1, NULL, NULL)", made[0]["hold_id"])
        command.downgrade(alembic_config(url), "0015_app_role_contract")
        assert query(url, "SELECT balance FROM users WHERE id = 1")[0][0] == 10_000
