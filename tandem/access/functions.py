"""The access layer's server-side functions (files in ``sql/``), declared once: the migration
that creates each version and the test of the catalog both read these. A released version is
never edited; a change is a new file and a new declaration (see tandem/core/functions.py)."""

from __future__ import annotations

from pathlib import Path

from tandem.core.functions import ServerFunction

_SQL = Path(__file__).resolve().parent / "sql"

# Owner-defined: the application's role calls it, by a grant of its own (`tandem migrate`:
# core/migrations.grant_app_role), and gets nothing else it could do with the owner's rights.
CREATE_BOUND_KEY_V1 = ServerFunction(
    "tandem_create_bound_key_v1",
    _SQL / "create_bound_key_v1.sql",
    "p_caller bigint, p_name text, p_token_sha256 bytea, p_scopes text[], p_users bigint[], "
    "p_expires_in interval",
    security_definer=True,
    config=("search_path=public, pg_temp",),
    execute=(),
    app_role=True,
)

# A login: the session starts only for whoever holds the key's token (hashed in the database);
# a logout only ends one. The application's role has no INSERT or UPDATE on browser_sessions
# once the contract is applied (migration 0015): it cannot forge or revive a session.
START_SESSION_V1 = ServerFunction.as_owner(
    _SQL, "tandem_start_session_v1", "p_key_token text, p_session_sha256 bytea, p_seconds integer"
)
END_SESSION_V1 = ServerFunction.as_owner(_SQL, "tandem_end_session_v1", "p_session_sha256 bytea")

CURRENT = (CREATE_BOUND_KEY_V1, START_SESSION_V1, END_SESSION_V1)
