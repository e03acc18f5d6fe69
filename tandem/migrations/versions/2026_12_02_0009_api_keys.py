"""API keys, who made each change, and idempotency keys that belong to their caller.

- ``api_keys``: a name, the SHA-256 of the token (the token itself is never stored), scopes,
  when it was created, last used and revoked. Keys are revoked, never deleted: the journal
  and the task audit point at them for good.
- ``ledger_entries.api_key_id`` and ``transfers.api_key_id``: the key that made the change
  (NULL: before keys, or authentication disabled). ``task_actions``: every run/pause/resume
  of a task through the API, with its key.
- Idempotency keys are scoped to the API key that sent them: the unique keys of
  ``idempotency_keys``, ``ledger_entries`` and ``transfers`` become (key, api_key_id), NULLS
  NOT DISTINCT (PostgreSQL 15+), so one caller can neither read nor claim another's key, and
  anonymous requests still share one namespace (the key first: a lookup by key is an index
  probe that then tells the callers apart). ``idempotency_usage`` counts the keys each
  caller stored per day (one row per caller, day and server backend, so counting never makes
  two connections wait for each other).
- ``tandem_transfer`` takes the key's id.

Revision ID: 0009_api_keys
Revises: 0008_ledger
Create Date: 2026-12-02
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0009_api_keys"
down_revision: str | None = "0008_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INT64_MAX = 2**63 - 1

_TRANSFER_BODY = f"""
        DECLARE
            locked integer;
            from_now bigint;
            to_now bigint;
            new_id bigint;
            made_at timestamptz;
        BEGIN
            -- Both rows, in id order, before anything else: the fixed order is what makes
            -- A->B and B->A at once queue instead of deadlock.
            SELECT count(*) INTO locked FROM (
                SELECT 1 FROM users u WHERE u.id IN (p_from, p_to) ORDER BY u.id FOR UPDATE
            ) rows;
            SELECT u.balance INTO from_now FROM users u WHERE u.id = p_from;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'from_not_found', NULL::bigint, NULL::bigint, NULL::bigint,
                                    NULL::timestamptz;
                RETURN;
            END IF;
            SELECT u.balance INTO to_now FROM users u WHERE u.id = p_to;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'to_not_found', NULL::bigint, NULL::bigint, NULL::bigint,
                                    NULL::timestamptz;
                RETURN;
            END IF;
            IF from_now < p_amount THEN
                RETURN QUERY SELECT 'insufficient_funds', NULL::bigint, from_now, to_now,
                                    NULL::timestamptz;
                RETURN;
            END IF;
            IF to_now::numeric + p_amount > {INT64_MAX} THEN
                RETURN QUERY SELECT 'balance_limit_exceeded', NULL::bigint, from_now, to_now,
                                    NULL::timestamptz;
                RETURN;
            END IF;
            INSERT INTO transfers
                (from_user_id, to_user_id, amount, reference, idempotency_key, api_key_id)
            VALUES (p_from, p_to, p_amount, p_reference, p_key, p_api_key)
            RETURNING transfers.id, transfers.created_at INTO new_id, made_at;
            UPDATE users u SET balance = u.balance - p_amount, updated_at = made_at
            WHERE u.id = p_from RETURNING u.balance INTO from_now;
            UPDATE users u SET balance = u.balance + p_amount, updated_at = made_at
            WHERE u.id = p_to RETURNING u.balance INTO to_now;
            INSERT INTO ledger_entries
                (user_id, amount, balance, kind, transfer_id, reference, created_at, api_key_id)
            VALUES (p_from, -p_amount, from_now, 'transfer', new_id, p_reference, made_at,
                    p_api_key),
                   (p_to, p_amount, to_now, 'transfer', new_id, p_reference, made_at,
                    p_api_key);
            RETURN QUERY SELECT 'ok', new_id, from_now, to_now, made_at;
        END
"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE api_keys (
            id bigint GENERATED ALWAYS AS IDENTITY,
            name text NOT NULL,
            token_sha256 bytea NOT NULL,
            scopes text[] NOT NULL,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            last_used_at timestamptz,
            revoked_at timestamptz,
            CONSTRAINT pk_api_keys PRIMARY KEY (id),
            CONSTRAINT uq_api_keys_name UNIQUE (name),
            CONSTRAINT uq_api_keys_token_sha256 UNIQUE (token_sha256),
            CONSTRAINT ck_api_keys_name CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
            CONSTRAINT ck_api_keys_scopes CHECK (cardinality(scopes) > 0)
        )
        """
    )
    for table in ("ledger_entries", "transfers"):
        op.execute(
            f"ALTER TABLE {table} ADD COLUMN api_key_id bigint "
            f"CONSTRAINT fk_{table}_api_key_id_api_keys REFERENCES api_keys (id)"
        )
    op.execute("DROP INDEX uq_ledger_entries_idempotency_key")
    op.execute(
        "CREATE UNIQUE INDEX uq_ledger_entries_idempotency_key ON ledger_entries "
        "(idempotency_key, api_key_id) NULLS NOT DISTINCT WHERE idempotency_key IS NOT NULL"
    )
    op.execute("ALTER TABLE transfers DROP CONSTRAINT uq_transfers_idempotency_key")
    op.execute(
        "CREATE UNIQUE INDEX uq_transfers_idempotency_key ON transfers "
        "(idempotency_key, api_key_id) NULLS NOT DISTINCT WHERE idempotency_key IS NOT NULL"
    )
    op.execute("ALTER TABLE idempotency_keys DROP CONSTRAINT pk_idempotency_keys")
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN api_key_id bigint")
    op.execute(
        "ALTER TABLE idempotency_keys ADD CONSTRAINT uq_idempotency_keys_caller_key "
        "UNIQUE NULLS NOT DISTINCT (key, api_key_id)"
    )
    op.execute(
        """
        CREATE TABLE idempotency_usage (
            api_key_id bigint,
            day date NOT NULL,
            backend integer NOT NULL,
            used bigint NOT NULL,
            -- The day first: the count reads one day of one caller (an index range).
            CONSTRAINT uq_idempotency_usage UNIQUE NULLS NOT DISTINCT (day, api_key_id, backend)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE task_actions (
            id bigint GENERATED ALWAYS AS IDENTITY,
            task_id bigint NOT NULL,
            action text NOT NULL,
            api_key_id bigint,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            CONSTRAINT pk_task_actions PRIMARY KEY (id),
            CONSTRAINT fk_task_actions_task_id_tasks FOREIGN KEY (task_id)
                REFERENCES tasks (id) ON DELETE CASCADE,
            CONSTRAINT fk_task_actions_api_key_id_api_keys FOREIGN KEY (api_key_id)
                REFERENCES api_keys (id),
            CONSTRAINT ck_task_actions_action CHECK (action IN ('run', 'pause', 'resume'))
        )
        """
    )
    op.execute("CREATE INDEX ix_task_actions_task_id ON task_actions (task_id, id)")
    op.execute("DROP FUNCTION tandem_transfer(bigint, bigint, bigint, text, text)")
    op.execute(
        f"""
        CREATE FUNCTION tandem_transfer(
            p_from bigint, p_to bigint, p_amount bigint, p_reference text, p_key text,
            p_api_key bigint)
        RETURNS TABLE (outcome text, transfer_id bigint, from_balance bigint,
                       to_balance bigint, created_at timestamptz)
        LANGUAGE plpgsql AS $${_TRANSFER_BODY}$$
        """
    )


def downgrade() -> None:
    # Fails where two callers used one key string: the global unique keys would collide.
    op.execute("DROP FUNCTION tandem_transfer(bigint, bigint, bigint, text, text, bigint)")
    op.execute("DROP TABLE task_actions")
    op.execute("DROP TABLE idempotency_usage")
    op.execute("ALTER TABLE idempotency_keys DROP CONSTRAINT uq_idempotency_keys_caller_key")
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN api_key_id")
    op.execute("ALTER TABLE idempotency_keys ADD CONSTRAINT pk_idempotency_keys PRIMARY KEY (key)")
    op.execute("DROP INDEX uq_transfers_idempotency_key")
    op.execute(
        "ALTER TABLE transfers ADD CONSTRAINT uq_transfers_idempotency_key UNIQUE (idempotency_key)"
    )
    op.execute("DROP INDEX uq_ledger_entries_idempotency_key")
    op.execute(
        "CREATE UNIQUE INDEX uq_ledger_entries_idempotency_key ON ledger_entries "
        "(idempotency_key) WHERE idempotency_key IS NOT NULL"
    )
    for table in ("ledger_entries", "transfers"):
        op.execute(f"ALTER TABLE {table} DROP COLUMN api_key_id")
    op.execute("DROP TABLE api_keys")
    # 0008's transfer function, as it was.
    op.execute((Path(__file__).parent.parent / "sql" / "0008_transfer.sql").read_text())
