"""The ledger: an append-only journal of every balance change, and transfers between users.

- ``ledger_entries``: one row per change of one balance (``opening``, ``deposit``,
  ``withdrawal``, a ``transfer`` leg), with the balance after it. A balance is always the sum
  of its user's entries; every existing user gets an opening entry equal to its balance now.
- ``transfers``: one row per transfer; its two legs are entries sharing its id.
- Both are append-only, enforced by the database: UPDATE, DELETE and TRUNCATE are refused by
  statement-level triggers (for every role, the owner included), so a mistake or a rogue
  script cannot rewrite history. (Where the application's role is not the owner, it is also
  granted nothing but SELECT and INSERT: issue of access control, docs/wallet.md.)
- An applied change keeps its idempotency key in the journal (unique), so a retry can never
  apply twice, even after ``idempotency_keys`` (which also records refusals) is pruned.
- ``tandem_transfer``: a transfer in one round trip: both users' rows locked in id order (two
  transfers in opposite directions queue on the first row instead of deadlocking), checked,
  updated, and journaled. A function, because the checks must read the rows after the locks
  were granted (each statement of a volatile function takes a new snapshot).

Revision ID: 0008_ledger
Revises: 0007_scheduler_sessions
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_ledger"
down_revision: str | None = "0007_scheduler_sessions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INT64_MAX = 2**63 - 1

# Also what migration 0009 restores when it is downgraded.
TRANSFER_FUNCTION = f"""
        CREATE FUNCTION tandem_transfer(
            p_from bigint, p_to bigint, p_amount bigint, p_reference text, p_key text)
        RETURNS TABLE (outcome text, transfer_id bigint, from_balance bigint,
                       to_balance bigint, created_at timestamptz)
        LANGUAGE plpgsql AS $$
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
            INSERT INTO transfers (from_user_id, to_user_id, amount, reference, idempotency_key)
            VALUES (p_from, p_to, p_amount, p_reference, p_key)
            RETURNING transfers.id, transfers.created_at INTO new_id, made_at;
            UPDATE users u SET balance = u.balance - p_amount, updated_at = made_at
            WHERE u.id = p_from RETURNING u.balance INTO from_now;
            UPDATE users u SET balance = u.balance + p_amount, updated_at = made_at
            WHERE u.id = p_to RETURNING u.balance INTO to_now;
            INSERT INTO ledger_entries
                (user_id, amount, balance, kind, transfer_id, reference, created_at)
            VALUES (p_from, -p_amount, from_now, 'transfer', new_id, p_reference, made_at),
                   (p_to, p_amount, to_now, 'transfer', new_id, p_reference, made_at);
            RETURN QUERY SELECT 'ok', new_id, from_now, to_now, made_at;
        END $$
"""


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE transfers (
            id bigint GENERATED ALWAYS AS IDENTITY,
            from_user_id bigint NOT NULL,
            to_user_id bigint NOT NULL,
            amount bigint NOT NULL,
            reference text,
            idempotency_key text,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            CONSTRAINT pk_transfers PRIMARY KEY (id),
            CONSTRAINT fk_transfers_from_user_id_users FOREIGN KEY (from_user_id)
                REFERENCES users (id),
            CONSTRAINT fk_transfers_to_user_id_users FOREIGN KEY (to_user_id)
                REFERENCES users (id),
            CONSTRAINT ck_transfers_amount_positive CHECK (amount > 0),
            CONSTRAINT ck_transfers_two_users CHECK (from_user_id <> to_user_id),
            CONSTRAINT ck_transfers_reference_length CHECK (char_length(reference) <= 255),
            CONSTRAINT uq_transfers_idempotency_key UNIQUE (idempotency_key)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE ledger_entries (
            id bigint GENERATED ALWAYS AS IDENTITY,
            user_id bigint NOT NULL,
            amount bigint NOT NULL,
            balance bigint NOT NULL,
            kind text NOT NULL,
            transfer_id bigint,
            reference text,
            idempotency_key text,
            created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            CONSTRAINT pk_ledger_entries PRIMARY KEY (id),
            CONSTRAINT fk_ledger_entries_user_id_users FOREIGN KEY (user_id) REFERENCES users (id),
            CONSTRAINT fk_ledger_entries_transfer_id_transfers FOREIGN KEY (transfer_id)
                REFERENCES transfers (id),
            CONSTRAINT ck_ledger_entries_balance_not_negative CHECK (balance >= 0),
            CONSTRAINT ck_ledger_entries_kind CHECK (
                kind IN ('opening', 'deposit', 'withdrawal', 'transfer')),
            CONSTRAINT ck_ledger_entries_transfer_leg CHECK (
                (kind = 'transfer') = (transfer_id IS NOT NULL)),
            CONSTRAINT ck_ledger_entries_sign CHECK (
                (kind = 'opening' AND amount = balance)
                OR (kind = 'deposit' AND amount > 0)
                OR (kind = 'withdrawal' AND amount < 0)
                OR (kind = 'transfer' AND amount <> 0)),
            CONSTRAINT ck_ledger_entries_reference_length CHECK (char_length(reference) <= 255)
        )
        """
    )
    # History pages (newest first, keyset on id) and the balance at an instant.
    op.execute("CREATE INDEX ix_ledger_entries_user_id ON ledger_entries (user_id, id)")
    op.execute(
        "CREATE INDEX ix_ledger_entries_user_id_created_at ON ledger_entries "
        "(user_id, created_at, id)"
    )
    # A transfer's two legs (only legs are indexed).
    op.execute(
        "CREATE INDEX ix_ledger_entries_transfer_id ON ledger_entries (transfer_id) "
        "WHERE transfer_id IS NOT NULL"
    )
    op.execute(
        "CREATE UNIQUE INDEX uq_ledger_entries_idempotency_key ON ledger_entries "
        "(idempotency_key) WHERE idempotency_key IS NOT NULL"
    )
    op.execute(
        """
        CREATE FUNCTION tandem_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    for table in ("ledger_entries", "transfers"):
        # Statement-level: refused even when no row matches.
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION tandem_append_only()"
        )
    # Every balance so far, as its user's opening entry (in id order: ids increase).
    op.execute(
        "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
        "SELECT id, balance, balance, 'opening' FROM users ORDER BY id"
    )
    # Keyed transfers share the table of first outcomes with balance updates.
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN kind text NOT NULL DEFAULT 'update'")
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN to_user_id bigint")
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN reference text")
    op.execute(TRANSFER_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION tandem_transfer(bigint, bigint, bigint, text, text)")
    for column in ("reference", "to_user_id", "kind"):
        op.execute(f"ALTER TABLE idempotency_keys DROP COLUMN {column}")
    op.execute("DROP TABLE ledger_entries")
    op.execute("DROP TABLE transfers")
    op.execute("DROP FUNCTION tandem_append_only()")
