"""Server-side deadlines as the database's defaults, instead of startup parameters.

A pooler in transaction mode (PgBouncer) refuses startup parameters such as
statement_timeout, so Tandem sends none but application_name. The server-side deadlines
become this database's defaults, for every session that connects to it:
- statement_timeout 10 s: a statement the server cancels is rolled back ("not applied");
- idle_in_transaction_session_timeout 10 s: a session cut off inside a transaction (its
  client partitioned away) cannot hold its locks for longer;
- TCP keepalive (5 s idle, 2 s interval, 3 probes) and tcp_user_timeout 10 s: the server
  notices a vanished client in seconds, not after the kernel's default hours.
An operator overrides them per role (ALTER ROLE ... IN DATABASE ... SET), which wins over
these; a value already set for the database is kept (the downgrade resets all six).
ALTER DATABASE needs the database's owner (or a superuser): a migrating role that is neither
gets a warning and the defaults stay as they were (docs/database.md).

Revision ID: 0006_session_deadlines
Revises: 0005_task_history_finished_index
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006_session_deadlines"
down_revision: str | None = "0005_task_history_finished_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULTS = {
    "statement_timeout": "10s",
    "idle_in_transaction_session_timeout": "10s",
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}


def _alter(assignments: str) -> None:
    op.execute(f"""
DO $$
BEGIN
    -- USAGE, not MEMBER: a NOINHERIT member of the owner role may not ALTER the database.
    IF pg_has_role(current_user, (SELECT datdba FROM pg_database
                                  WHERE datname = current_database()), 'USAGE')
       OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        {assignments}
    ELSE
        RAISE WARNING 'not the owner of database %: its session deadlines were not set '
            '(see docs/database.md)', current_database();
    END IF;
END $$
""")


# A value the operator already set for this database (any role) is left as it is.
_ALREADY_SET = """EXISTS (SELECT FROM pg_db_role_setting s, unnest(s.setconfig) c
    WHERE s.setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND s.setrole = 0 AND c LIKE '{name}=%')"""


def upgrade() -> None:
    _alter(
        " ".join(
            f"IF NOT {_ALREADY_SET.format(name=name)} THEN "
            f"EXECUTE format('ALTER DATABASE %I SET {name} = %L', current_database(), '{value}');"
            " END IF;"
            for name, value in DEFAULTS.items()
        )
    )


def downgrade() -> None:
    _alter(
        " ".join(
            f"EXECUTE format('ALTER DATABASE %I RESET {name}', current_database());"
            for name in DEFAULTS
        )
    )
