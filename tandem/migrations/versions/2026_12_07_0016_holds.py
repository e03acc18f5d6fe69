"""Holds, the expand: a reservation of a user's balance, captured, released or expired.

- ``users.held``: the sum of the user's holds not yet captured or released, with
  ``CHECK (held >= 0 AND balance - held >= 0)``: the available amount is never negative.
- ``holds`` (one row per hold, its state changing only from 'active', once: trigger
  ``tandem_hold_transition_v1``; never deleted) and ``hold_events`` (append-only: each
  change of a hold); ``ledger_entries.hold_id``: a capture's entries carry their hold.
- ``idempotency_keys.hold_id`` and ``expires_in``: what a keyed hold, capture or release
  asked for.
- ``wallet_settings.holds_enabled``: holds may be made. The previous release's instances
  ignore ``held`` (their withdrawals would be refused by the CHECK, not by a 409), so it is
  turned on here only when no live instance reports an older release (a fresh database,
  ``make run``); otherwise the contract (0017) turns it on once they are replaced, and until
  then POST /holds answers 503 ``holds_unavailable``.
- Owner functions (tandem/wallet/sql): ``tandem_apply_delta_v2`` and
  ``tandem_transfer_v3`` (v1 and v2 counting the available amount, releasing the payer's
  expired holds when short), ``tandem_create_hold_v1``, ``tandem_capture_hold_v1``,
  ``tandem_release_hold_v1``, ``tandem_expire_holds_v1`` (the expiry task's batch),
  ``tandem_release_expired_v1`` (internal). ``tandem_apply_delta_v1`` and
  ``tandem_transfer_v2`` stay for the previous release.
- The application's role reads ``holds`` and ``hold_events`` and writes neither
  (``tandem migrate`` grants it by revision: tandem/core/migrations.py).

The downgrade refuses while a hold is active (its amount would silently become spendable).

Revision ID: 0016_holds
Revises: 0015_app_role_contract
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tandem.core.migrations import HOLDS_EXPAND_REVISION, OLDER_LIVE_INSTANCES, revisions_since
from tandem.wallet.functions import (
    APPEND_ONLY_HOLD_EVENTS,
    APPEND_ONLY_HOLDS,
    APPEND_ONLY_V1,
    HOLD_FUNCTIONS,
    HOLD_TRANSITION_V1,
)
from tandem.wallet.models import REFERENCE_MAX_LENGTH

revision: str = "0016_holds"
down_revision: str | None = "0015_app_role_contract"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = f"""
CREATE TABLE holds (
    id bigint GENERATED ALWAYS AS IDENTITY,
    user_id bigint NOT NULL,
    to_user_id bigint,
    amount bigint NOT NULL,
    captured_amount bigint,
    status text NOT NULL,
    expires_at timestamptz NOT NULL,
    created_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    finished_at timestamptz,
    reference text,
    idempotency_key text,
    api_key_id bigint,
    available_after bigint NOT NULL,
    CONSTRAINT pk_holds PRIMARY KEY (id),
    CONSTRAINT fk_holds_user_id_users FOREIGN KEY (user_id) REFERENCES users (id),
    CONSTRAINT fk_holds_to_user_id_users FOREIGN KEY (to_user_id) REFERENCES users (id),
    CONSTRAINT fk_holds_api_key_id_api_keys FOREIGN KEY (api_key_id) REFERENCES api_keys (id),
    CONSTRAINT ck_holds_amount_positive CHECK (amount > 0),
    CONSTRAINT ck_holds_two_users CHECK (to_user_id <> user_id),
    CONSTRAINT ck_holds_status CHECK (status IN ('active', 'captured', 'released', 'expired')),
    CONSTRAINT ck_holds_captured_amount CHECK (
        (status = 'captured') = (captured_amount IS NOT NULL)
        AND captured_amount > 0 AND captured_amount <= amount),
    CONSTRAINT ck_holds_finished CHECK ((status = 'active') = (finished_at IS NULL)),
    CONSTRAINT ck_holds_available_after_not_negative CHECK (available_after >= 0),
    CONSTRAINT ck_holds_reference_length CHECK (char_length(reference) <= {REFERENCE_MAX_LENGTH})
);
CREATE INDEX ix_holds_active_user_id_expires_at ON holds (user_id, expires_at)
    WHERE status = 'active';
CREATE INDEX ix_holds_active_expires_at ON holds (expires_at) WHERE status = 'active';
CREATE INDEX ix_holds_user_id ON holds (user_id, id);
CREATE UNIQUE INDEX uq_holds_idempotency_key ON holds (idempotency_key, api_key_id)
    NULLS NOT DISTINCT WHERE idempotency_key IS NOT NULL;
CREATE TABLE hold_events (
    id bigint GENERATED ALWAYS AS IDENTITY,
    hold_id bigint NOT NULL,
    kind text NOT NULL,
    amount bigint NOT NULL,
    api_key_id bigint,
    idempotency_key text,
    created_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT pk_hold_events PRIMARY KEY (id),
    CONSTRAINT fk_hold_events_hold_id_holds FOREIGN KEY (hold_id) REFERENCES holds (id),
    CONSTRAINT fk_hold_events_api_key_id_api_keys
        FOREIGN KEY (api_key_id) REFERENCES api_keys (id),
    CONSTRAINT ck_hold_events_kind CHECK (kind IN ('created', 'captured', 'released', 'expired')),
    CONSTRAINT ck_hold_events_amount_positive CHECK (amount > 0)
);
CREATE INDEX ix_hold_events_hold_id ON hold_events (hold_id, id);
CREATE UNIQUE INDEX uq_hold_events_idempotency_key ON hold_events (idempotency_key, api_key_id)
    NULLS NOT DISTINCT WHERE idempotency_key IS NOT NULL;
"""


def upgrade() -> None:
    # Adding a column with a constant default rewrites nothing; the CHECK reads every row
    # once (held is 0 everywhere: it holds).
    op.execute("ALTER TABLE users ADD COLUMN held bigint DEFAULT 0 NOT NULL")
    op.execute(
        "ALTER TABLE users ADD CONSTRAINT ck_users_held_within_balance "
        "CHECK (held >= 0 AND balance - held >= 0)"
    )
    for statement in TABLES.split(";"):
        if statement.strip():
            op.execute(statement)
    op.execute("ALTER TABLE ledger_entries ADD COLUMN hold_id bigint")
    op.execute(
        "ALTER TABLE ledger_entries ADD CONSTRAINT fk_ledger_entries_hold_id_holds "
        "FOREIGN KEY (hold_id) REFERENCES holds (id)"
    )
    op.execute(
        "CREATE INDEX ix_ledger_entries_hold_id ON ledger_entries (hold_id) "
        "WHERE hold_id IS NOT NULL"
    )
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN hold_id bigint")
    op.execute("ALTER TABLE idempotency_keys ADD COLUMN expires_in integer")
    op.execute(
        "ALTER TABLE wallet_settings ADD COLUMN holds_enabled boolean DEFAULT false NOT NULL"
    )
    for function in HOLD_FUNCTIONS:
        for statement in function.create_statements():
            op.execute(statement)
    # Statement-level: refused even when no row matches.
    op.execute(
        f"CREATE TRIGGER {APPEND_ONLY_HOLD_EVENTS}_append_only BEFORE UPDATE OR DELETE OR "
        f"TRUNCATE ON {APPEND_ONLY_HOLD_EVENTS} FOR EACH STATEMENT "
        f"EXECUTE FUNCTION {APPEND_ONLY_V1.name}()"
    )
    op.execute(
        f"CREATE TRIGGER {APPEND_ONLY_HOLDS}_append_only BEFORE DELETE OR TRUNCATE "
        f"ON {APPEND_ONLY_HOLDS} FOR EACH STATEMENT EXECUTE FUNCTION {APPEND_ONLY_V1.name}()"
    )
    op.execute(
        f"CREATE TRIGGER {APPEND_ONLY_HOLDS}_transition BEFORE UPDATE ON {APPEND_ONLY_HOLDS} "
        f"FOR EACH ROW EXECUTE FUNCTION {HOLD_TRANSITION_V1.name}()"
    )
    bind = op.get_bind()
    older = bind.execute(
        sa.text(OLDER_LIVE_INSTANCES), {"accepted": sorted(revisions_since(HOLDS_EXPAND_REVISION))}
    ).all()
    if not older:
        op.execute("UPDATE wallet_settings SET holds_enabled = true")


def downgrade() -> None:
    bind = op.get_bind()
    active = bind.execute(sa.text("SELECT count(*) FROM holds WHERE status = 'active'")).scalar()
    if active:
        raise RuntimeError(
            f"{active} holds are active: release or capture them (or let them expire) before "
            "downgrading below 0016_holds, or their amounts would become spendable unnoticed"
        )
    op.execute(f"DROP TRIGGER {APPEND_ONLY_HOLDS}_transition ON {APPEND_ONLY_HOLDS}")
    op.execute(f"DROP TRIGGER {APPEND_ONLY_HOLDS}_append_only ON {APPEND_ONLY_HOLDS}")
    op.execute(f"DROP TRIGGER {APPEND_ONLY_HOLD_EVENTS}_append_only ON {APPEND_ONLY_HOLD_EVENTS}")
    for function in reversed(HOLD_FUNCTIONS):
        op.execute(function.drop_statement())
    op.execute("ALTER TABLE wallet_settings DROP COLUMN holds_enabled")
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN expires_in")
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN hold_id")
    op.execute("DROP INDEX ix_ledger_entries_hold_id")
    op.execute("ALTER TABLE ledger_entries DROP COLUMN hold_id")
    op.execute("DROP TABLE hold_events")
    op.execute("DROP TABLE holds")
    op.execute("ALTER TABLE users DROP CONSTRAINT ck_users_held_within_balance")
    op.execute("ALTER TABLE users DROP COLUMN held")
