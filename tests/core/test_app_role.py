"""The application on its own least-privilege role (TANDEM_DATABASE_APP_ROLE): everything it
does works, and every forgery of money, keys or audit rows is refused by PostgreSQL itself
(SQLSTATE 42501), the expand keeping the old rights until no older instance is live."""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid
from collections.abc import Iterator
from datetime import timedelta

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from tandem.access import repository as access_repository
from tandem.access import service as access_service
from tandem.cli.migrate import cmd_migrate
from tandem.core.database import asyncpg_dsn
from tandem.core.migrations import (
    CHANGE_STREAM_REVISION,
    CONTRACT_REVISION,
    CONTRACTS,
    EXPAND_REVISION,
    GROUP_COMMIT_REVISION,
    HOLDS_CONTRACT_REVISION,
    HOLDS_EXPAND_REVISION,
    OPTIONAL,
    ContractWaitsError,
    alembic_config,
    head_revision,
    ready_revisions,
    upgrade_to_head,
)
from tandem.core.settings import Settings, get_settings
from tandem.scheduler import repository as scheduler_repository
from tandem.scheduler.runner import task_row
from tandem.wallet import repository as wallet_repository
from tests.access.routes import GONE, PUBLIC_HOOK, ROUTES, SCHEDULE, SCHEDULE_BODY, TASK
from tests.scheduler.registries import definition
from tests.support import API_KEY, AUTH, empty_database, fetch, in_process, query, value


def test_the_expand_and_the_contract_are_named_right() -> None:
    """core.migrations names the revisions of each pair (renumbering them means renaming
    these): each contract directly follows its expand, and only a contract or an optional
    expand may be left pending."""
    scripts = ScriptDirectory.from_config(alembic_config())
    pairs = {CONTRACT_REVISION: EXPAND_REVISION, HOLDS_CONTRACT_REVISION: HOLDS_EXPAND_REVISION}
    for contract_revision, expand_revision in pairs.items():
        contract = scripts.get_revision(contract_revision)
        assert contract is not None
        assert contract.down_revision == expand_revision
        assert scripts.get_revision(expand_revision) is not None
    # Below the head, each contract or optional expand not applied yet is ready too, down to
    # the first revision that is neither (today: 0019 and 0018 optional, then the holds'
    # contract, then its expand); nothing below that.
    expected, script = {head_revision()}, scripts.get_revision(head_revision())
    while script is not None and script.revision in CONTRACTS | OPTIONAL:
        below = script.down_revision
        assert isinstance(below, str)
        expected.add(below)
        script = scripts.get_revision(below)
    assert {GROUP_COMMIT_REVISION, CHANGE_STREAM_REVISION} <= OPTIONAL
    assert {GROUP_COMMIT_REVISION, HOLDS_CONTRACT_REVISION, HOLDS_EXPAND_REVISION} <= expected
    assert ready_revisions() == expected


def _migrate(monkeypatch: pytest.MonkeyPatch, url: str, role: str, key: bool = True) -> None:
    """`tandem migrate` as a deployment runs it: the owner's URL, the app role, and (``key``)
    the suite's key in TANDEM_API_KEY (conftest.py sets it)."""
    monkeypatch.setenv("TANDEM_DATABASE_URL", url)
    monkeypatch.setenv("TANDEM_DATABASE_APP_ROLE", role)
    if not key:
        monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    get_settings.cache_clear()
    try:
        assert cmd_migrate(argparse.Namespace()) == 0
    finally:
        get_settings.cache_clear()


def _as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password="app").render_as_string(hide_password=False)


def _new_role(url: str) -> str:
    role = f"tandem_app_{uuid.uuid4().hex[:8]}"
    query(url, f"CREATE ROLE {role} LOGIN PASSWORD 'app'")
    return role


def _drop_role(url: str, role: str) -> None:
    query(url, f"DROP OWNED BY {role}")
    query(url, f"DROP ROLE {role}")


@pytest.fixture(scope="module")
def migrated(postgres_url: str) -> Iterator[tuple[str, str]]:
    """A fresh database that `tandem migrate` made (with TANDEM_DATABASE_APP_ROLE and the
    suite's key), and the URL of that role (roles are cluster-wide: dropped afterwards)."""
    with empty_database(postgres_url) as url:
        role = _new_role(url)
        try:
            with pytest.MonkeyPatch.context() as monkeypatch:
                _migrate(monkeypatch, url, role)
            # What the routes act on, made by the owner: a task, two users, a transfer.
            query(
                url,
                "INSERT INTO tasks (name, \"interval\", function_name) VALUES ($1, '1 hour', 'x')",
                TASK,
            )
            yield url, _as_role(url, role)
        finally:
            _drop_role(url, role)


async def test_every_route_works_on_the_app_role(migrated: tuple[str, str]) -> None:
    """Each route answers as it does on the owner, through the owner functions, and the
    ledger stays verified; the key was registered by `tandem migrate`, not the app."""
    owner_url, app_url = migrated
    settings = Settings(database_url=app_url, scheduler_enabled=False, maintenance_enabled=False)
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as client,
    ):
        made = [await client.post("/users", json={"balance": 1000}) for _ in range(2)]
        assert [m.status_code for m in made] == [201, 201], made[0].text
        user, other = (m.json()["userId"] for m in made)
        moved = await client.post("/transfers", json={"fromUserId": user, "toUserId": other})
        assert moved.status_code == 422  # no amount: refused before the database
        moved = await client.post(
            "/transfers", json={"fromUserId": user, "toUserId": other, "amount": 5}
        )
        assert moved.status_code == 201, moved.text
        ids = {"user": user, "other": other, "transfer": moved.json()["transferId"]}
        for name in ("hold", "released"):
            held = await client.post(
                "/holds", json={"userId": user, "amount": 5, "toUserId": other}
            )
            assert held.status_code == 201, held.text
            ids[name] = held.json()["holdId"]
        for name in ("endpoint", "doomed"):
            hook = await client.post("/webhook-endpoints", json={"url": PUBLIC_HOOK})
            assert hook.status_code == 201, hook.text
            ids[name] = hook.json()["id"]
        for name in (SCHEDULE, GONE):
            scheduled = await client.post("/schedules", json={"name": name, **SCHEDULE_BODY})
            assert scheduled.status_code == 201, scheduled.text
        keyed = {"Idempotency-Key": "on-the-app-role"}
        deposit = {"userId": user, "amount": 7}
        for _ in range(2):  # the retry is a replay
            answer = await client.post("/balance/update", json=deposit, headers=keyed)
            assert answer.status_code == 200, answer.text
        for route in ROUTES:
            body = route.body(ids) if route.body else None
            answer = await client.request(
                route.method, route.path.format(**ids), json=body, headers=route.headers
            )
            assert answer.status_code == route.ok, (route, answer.text[:300])
        assert (await client.get("/health/ready")).status_code == 200
    conn = await asyncpg.connect(asyncpg_dsn(owner_url))
    try:
        verified = await wallet_repository.verify_ledger(conn, 60.0)
    finally:
        await conn.close()
    assert verified is not None  # no other verification runs on this database
    assert verified.mismatches == 0
    assert verified.entries >= 7


async def test_a_login_and_a_logout_work_on_the_app_role(migrated: tuple[str, str]) -> None:
    """A session starts from the key typed in the login form and ends at logout, through the
    owner's functions; a token of no key starts none; housekeeping (DELETE) prunes it."""
    owner_url, app_url = migrated
    settings = Settings(database_url=app_url, scheduler_enabled=False, maintenance_enabled=False)
    site = "http://t"
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url=site) as browser,
    ):
        browser.cookies = None  # type: ignore[assignment]
        answer = await browser.post("/login", data={"key": API_KEY}, headers={"Origin": site})
        assert answer.status_code == 303, answer.text
        session = answer.headers["set-cookie"].partition("=")[2].partition(";")[0]
        with_cookie = {"Cookie": f"tandem_session={session}", "Origin": site}
        assert (await browser.get("/openapi.json", headers=with_cookie)).status_code == 200
        assert (await browser.post("/logout", headers=with_cookie)).status_code == 303
        assert (await browser.get("/openapi.json", headers=with_cookie)).status_code == 401
    conn = await asyncpg.connect(asyncpg_dsn(app_url))
    try:
        assert (
            await conn.fetchval("SELECT tandem_start_session_v1('tdm_nokey', sha256('s'), 60)")
            is None
        )
        assert await access_repository.prune_sessions(conn, timedelta(0), 100) >= 1
    finally:
        await conn.close()
    assert (await fetch(owner_url, "SELECT count(*) FROM browser_sessions"))[0][0] == 0


async def test_the_scheduler_works_on_the_app_role(migrated: tuple[str, str]) -> None:
    """The scheduler's functions (executable by PUBLIC, as its caller) and its tables."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated[1]))
    try:
        await scheduler_repository.register_instance(conn, "probe", "host", 1)
        probe = definition("probe.task", timedelta(hours=1))
        now = await scheduler_repository.database_now(conn)
        await scheduler_repository.upsert_task(conn, task_row(probe, now))
        assert await scheduler_repository.open_session(conn, "probe", 10.0) is not None
    finally:
        await conn.close()


# Each, run by the application's role after the contract, is refused by PostgreSQL.
FORGERIES = {
    "an all-scope key": "INSERT INTO api_keys (name, token_sha256, scopes) "
    "VALUES ('forged', sha256('x'), '{all}')",
    "a key revived": "UPDATE api_keys SET revoked_at = NULL",
    "a key widened": "UPDATE api_keys SET scopes = '{all}'",
    "a key deleted": "DELETE FROM api_keys",
    "a balance change alone": "UPDATE users SET balance = balance + 1000",
    "a balance change with its journal row": """
        WITH changed AS (
            UPDATE users SET balance = balance + 1000 WHERE id = 1 RETURNING id, balance
        )
        INSERT INTO ledger_entries (user_id, amount, balance, kind, api_key_id)
        SELECT id, 1000, balance, 'deposit', (SELECT min(id) FROM api_keys) FROM changed""",
    "a journal row alone": "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
    "VALUES (1, 1, 1, 'deposit')",
    "a transfer row": "INSERT INTO transfers (from_user_id, to_user_id, amount) VALUES (1, 1, 1)",
    "a bare user": "INSERT INTO users DEFAULT VALUES",
    "a user with a balance": "INSERT INTO users (balance) VALUES (1000)",
    "a user deleted": "DELETE FROM users",
    "the journal rewritten": "UPDATE ledger_entries SET amount = 0",
    "a transfer deleted": "DELETE FROM transfers",
    "the journal truncated": "TRUNCATE ledger_entries",
    "the task audit deleted": "DELETE FROM task_actions",
    "the task audit rewritten": "UPDATE task_actions SET action = 'run'",
    "the task audit truncated": "TRUNCATE task_actions",
    "the mint ceiling lifted": "UPDATE wallet_settings SET daily_mint_ceiling = NULL",
    "the mint ceiling read": "SELECT daily_mint_ceiling FROM wallet_settings",
    "the mint count reset": "DELETE FROM mint_usage",
    "a function not granted": "SELECT tandem_mint_allowed_v1(1)",
    "holds released without their functions": "SELECT * FROM tandem_release_expired_v1(1)",
    "a hold forged": "INSERT INTO holds (user_id, amount, status, expires_at, available_after) "
    "VALUES (1, 1, 'active', 'infinity', 0)",
    "held given back by hand": "UPDATE users SET held = 0",
    "a hold released by hand": "UPDATE holds SET status = 'released'",
    "a hold deleted": "DELETE FROM holds",
    "a hold event forged": "INSERT INTO hold_events (hold_id, kind, amount) "
    "SELECT min(id), 'released', 1 FROM holds",
    "the hold events deleted": "DELETE FROM hold_events",
    # The change stream: written only with the change it reports, stamped and pruned only by
    # the owner's functions.
    "an event forged": "INSERT INTO events (type, user_id, data) "
    "VALUES ('balance.updated', 1, '{}')",
    "an event rewritten": "UPDATE events SET data = '{}'",
    "an event stamped by hand": "UPDATE events SET position = 1",
    "the events deleted": "DELETE FROM events",
    "the stream's end moved": "UPDATE event_stream SET last_position = 0",
    "a trigger function called": "SELECT tandem_events_from_entries_v1()",
    "the previous release's transfer": "SELECT * FROM tandem_transfer_v1(1, 2, 1, '', '', 1)",
    # A browser session for the `all` key with a token hash the app chose: its cookie would
    # act as that key. Sessions start only from the key's own token (tandem_start_session_v1).
    "a session forged": "INSERT INTO browser_sessions (token_sha256, api_key_id, expires_at) "
    "SELECT sha256('forged'), min(id), now() + interval '1 hour' FROM api_keys",
    "a session revived": "UPDATE browser_sessions SET ended_at = NULL",
    "a session prolonged": "UPDATE browser_sessions SET expires_at = 'infinity'",
    "a table made": "CREATE TABLE intruder (id int)",
    "a table dropped": "DROP TABLE users",
    "the journal's triggers off": "ALTER TABLE ledger_entries DISABLE TRIGGER ALL",
    "a function replaced": "CREATE OR REPLACE FUNCTION tandem_mint_allowed_v1(p_amount bigint) "
    "RETURNS boolean LANGUAGE sql AS 'SELECT true'",
}


@pytest.mark.parametrize("statement", FORGERIES.values(), ids=list(FORGERIES))
async def test_forgery_is_refused(migrated: tuple[str, str], statement: str) -> None:
    """PostgreSQL refuses it with insufficient_privilege (42501), and nothing changes."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated[1]))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
            async with conn.transaction():
                await conn.execute(statement)
        assert refused.value.sqlstate == "42501"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    ["DELETE FROM task_actions", "UPDATE task_actions SET action = 'run'", "TRUNCATE task_actions"],
)
def test_audit_rows_are_append_only_for_the_owner_too(
    migrated: tuple[str, str], statement: str
) -> None:
    """The statement-level triggers refuse the owner as well (even with no row matching)."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="task_actions is append-only"):
        query(migrated[0], statement)


def test_the_app_role_owns_nothing(migrated: tuple[str, str]) -> None:
    """No table, sequence, view, function or type belongs to the application's role."""
    role = make_url(migrated[1]).username
    owned = value(
        migrated[0],
        """
        SELECT (SELECT count(*) FROM pg_class WHERE relowner = $1::regrole)
             + (SELECT count(*) FROM pg_proc WHERE proowner = $1::regrole)
             + (SELECT count(*) FROM pg_type WHERE typowner = $1::regrole)
        """,
        role,
    )
    assert owned == 0


@pytest.fixture
def unmigrated(postgres_url: str) -> Iterator[tuple[str, str]]:
    """An empty database and a new role (not granted anything yet)."""
    with empty_database(postgres_url) as url:
        role = _new_role(url)
        try:
            yield url, role
        finally:
            _drop_role(url, role)


async def test_key_commands_on_the_app_role_say_to_use_the_owner(
    migrated: tuple[str, str],
) -> None:
    """`tandem keys create` and `revoke` on the app's role: a clear refusal, not a traceback."""
    conn = await asyncpg.connect(asyncpg_dsn(migrated[1]))
    try:
        with pytest.raises(access_service.KeyCommandError, match="owner's URL"):
            await access_service.create_key(conn, "made-by-the-app", ["wallet:read"])
        with pytest.raises(access_service.KeyCommandError, match="owner's URL"):
            await access_service.revoke_key(conn, "bootstrap")
    finally:
        await conn.close()


async def _write_rights(owner_url: str, role: str) -> set[tuple[str, str]]:
    rows = await fetch(
        owner_url,
        """
        SELECT t, p FROM unnest($2::text[]) t, unnest(ARRAY['INSERT', 'UPDATE', 'DELETE']) p
        WHERE has_table_privilege($1, t, p)
        """,
        role,
        ["users", "ledger_entries", "transfers", "api_keys", "task_actions"],
    )
    return {(r[0], r[1]) for r in rows}


async def test_the_contract_waits_for_an_older_live_instance(
    unmigrated: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While an instance of a release before the expand holds its session, `tandem migrate`
    applies the expand, keeps the old rights (that release still inserts and updates), says
    the contract waits, and succeeds; once the instance is gone, the contract revokes them."""
    url, role = unmigrated
    await asyncio.to_thread(command.upgrade, alembic_config(url), EXPAND_REVISION)
    older = await asyncpg.connect(asyncpg_dsn(url))
    try:
        # An instance of the previous release: no revision on its row.
        await older.execute(
            "INSERT INTO instances (id, hostname, pid) VALUES ('older-release', 'h', 1)"
        )
        assert await scheduler_repository.open_session(older, "older-release", 60.0)
        await asyncio.to_thread(_migrate, monkeypatch, url, role, False)
        said = capsys.readouterr().out
        assert f"database at revision {EXPAND_REVISION}" in said
        assert f"{CONTRACT_REVISION} waits" in said
        assert "older-release" in said
        rights = await _write_rights(url, role)
        assert {("users", "INSERT"), ("users", "UPDATE"), ("api_keys", "INSERT")} <= rights
        # A release is upgraded from the one before it: this one needs the holds (0016), so it
        # is not ready on 0014 (the release whose head was 0015 was, and served meanwhile).
        settings = Settings(
            database_url=_as_role(url, role),
            api_key=API_KEY,
            scheduler_enabled=False,
            maintenance_enabled=False,
        )
        async with (
            in_process(settings) as transport,
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            assert (await client.get("/health/ready")).status_code == 503
            # Before the contract the app may still register its key itself.
            answer = await client.post("/users", json={"balance": 0}, headers=AUTH)
            assert answer.status_code == 201, answer.text
        with pytest.raises(ContractWaitsError):
            await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
    finally:
        await older.close()
    await asyncio.to_thread(_migrate, monkeypatch, url, role, False)
    assert f"database at revision {head_revision()}" in capsys.readouterr().out
    assert await _write_rights(url, role) == set()
    dates_use = "SELECT has_column_privilege($1, 'api_keys', 'last_used_at', 'UPDATE')"
    assert (await fetch(url, dates_use, role))[0][0]
    assert await asyncio.to_thread(upgrade_to_head, url) is None


async def test_holds_wait_for_the_previous_release_to_be_gone(
    unmigrated: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """While an instance of the release before holds (its revision 0015) holds its session,
    `tandem migrate` applies the holds' expand (0016) with holds off, says their contract
    waits, and succeeds: this release is ready and answers POST /holds 503
    holds_unavailable, everything else as usual. Once that instance is gone, `tandem migrate`
    applies the contract and holds work."""
    url, role = unmigrated
    await asyncio.to_thread(command.upgrade, alembic_config(url), CONTRACT_REVISION)
    settings = Settings(
        database_url=_as_role(url, role),
        api_key=API_KEY,
        scheduler_enabled=False,
        maintenance_enabled=False,
    )
    older = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await older.execute(
            "INSERT INTO instances (id, hostname, pid, revision) "
            "VALUES ('previous-release', 'h', 1, $1)",
            CONTRACT_REVISION,
        )
        assert await scheduler_repository.open_session(older, "previous-release", 60.0)
        await asyncio.to_thread(_migrate, monkeypatch, url, role)
        said = capsys.readouterr().out
        assert f"database at revision {HOLDS_EXPAND_REVISION}" in said
        assert f"{HOLDS_CONTRACT_REVISION} waits" in said
        assert "previous-release" in said
        async with (
            in_process(settings) as transport,
            httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as client,
        ):
            assert (await client.get("/health/ready")).status_code == 200
            made = await client.post("/users", json={"balance": 0})
            assert made.status_code == 201, made.text
            user = made.json()["userId"]
            refused = await client.post("/holds", json={"userId": 1, "amount": 5})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "holds_unavailable"
            moved = {"fromUserId": 1, "toUserId": user, "amount": 5}
            assert (await client.post("/transfers", json=moved)).status_code == 201
    finally:
        await older.close()
    await asyncio.to_thread(_migrate, monkeypatch, url, role)
    assert f"database at revision {head_revision()}" in capsys.readouterr().out
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as client,
    ):
        made = await client.post("/holds", json={"userId": 1, "amount": 5})
        assert made.status_code == 201, made.text


async def test_an_unregistered_key_is_reported_not_inserted(
    unmigrated: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the contract the app cannot register its configured key: it says how to, serves
    on, and the key stays unknown (401) until the owner registers it (`tandem migrate`)."""
    url, role = unmigrated
    # Without a key: migrate succeeds.
    await asyncio.to_thread(_migrate, monkeypatch, url, role, False)
    settings = Settings(
        database_url=_as_role(url, role),
        api_key=API_KEY,
        scheduler_enabled=False,
        maintenance_enabled=False,
    )
    with caplog.at_level(logging.ERROR):
        async with (
            in_process(settings) as transport,
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            assert (await client.get("/tasks", headers=AUTH)).status_code == 401
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "may not register keys" in said, said
    assert "tandem migrate" in said
    assert (await fetch(url, "SELECT count(*) FROM api_keys"))[0][0] == 0


async def test_the_role_cannot_create_even_where_public_could(
    unmigrated: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cluster upgraded from PostgreSQL 14 or older gives PUBLIC CREATE on the schema
    public: `tandem migrate` takes it, so the app's role can make no object that would shadow
    a builtin an owner function names."""
    url, role = unmigrated
    await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
    await fetch(url, "GRANT CREATE ON SCHEMA public TO PUBLIC")
    assert (await fetch(url, "SELECT has_schema_privilege($1, 'public', 'CREATE')", role))[0][0]
    await asyncio.to_thread(_migrate, monkeypatch, url, role, False)
    assert not (await fetch(url, "SELECT has_schema_privilege($1, 'public', 'CREATE')", role))[0][0]
    conn = await asyncpg.connect(asyncpg_dsn(_as_role(url, role)))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "CREATE FUNCTION public.sha256(text) RETURNS bytea LANGUAGE sql "
                "AS 'SELECT NULL::bytea'"
            )
    finally:
        await conn.close()


async def test_the_contracts_downgrade_gives_the_expands_rights_back(
    unmigrated: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down from the contract, the app's role has the rights the release before it writes
    with (those `tandem migrate` grants at the expand), without rerunning migrate; still none
    on the owner's tables."""
    url, role = unmigrated
    await asyncio.to_thread(_migrate, monkeypatch, url, role, False)
    contracted = await _write_rights(url, role)
    assert contracted == set()
    await asyncio.to_thread(command.downgrade, alembic_config(url), EXPAND_REVISION)
    rights = await _write_rights(url, role)
    assert {("users", "INSERT"), ("users", "UPDATE"), ("api_keys", "INSERT")} <= rights
    assert ("ledger_entries", "UPDATE") not in rights
    sessions = await fetch(
        url, "SELECT has_table_privilege($1, 'browser_sessions', 'INSERT')", role
    )
    assert sessions[0][0]
    owner_only = await fetch(
        url, "SELECT has_table_privilege($1, 'wallet_settings', 'SELECT')", role
    )
    assert not owner_only[0][0]
