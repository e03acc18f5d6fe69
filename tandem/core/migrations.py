"""Run and inspect Alembic migrations from code (the CLI, the app's readiness check, tests)."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Iterable
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


# Expand, then contract: the expand (0014) moved the application's writes of money, keys and
# audit rows into owner functions and kept the old rights, for the previous release's instances
# still running during a rolling deploy; the contract (0015) takes the rights away, and runs
# only when no live instance reports an older release (instances.revision, written on join).
EXPAND_REVISION = "0014_owner_functions"
CONTRACT_REVISION = "0015_app_role_contract"
# The same for holds: the expand (0016) makes them, off unless no older instance is live; the
# contract (0017) turns them on, and runs only when no live instance reports a release before
# the expand (those ignore users.held).
HOLDS_EXPAND_REVISION = "0016_holds"
HOLDS_CONTRACT_REVISION = "0017_holds_contract"
# Migrations that only wait for older releases to be gone: this code runs (and is ready) on a
# database that has not applied them yet.
CONTRACTS = frozenset({CONTRACT_REVISION, HOLDS_CONTRACT_REVISION})
# Expands this code runs without, doing without what they make: group commit's batch function
# (0018) comes after the holds' contract, which may wait; until it is applied every change
# goes alone (tandem/wallet/batching.py notices the missing function).
GROUP_COMMIT_REVISION = "0018_group_commit"
# The change stream (0019) likewise: until it is applied the events API answers 503 and the
# delivery worker waits.
CHANGE_STREAM_REVISION = "0019_change_stream"
# Schedules as data (0020) likewise: until it is applied this release's scheduler does not
# join (the previous release's instances run the cron meanwhile) and /schedules answers 503.
SCHEDULES_REVISION = "0020_schedules_as_data"
OPTIONAL = frozenset({GROUP_COMMIT_REVISION, CHANGE_STREAM_REVISION, SCHEDULES_REVISION})


class ContractWaitsError(RuntimeError):
    """A contract migration refused to run: live instances of an older release need the
    rights it takes away. ``before`` is the revision just before it."""

    def __init__(self, revision: str, before: str, instances: list[tuple[str, str | None]]) -> None:
        self.revision, self.before, self.instances = revision, before, instances
        listed = ", ".join(
            f"{name} ({found or 'before ' + EXPAND_REVISION})" for name, found in instances
        )
        super().__init__(
            f"migration {revision} waits: live instances run an older release ({listed}); "
            f"the database stays at {before}, which this release runs on. Replace them with "
            "this release, then run `tandem migrate` again."
        )


def upgrade_to_head(database_url: str) -> ContractWaitsError | None:
    """Apply every pending migration. Safe to repeat; concurrent callers serialise on an
    advisory lock taken inside the migration transaction (see migrations/env.py).

    When a contract migration refuses (older instances are live), everything before it is
    applied and its refusal is returned (not raised): this release runs on that revision."""
    config = alembic_config(database_url)
    try:
        command.upgrade(config, "head")
    except ContractWaitsError as waits:
        # The refused run rolled back as a whole (one transaction): apply up to the contract.
        command.upgrade(config, waits.before)
        return waits
    return None


def revisions_since(revision: str) -> frozenset[str]:
    """``revision`` and every revision of this code after it."""
    found = {revision}
    for script in _scripts().iterate_revisions("heads", revision):
        found.add(script.revision)
    return frozenset(found)


@functools.cache
def ready_revisions() -> frozenset[str]:
    """The revisions this code runs on: its head, and below it any contract or optional
    expand not applied yet (read once per process, like head_revision)."""
    revisions = {head_revision()}
    script = _scripts().get_revision(head_revision())
    while script is not None and script.revision in CONTRACTS | OPTIONAL:
        below = script.down_revision
        assert isinstance(below, str), "a contract or an optional expand has one parent"
        revisions.add(below)
        script = _scripts().get_revision(below)
    return frozenset(revisions)


# Live (their session lock held: the instance_sessions view) and older than the expand: no
# revision recorded (a release before it), or one this code does not count from the expand on.
OLDER_LIVE_INSTANCES = """
SELECT i.id, i.revision FROM instances i
JOIN instance_sessions s ON s.session_key = i.session_key
WHERE i.status <> 'stopped'
  AND (i.revision IS NULL OR NOT i.revision = ANY(CAST(:accepted AS text[])))
ORDER BY i.id
"""


# What the application's own role may do (TANDEM_DATABASE_APP_ROLE; the migrations run as the
# owner): no DDL (it owns nothing, and no role but the owner may CREATE in the public schema:
# PUBLIC's CREATE, which a cluster upgraded from PostgreSQL 14 or older keeps, is taken too,
# so no object of the app's can shadow a builtin an owner function names); read every table
# but the owner's settings; write the working tables (idempotency keys, the scheduler's
# state); and, once the contract is applied, write nothing that is money, a key, a session or
# an audit row: those only through the owner functions granted to it by name (their
# declarations: ServerFunction.app_role). Applied after every upgrade, so tables added later
# are covered.
_APP_ROLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_APPEND_ONLY = ("ledger_entries", "transfers")
# After the contract: SELECT only (and api_keys' last_used_at, which the key cache dates).
APP_READ_ONLY = ("users", "ledger_entries", "transfers", "api_keys", "task_actions")
# After the contract: SELECT and DELETE (housekeeping prunes ended sessions; deleting one only
# ends it), no INSERT or UPDATE: a login and a logout go through the owner's functions
# (tandem_start_session_v1, tandem_end_session_v1), so no session is forged or revived.
APP_DELETE_ONLY = ("browser_sessions",)
# The owner's alone: the ceiling's settings and its counters (written by the owner functions).
OWNER_ONLY = ("wallet_settings", "mint_usage")
# SELECT only, from the revision that makes them (0016) on, whatever the contracts: holds and
# their events are written by the owner functions alone. Not in APP_READ_ONLY, which the
# released contract 0015 reads at a revision where these tables do not exist yet.
APP_READ_ONLY_HOLDS = ("holds", "hold_events")
# The same for the change stream (0019): events are written by the owner's triggers and
# functions alone.
APP_READ_ONLY_EVENTS = ("events", "event_stream")


def app_table_statements(role: str, contracted: bool) -> list[str]:
    """The table and schema rights of ``role``, before (``contracted`` False) or after the
    contract (what a downgrade of the contract gives back, too)."""
    if _APP_ROLE.fullmatch(role) is None:
        raise ValueError(f"invalid role name {role!r}")
    read_only = APP_READ_ONLY if contracted else _APPEND_ONLY
    statements = [
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        f"REVOKE CREATE ON SCHEMA public FROM {role}",
        f"GRANT USAGE ON SCHEMA public TO {role}",
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {', '.join(read_only)} FROM {role}"
        if contracted
        else f"REVOKE UPDATE, DELETE, TRUNCATE ON {', '.join(read_only)} FROM {role}",
        # Keys are made and revoked by the owner (`tandem keys`, `tandem migrate`); the app
        # dates their use: it can neither revive nor widen one.
        f"REVOKE UPDATE, DELETE, TRUNCATE ON api_keys FROM {role}",
        f"GRANT UPDATE (last_used_at) ON api_keys TO {role}",
        f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}",
    ]
    if contracted:
        statements.append(
            f"REVOKE INSERT, UPDATE, TRUNCATE ON {', '.join(APP_DELETE_ONLY)} FROM {role}"
        )
    return statements


def app_role_statements(role: str, contracted: bool) -> list[str]:
    """The grants of ``role``, before (``contracted`` False) or after the contract."""
    return [
        *app_table_statements(role, contracted),
        # Earlier releases granted EXECUTE ON ALL FUNCTIONS; now each by name, below.
        f"REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM {role}",
    ]


# Whether the role could still create an object in public (through PUBLIC or a role it is a
# member of): then it could shadow what an owner function names, and nothing is granted.
_MAY_CREATE = "SELECT has_schema_privilege($1, 'public', 'CREATE')"


_FUNCTION_EXISTS = """
SELECT EXISTS (SELECT FROM pg_proc WHERE proname = $1 AND pronamespace = 'public'::regnamespace
               AND pg_get_function_identity_arguments(oid) = $2)
"""


def grant_app_role(database_url: str, role: str, functions: Iterable[ServerFunction]) -> None:
    """Give ``role`` (an existing login role) the application's rights on this database, by
    its revision (before or after the contract), and EXECUTE on each of ``functions`` declared
    ``app_role`` that the database has (every declaration: tandem.functions.DECLARED)."""
    from tandem.core.database import asyncpg_dsn

    granted = [function for function in functions if function.app_role]

    async def run() -> None:
        import asyncpg

        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with conn.transaction():
                revision = await conn.fetchval("SELECT version_num FROM alembic_version")
                # A revision this code does not know is a later release's: contracted too.
                known = revisions_since(_base_revision())
                contracted = revision not in known or revision in revisions_since(CONTRACT_REVISION)
                for statement in app_role_statements(role, contracted):
                    await conn.execute(statement)
                if await conn.fetchval(_MAY_CREATE, role):
                    raise RuntimeError(
                        f"the role {role} may still CREATE in the schema public (through PUBLIC, "
                        "when this role may not revoke it, or a role it is a member of): revoke "
                        "it as the schema's owner, then run `tandem migrate` again"
                    )
                for table in OWNER_ONLY:
                    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                        await conn.execute(f"REVOKE ALL ON {table} FROM {role}")
                for table in APP_READ_ONLY_HOLDS + APP_READ_ONLY_EVENTS:
                    if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                        await conn.execute(
                            f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {table} FROM {role}"
                        )
                for function in granted:
                    if await conn.fetchval(_FUNCTION_EXISTS, function.name, function.arguments):
                        await conn.execute(function.grant_statement(role))
        finally:
            await conn.close()

    asyncio.run(run())


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def _base_revision() -> str:
    base = _scripts().get_base()
    assert base is not None
    return base


@functools.cache
def head_revision() -> str:
    """The latest migration this code ships. Read once per process: the files do not change
    under a running process (a release is a new process), and reading them costs milliseconds
    of CPU, which made every readiness probe (anonymous) a cheap way to load an instance."""
    head = _scripts().get_current_head()
    assert head is not None
    return head
